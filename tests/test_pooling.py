"""`pool`: one float32 vector per input, with left/right padding masks (ACT_SPEC.md section 1)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from actsteer.core.pooling import pool

PAD = 1e6  # padding positions hold a huge value: any leak shows


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def tokens(gen) -> torch.Tensor:
    """(B, T, D) = (2, 5, 3) real activations."""
    return torch.randn(2, 5, 3, generator=gen)


# rows: 4 and 2 real tokens, padded on the right or on the left
RIGHT = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
LEFT = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]])


def _padded(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool().unsqueeze(-1), tokens, torch.full_like(tokens, PAD))


def _real(tokens: torch.Tensor, mask: torch.Tensor, row: int) -> torch.Tensor:
    return tokens[row][mask[row].bool()]  # (n_real, D)


@pytest.mark.parametrize("mask", [RIGHT, LEFT], ids=["right", "left"])
def test_pool_mean_ignores_padding(tokens, mask):
    out = pool(_padded(tokens, mask), mask=mask, how="mean")
    expected = torch.stack([_real(tokens, mask, r).mean(0) for r in range(2)])
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mask", [RIGHT, LEFT], ids=["right", "left"])
def test_pool_last_takes_last_real_token(tokens, mask):
    out = pool(_padded(tokens, mask), mask=mask, how="last")
    expected = torch.stack([_real(tokens, mask, r)[-1] for r in range(2)])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mask", [RIGHT, LEFT], ids=["right", "left"])
@pytest.mark.parametrize("how", ["max", "min"])
def test_pool_max_min_ignore_padding(tokens, mask, how):
    padded = _padded(tokens, mask)
    if how == "min":
        padded = torch.where(mask.bool().unsqueeze(-1), padded, -padded)  # -PAD would win a leaky min
    out = pool(padded, mask=mask, how=how)
    reduce = (lambda t: t.amax(0)) if how == "max" else (lambda t: t.amin(0))
    expected = torch.stack([reduce(_real(tokens, mask, r)) for r in range(2)])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.bool, torch.long, torch.float32])
def test_pool_mask_dtype_does_not_matter(tokens, dtype):
    padded = _padded(tokens, RIGHT)
    reference = pool(padded, mask=RIGHT, how="mean")
    assert torch.equal(pool(padded, mask=RIGHT.to(dtype), how="mean"), reference)


def test_pool_without_mask_uses_every_token(tokens):
    assert_close(pool(tokens, how="mean"), tokens.mean(1), rtol=1e-6, atol=1e-6)
    assert torch.equal(pool(tokens, how="last"), tokens[:, -1])
    assert torch.equal(pool(tokens, how="max"), tokens.amax(1))
    assert torch.equal(pool(tokens, how="min"), tokens.amin(1))
    assert torch.equal(pool(tokens), pool(tokens, how="mean"))  # mean is the default


def test_pool_mask_of_other_shape_is_ignored(tokens):
    # e.g. a text-token mask reaching an image-token site: documented as "used when the shape matches"
    other = torch.tensor([[1, 0, 0], [1, 0, 0]])
    assert torch.equal(pool(tokens, mask=other, how="mean"), pool(tokens, how="mean"))


def test_pool_half_precision_accumulates_in_float32():
    x = torch.full((1, 4, 2), 60000.0, dtype=torch.float16)  # a float16 sum would overflow to inf
    out = pool(x, mask=torch.ones(1, 4), how="mean")
    assert out.dtype == torch.float32
    assert_close(out, torch.full((1, 2), 60000.0), rtol=0.0, atol=0.0)
    assert pool(x.bfloat16(), how="last").dtype == torch.float32


@pytest.mark.parametrize("how", ["mean", "last", "max", "min"])
def test_pool_two_dim_passes_through(gen, how):
    x = torch.randn(4, 6, generator=gen)
    assert torch.equal(pool(x, how=how), x)
    assert torch.equal(pool(x, mask=torch.ones(4, 6), how=how), x)
    half = pool(x.bfloat16(), how=how)
    assert half.dtype == torch.float32 and torch.equal(half, x.bfloat16().float())


@pytest.mark.parametrize(("shape", "how"), [((4, 6), "mean"), ((2, 5, 3), "last")])
def test_pool_returns_a_new_tensor(gen, shape, how):
    x = torch.randn(*shape, generator=gen)
    out = pool(x, how=how)
    expected = out.clone()
    x.mul_(0)  # what a later in-place module does to the site's output
    assert torch.equal(out, expected)


def test_pool_spatial_reduces_height_and_width(gen):
    x = torch.randn(2, 3, 4, 5, generator=gen)  # (B, C, H, W)
    assert_close(pool(x, how="mean"), x.mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)
    assert torch.equal(pool(x, how="max"), x.amax(dim=(2, 3)))
    assert torch.equal(pool(x, how="min"), x.amin(dim=(2, 3)))
    assert pool(x.half(), how="mean").dtype == torch.float32


def test_pool_spatial_last_raises(gen):
    with pytest.raises(ValueError, match="Pooling 'last' has no meaning for \\(B, C, H, W\\) outputs"):
        pool(torch.randn(1, 2, 3, 3, generator=gen), how="last")


def test_pool_unknown_how_raises(tokens):
    with pytest.raises(ValueError, match="Unknown pooling 'median'; choose one of: mean, last, max, min"):
        pool(tokens, how="median")


@pytest.mark.parametrize("shape", [(5,), (1, 2, 3, 4, 5)])
def test_pool_unsupported_rank_raises(shape):
    with pytest.raises(ValueError, match="Cannot pool an output of shape"):
        pool(torch.zeros(shape))
