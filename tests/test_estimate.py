"""Known answers for every estimator of `actsteer.estimate` (ACT_SPEC.md sections 2-3)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import actsteer

METHODS = ["linear-act", "mean-act", "gaussian-ot", "actadd", "caa", "itic", "aura"]

# UnitMap stores float32; comparisons against float64 closed forms use float32 tolerances.
F32 = {"rtol": 1e-6, "atol": 1e-6}


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def gaussians(gen):
    """Source N(mu_s, sigma_s^2) and target N(mu_t, sigma_t^2) per unit, 4000 rows each, float64."""
    mu_s, sigma_s = torch.tensor([0.0, 1.0, -2.0, 5.0]), torch.tensor([1.0, 0.5, 2.0, 3.0])
    mu_t, sigma_t = torch.tensor([3.0, -1.0, 0.0, 5.0]), torch.tensor([2.0, 0.5, 0.25, 1.0])
    n = 4000
    source = mu_s + sigma_s * torch.randn(n, 4, generator=gen, dtype=torch.float64)
    target = mu_t + sigma_t * torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return source, target, sigma_t / sigma_s


def _ml_act_linear_proj(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """apple/ml-act `LinearProj.optimize(x=sorted_src, y=sorted_dst)`, restated without its 1e-8 noise."""
    m_x, m_y = x.mean(0), y.mean(0)
    w = ((x - m_x) * (y - m_y)).sum(0) / ((x - m_x) ** 2).sum(0)
    return w, m_y - w * m_x


def _brute_force_auroc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """P(a > b) + P(a == b) / 2 over all (source, target) pairs, per unit."""
    greater = (a[:, None, :] > b[None, :, :]).mean(axis=(0, 1))
    ties = (a[:, None, :] == b[None, :, :]).mean(axis=(0, 1))
    return greater + 0.5 * ties


# Linear-AcT ---------------------------------------------------------------------------------------


def test_estimate_linear_act_gaussian_omega_is_std_ratio(gaussians):
    source, target, ratio = gaussians
    m = actsteer.estimate(source, target, method="linear-act", support="all")
    assert m.omega.dtype == torch.float32 and m.omega.shape == (4,)
    assert_close(m.omega, ratio.float(), rtol=0.05, atol=0.0)


def test_estimate_linear_act_transported_mean_is_target_mean(gaussians):
    source, target, _ = gaussians
    m = actsteer.estimate(source, target, method="linear-act", support="all")
    moved = m(source)
    assert_close(moved.mean(0), target.mean(0), rtol=0.0, atol=1e-5)
    # the closed form beta = m_b - omega * m_a, with the sample means
    assert_close(m.beta.double(), target.mean(0) - m.omega.double() * source.mean(0), rtol=0.0, atol=1e-5)


def test_estimate_linear_act_equal_counts_match_lstsq_and_reference(gen):
    n, d = 257, 5
    source = torch.randn(n, d, generator=gen, dtype=torch.float64) ** 3  # skewed, heavy-tailed
    target = torch.rand(n, d, generator=gen, dtype=torch.float64).exp() - 2.0
    m = actsteer.estimate(source, target, method="linear-act", support="all")

    xs, ys = np.sort(source.numpy(), axis=0), np.sort(target.numpy(), axis=0)
    lstsq = np.empty((2, d))
    for j in range(d):
        design = np.stack([xs[:, j], np.ones(n)], axis=1)
        lstsq[:, j] = np.linalg.lstsq(design, ys[:, j], rcond=None)[0]
    w_ref, b_ref = _ml_act_linear_proj(xs, ys)

    assert_close(torch.from_numpy(lstsq[0]), torch.from_numpy(w_ref), rtol=1e-9, atol=1e-12)
    assert_close(m.omega, torch.from_numpy(w_ref).float(), **F32)
    assert_close(m.beta, torch.from_numpy(b_ref).float(), **F32)
    assert_close(m.beta, torch.from_numpy(lstsq[1]).float(), **F32)


def test_estimate_linear_act_affine_target_is_recovered_exactly(gen):
    source = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    perm = torch.randperm(64, generator=gen)  # row order must not matter: each unit is sorted
    target = (torch.tensor([2.0, 0.5, 1.0]) * source + torch.tensor([1.0, -3.0, 0.0]))[perm]
    m = actsteer.estimate(source, target, method="linear-act", support="all")
    assert_close(m.omega, torch.tensor([2.0, 0.5, 1.0]), **F32)
    assert_close(m.beta, torch.tensor([1.0, -3.0, 0.0]), **F32)


def test_estimate_linear_act_unequal_counts_keep_target_mean(gen):
    source = torch.randn(37, 3, generator=gen, dtype=torch.float64)
    target = 4.0 + 3.0 * torch.randn(91, 3, generator=gen, dtype=torch.float64)
    m = actsteer.estimate(source, target, method="linear-act", support="all")
    assert torch.isfinite(m.omega).all() and (m.omega > 0).all()
    assert_close(m(source).mean(0), target.mean(0), rtol=0.0, atol=1e-5)


def test_estimate_linear_act_unequal_counts_exact_affine_target(gen):
    # n != m with the target an exact affine image of the source replicated (m = 3n): the exact monotone
    # coupling pairs every source atom with its three images, so the slope is recovered exactly.
    n = 40
    source = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    target = torch.tensor([3.0, 0.25]) * source.repeat(3, 1) + torch.tensor([-1.0, 2.0])
    est = actsteer.estimate(source, target, method="linear-act", support="all")
    assert_close(est.omega, torch.tensor([3.0, 0.25]), **F32)
    assert_close(est.beta, torch.tensor([-1.0, 2.0]), **F32)


def test_estimate_linear_act_unequal_counts_match_replicated_equal_counts(gen):
    # The exact 1-D OT coupling of n = 4 and m = 6 equally weighted samples is the equal-count pairing
    # of the samples replicated to lcm(4, 6) = 12 rows (source x3, target x2). Duplicating every row
    # changes neither empirical distribution, so the fit must not change either.
    source = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    target = 1.0 + 2.0 * torch.randn(6, 3, generator=gen, dtype=torch.float64)
    direct = actsteer.estimate(source, target, method="linear-act", support="all")
    replicated = actsteer.estimate(source.repeat(3, 1), target.repeat(2, 1), method="linear-act", support="all")
    assert_close(direct.omega, replicated.omega, **F32)
    assert_close(direct.beta, replicated.beta, **F32)


def test_estimate_linear_act_duplicated_rows_on_both_sides_change_nothing(gen):
    source = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    target = 2.0 - torch.randn(30, 3, generator=gen, dtype=torch.float64) ** 2
    once = actsteer.estimate(source, target, method="linear-act", support="observed")
    twice = actsteer.estimate(source.repeat(2, 1), target.repeat(2, 1), method="linear-act", support="observed")
    for field in ("omega", "beta", "lo", "hi", "target_lo", "target_hi"):
        assert_close(getattr(twice, field), getattr(once, field), **F32)


def test_estimate_linear_act_omega_is_never_negative(gen):
    source = torch.randn(50, 64, generator=gen, dtype=torch.float64)
    target = -source + 1e-3 * torch.randn(50, 64, generator=gen, dtype=torch.float64)  # anti-correlated rows
    target[:, :8] = 7.0  # a constant target: omega 0, everything maps to 7
    m = actsteer.estimate(source, target, method="linear-act", support="all")
    assert (m.omega >= 0).all()
    assert_close(m.omega[:8], torch.zeros(8), rtol=0.0, atol=1e-7)
    assert_close(m(source)[:, :8], torch.full((50, 8), 7.0, dtype=torch.float64), rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("method", ["linear-act", "gaussian-ot"])
@pytest.mark.parametrize("noise", [0.0, 1e-8])
def test_estimate_dead_source_unit_is_a_pure_shift(gen, caplog, method, noise):
    source = torch.randn(100, 3, generator=gen, dtype=torch.float64)
    source[:, 1] = 5.0 + noise * torch.randn(100, generator=gen, dtype=torch.float64)  # the reference gets omega ~ 1e6
    target = 2.0 * torch.randn(100, 3, generator=gen, dtype=torch.float64) - 1.0
    with caplog.at_level(logging.WARNING, logger="actsteer.core.estimators"):
        m = actsteer.estimate(source, target, method=method, support="all")
    assert torch.isfinite(m.omega).all() and torch.isfinite(m.beta).all()
    assert m.dead.tolist() == [False, True, False]
    assert m.omega[1].item() == 1.0
    assert_close(m.beta[1].double(), target[:, 1].mean() - source[:, 1].mean(), **F32)
    assert any(r.levelname == "WARNING" and "1 of 3 units" in r.getMessage() for r in caplog.records)


def test_estimate_no_dead_units_logs_no_warning(gaussians, caplog):
    source, target, _ = gaussians
    with caplog.at_level(logging.WARNING, logger="actsteer.core.estimators"):
        m = actsteer.estimate(source, target, method="linear-act")
    assert not m.dead.any()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# Other estimators ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["mean-act", "caa"])
def test_estimate_mean_shift_methods_are_mean_difference(gen, method):
    source = torch.randn(20, 4, generator=gen, dtype=torch.float64) * 3.0
    target = torch.rand(33, 4, generator=gen, dtype=torch.float64) + 2.0
    m = actsteer.estimate(source, target, method=method, support="all")
    assert torch.equal(m.omega, torch.ones(4))
    assert_close(m.beta, (target.mean(0) - source.mean(0)).float(), **F32)


def test_estimate_gaussian_ot_is_unbiased_std_ratio(gen):
    source = torch.randn(5, 4, generator=gen, dtype=torch.float64) + 1.0  # n != m: the ddof matters
    target = 3.0 * torch.randn(9, 4, generator=gen, dtype=torch.float64) - 2.0
    m = actsteer.estimate(source, target, method="gaussian-ot", support="all")
    a, b = source.numpy(), target.numpy()
    omega = b.std(axis=0, ddof=1) / a.std(axis=0, ddof=1)
    assert_close(m.omega, torch.from_numpy(omega).float(), **F32)
    assert_close(m.beta, torch.from_numpy(b.mean(0) - omega * a.mean(0)).float(), **F32)


@pytest.mark.parametrize("pair", [0, 2, -1])
def test_estimate_actadd_is_difference_of_one_pair(gen, pair):
    source = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    target = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    m = actsteer.estimate(source, target, method="actadd", support="all", pair=pair)
    assert torch.equal(m.omega, torch.ones(3))
    assert_close(m.beta, (target[pair] - source[pair]).float(), **F32)


def test_estimate_actadd_pair_out_of_range_raises(gen):
    source, target = torch.randn(4, 3, generator=gen), torch.randn(6, 3, generator=gen)
    with pytest.raises(ValueError, match="`pair=4` is out of range for 4 source and 6 target rows"):
        actsteer.estimate(source, target, method="actadd", pair=4)


def test_estimate_itic_shifts_along_separating_direction_by_projected_std(gen):
    u = torch.tensor([1.0, -1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    u = u / u.norm()
    source = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    target = torch.randn(200, 6, generator=gen, dtype=torch.float64) + 3.0 * u
    m = actsteer.estimate(source, target, method="itic", support="all")
    assert torch.equal(m.omega, torch.ones(6))
    beta = m.beta.double()
    direction = beta / beta.norm()
    assert direction @ u > 0.99  # parallel, and pointing from source to target
    projected_std = (torch.cat([source, target]) @ direction).std()
    assert_close(beta.norm(), projected_std, rtol=1e-6, atol=0.0)


def test_estimate_aura_dampens_by_auroc_with_ties(gen):
    # small integers: many ties between source and target values
    source = torch.randint(0, 5, (40, 6), generator=gen).double()
    target = torch.randint(0, 5, (30, 6), generator=gen).double()
    source[:, 0] += 2.0  # fires more for the source: auroc > 0.5
    source[:, 1] -= 2.0  # fires less: auroc < 0.5, left alone
    target[:, 2] = source[:30, 2]  # same values: auroc ~ 0.5
    source[:, 3], target[:, 3] = 1.0, 1.0  # all ties: auroc exactly 0.5
    m = actsteer.estimate(source, target, method="aura", support="all")

    auroc = torch.from_numpy(_brute_force_auroc(source.numpy(), target.numpy()))
    assert auroc[0] > 0.5 and auroc[1] < 0.5 and auroc[3] == 0.5
    expected = torch.where(auroc > 0.5, 1 - 2 * (auroc - 0.5), torch.ones_like(auroc))
    assert_close(m.omega, expected.float(), **F32)
    assert torch.equal(m.beta, torch.zeros(6))
    assert m.omega[1].item() == 1.0 and m.omega[3].item() == 1.0


# Support ------------------------------------------------------------------------------------------


def test_estimate_support_observed_is_min_max(gen):
    source, target = torch.randn(30, 4, generator=gen), torch.randn(20, 4, generator=gen) + 1
    m = actsteer.estimate(source, target, support="observed")
    assert torch.equal(m.lo, source.min(0).values) and torch.equal(m.hi, source.max(0).values)
    assert torch.equal(m.target_lo, target.min(0).values) and torch.equal(m.target_hi, target.max(0).values)
    assert m.has_support


@pytest.mark.parametrize("method", METHODS)
def test_estimate_support_all_is_infinite(gen, method):
    source, target = torch.randn(30, 4, generator=gen), torch.randn(20, 4, generator=gen) + 1
    m = actsteer.estimate(source, target, method=method, support="all")
    inf = torch.full((4,), float("inf"))
    assert torch.equal(m.lo, -inf) and torch.equal(m.hi, inf)
    assert torch.equal(m.target_lo, -inf) and torch.equal(m.target_hi, inf)
    assert not m.has_support


@pytest.mark.parametrize("band", [(0.05, 0.95), [0.0, 0.5], (0.01, 1.0)])
def test_estimate_support_quantile_band_matches_torch_quantile(gen, band):
    source = torch.randn(101, 4, generator=gen, dtype=torch.float64)
    target = torch.randn(57, 4, generator=gen, dtype=torch.float64).exp()
    m = actsteer.estimate(source, target, support=band)
    qs = torch.tensor(list(band), dtype=torch.float64)
    lo, hi = torch.quantile(source, qs, dim=0)
    target_lo, target_hi = torch.quantile(target, qs, dim=0)
    assert_close(m.lo, lo.float(), **F32)
    assert_close(m.hi, hi.float(), **F32)
    assert_close(m.target_lo, target_lo.float(), **F32)
    assert_close(m.target_hi, target_hi.float(), **F32)


# Inputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_estimate_every_method_returns_float32_unit_map(gen, method):
    source = torch.randn(12, 5, generator=gen)
    target = torch.randn(15, 5, generator=gen) + 1.0
    m = actsteer.estimate(source, target, method=method)
    assert isinstance(m, actsteer.UnitMap) and m.dim == 5
    for field in ("omega", "beta", "lo", "hi", "target_lo", "target_hi"):
        value = getattr(m, field)
        assert value.dtype == torch.float32 and value.shape == (5,)
    assert torch.isfinite(m.omega).all() and torch.isfinite(m.beta).all()


def test_estimate_runs_in_float64_and_leaves_inputs_alone(gen):
    source = torch.randn(50, 3, generator=gen).bfloat16()
    target = (torch.randn(50, 3, generator=gen) * 2 + 1).bfloat16()
    before_s, before_t = source.clone(), target.clone()
    low = actsteer.estimate(source, target, method="gaussian-ot")
    high = actsteer.estimate(source.double(), target.double(), method="gaussian-ot")
    assert torch.equal(source, before_s) and torch.equal(target, before_t)
    for field in ("omega", "beta", "lo", "hi"):
        assert torch.equal(getattr(low, field), getattr(high, field))


def test_estimate_method_aliases_resolve(gen):
    source, target = torch.randn(10, 2, generator=gen), torch.randn(10, 2, generator=gen) + 1
    canonical = actsteer.estimate(source, target, method="linear-act")
    for alias in ("Linear-AcT", "linear_ot", " LINEAR "):
        assert torch.equal(actsteer.estimate(source, target, method=alias).omega, canonical.omega)


@pytest.mark.parametrize("which", ["source", "target"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_estimate_nonfinite_input_rejected_naming_unit_count(gen, which, bad):
    data = {"source": torch.randn(8, 5, generator=gen), "target": torch.randn(8, 5, generator=gen)}
    data[which][3, 1] = bad
    data[which][0, 4] = bad
    with pytest.raises(ValueError, match=rf"`{which}` contains NaN/Inf in 2 of 5 units \(units 1, 4\)"):
        actsteer.estimate(data["source"], data["target"])


@pytest.mark.parametrize("rows", [(1, 5), (5, 1)])
def test_estimate_fewer_than_two_rows_rejected(gen, rows):
    source, target = torch.randn(rows[0], 3, generator=gen), torch.randn(rows[1], 3, generator=gen)
    with pytest.raises(ValueError, match="needs at least 2 rows"):
        actsteer.estimate(source, target)


def test_estimate_width_mismatch_rejected(gen):
    with pytest.raises(ValueError, match="`source` has 3 units but `target` has 4"):
        actsteer.estimate(torch.randn(5, 3, generator=gen), torch.randn(5, 4, generator=gen))


def test_estimate_bad_shape_and_dtype_rejected(gen):
    with pytest.raises(ValueError, match=r"must have shape \(n, D\)"):
        actsteer.estimate(torch.randn(5, generator=gen), torch.randn(5, generator=gen))
    with pytest.raises(TypeError, match="floating point"):
        actsteer.estimate(torch.ones(5, 2, dtype=torch.long), torch.zeros(5, 2, dtype=torch.long))


def test_estimate_unknown_method_rejected_with_choices(gen):
    source, target = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    with pytest.raises(ValueError, match="Unknown method 'wasserstein'; choose one of: linear-act, mean-act"):
        actsteer.estimate(source, target, method="wasserstein")


@pytest.mark.parametrize("support", ["everywhere", (0.9, 0.1), (0.1,), (-0.1, 0.5), (0.5, 1.5)])
def test_estimate_bad_support_rejected(gen, support):
    source, target = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    with pytest.raises(ValueError, match="support"):
        actsteer.estimate(source, target, support=support)


def test_estimate_itic_inseparable_sites_get_a_zero_shift(caplog):
    same = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    with caplog.at_level("WARNING"):
        m = actsteer.estimate(same, same.clone(), method="itic")
    assert torch.equal(m.beta, torch.zeros(4)) and torch.equal(m.omega, torch.ones(4))
    assert "no direction" in caplog.text
