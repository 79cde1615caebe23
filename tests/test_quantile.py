"""Known answers for the quantile map (`actsteer.estimate(method="quantile")`, `QuantileMap`)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import actsteer
from actsteer.core.quantile import QuantileMap
from actsteer.eval.fidelity import wasserstein_1d


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _fit(source, target, **kw) -> QuantileMap:
    return actsteer.estimate(source, target, method="quantile", **kw)


def test_quantile_gaussian_map_is_the_affine_ot_map(gen):
    mu_s, sigma_s = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 0.5, 2.0])
    mu_t, sigma_t = torch.tensor([3.0, -1.0, 0.0]), torch.tensor([2.0, 0.5, 0.25])
    n = 40000
    source = mu_s + sigma_s * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    target = mu_t + sigma_t * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    m = _fit(source, target, support="all", knots=64)
    x = mu_s + sigma_s * torch.linspace(-2, 2, 41).unsqueeze(1)  # the central range, where samples are dense
    expected = mu_t + sigma_t / sigma_s * (x - mu_s)
    assert_close(m(x.float()), expected.float(), rtol=0, atol=float(0.04 * sigma_t.max()))
    assert_close(m.omega, (sigma_t / sigma_s).float(), rtol=0.02, atol=0)  # the tails' slope: Linear-AcT's


def test_quantile_beats_affine_on_a_skewed_pair_held_out(gen):
    """Normal source, log-normal target: the monotone map follows the skew, an affine map cannot."""
    def draw(n):
        return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.exp(0.8 * torch.randn(n, 4, generator=gen,
                                                                                                   dtype=torch.float64))
    (a, b), (held_a, held_b) = draw(200), draw(4000)
    affine = actsteer.estimate(a, b, method="linear-act", support="all")
    quantile = _fit(a, b, support="all", knots=16)  # 200 skewed samples: more knots follow them (8: 0.75x affine)
    w_affine = wasserstein_1d(affine(held_a.float()).double(), held_b).mean()
    w_quantile = wasserstein_1d(quantile(held_a.float()).double(), held_b).mean()
    assert w_quantile < 0.6 * w_affine, (float(w_quantile), float(w_affine))


def test_quantile_knots_pair_sorted_samples():
    source = torch.tensor([[3.0], [0.0], [4.0], [1.0], [2.0]], dtype=torch.float64)
    target = torch.tensor([[10.0], [11.0], [40.0], [20.0], [12.0]], dtype=torch.float64)
    m = _fit(source, target, knots=5)  # K = n = m: each sorted source sample goes to its target order statistic
    assert m.knots.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert m.values.flatten().tolist() == [10.0, 11.0, 12.0, 20.0, 40.0]
    assert m(torch.tensor([[0.5], [3.5], [4.0]])).flatten().tolist() == [10.5, 30.0, 40.0]  # linear between knots


def test_quantile_strength_interpolates_and_zero_is_identity(gen):
    a, b = torch.randn(300, 5, generator=gen), 1 + torch.randn(300, 5, generator=gen).exp()
    m = _fit(a, b)
    x = torch.randn(4, 7, 5, generator=gen)
    full = m(x)
    assert_close(m(x, 0.5), x + 0.5 * (full - x), rtol=1e-5, atol=1e-5)
    assert torch.equal(m(x, 0.0), x)
    assert torch.equal(m(x, torch.zeros(4)), x)  # per-row zeros too (vLLM rows that asked for no steering)


def test_quantile_negative_strength_inverts(gen):
    a, b = torch.randn(500, 3, generator=gen), torch.randn(500, 3, generator=gen).exp()
    m = _fit(a, b, support="all")
    x = torch.linspace(-4, 4, 81).unsqueeze(1).expand(81, 3).contiguous()
    assert_close(m(m(x), -1.0), x, rtol=0, atol=1e-5)  # exact: the inverse goes through the same knots, swapped
    # half strength both ways: the reverse map starts from the target side
    z = m(x)
    assert_close(m(z, -0.5), z + 0.5 * (m(z, -1.0) - z), rtol=1e-5, atol=1e-5)


def test_quantile_observed_support_leaves_outside_alone(gen):
    a, b = torch.randn(100, 2, generator=gen), 3 + torch.randn(100, 2, generator=gen)
    m = _fit(a, b)
    far = torch.tensor([[-50.0, 50.0]])
    assert torch.equal(m(far), far)
    assert torch.equal(m(far, -1.0), far)
    nan = torch.tensor([[float("nan"), 0.0]])
    out = m(nan)
    assert torch.isnan(out[0, 0]) and torch.isfinite(out[0, 1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantile_half_precision_kept_and_computed_in_float32(gen, dtype):
    a, b = torch.randn(200, 6, generator=gen), torch.randn(200, 6, generator=gen).exp()
    m = _fit(a, b)
    x = torch.randn(3, 5, 6, generator=gen).to(dtype)
    out = m(x)
    assert out.dtype == dtype
    assert torch.equal(out, m(x.float()).to(dtype))


def test_quantile_per_row_strengths_match_scalar_folds(gen):
    a, b = torch.randn(200, 4, generator=gen), torch.randn(200, 4, generator=gen).exp()
    m = _fit(a, b, support="all")
    x = torch.randn(4, 3, 4, generator=gen)
    strengths = torch.tensor([0.0, 1.0, -0.5, 0.25])
    out = m(x, strengths)
    for i, s in enumerate(strengths.tolist()):
        assert torch.equal(out[i], m(x[i : i + 1], s)[0]), s


def test_quantile_spatial_rule_moves_the_channel_mean(gen):
    a, b = torch.randn(200, 3, generator=gen), torch.randn(200, 3, generator=gen).exp()
    m = _fit(a, b, support="all")
    fm = m.fold(1.0)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    out = fm.apply_spatial(x)
    mu = x.mean(dim=(2, 3))
    assert_close(out.mean(dim=(2, 3)), m(mu), rtol=1e-5, atol=1e-5)
    assert_close(out - out.mean(dim=(2, 3), keepdim=True), x - mu[:, :, None, None], rtol=1e-5, atol=1e-5)


def test_quantile_dead_unit_is_a_shift():
    a = torch.stack([torch.full((50,), 2.0), torch.linspace(0, 1, 50)], dim=1)
    b = torch.stack([torch.linspace(4, 6, 50), torch.linspace(0, 2, 50)], dim=1)
    m = _fit(a, b, support="all")
    assert m.dead.tolist() == [True, False]
    assert_close(m(torch.tensor([[2.0, 0.5]]))[0, 0], torch.tensor(5.0))  # 2 + (mean 5 - 2)
    assert m.problem() is None


def test_quantile_map_refuses_bad_shapes_and_reports_non_monotone_values():
    with pytest.raises(ValueError, match="knots"):
        QuantileMap(torch.ones(2), torch.zeros(2), knots=torch.zeros(1, 2), values=torch.zeros(1, 2))
    m = QuantileMap(torch.ones(1), torch.zeros(1), knots=torch.tensor([[0.0], [1.0]]), values=torch.tensor([[1.0], [0.0]]))
    assert "must be monotone" in m.problem()
    with pytest.raises(ValueError, match="knots"):
        _fit(torch.randn(10, 2), torch.randn(10, 2), knots=1)


def test_quantile_lookup_compiles_to_one_graph(gen):
    a, b = torch.randn(200, 8, generator=gen), torch.randn(200, 8, generator=gen).exp()
    fm = _fit(a, b).fold(0.7)
    x = torch.randn(2, 5, 8, generator=gen)
    compiled = torch.compile(fm.apply_last, fullgraph=True, backend="eager")
    assert_close(compiled(x), fm.apply_last(x), rtol=0, atol=0)
