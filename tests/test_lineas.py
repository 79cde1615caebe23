"""LinEAS (`actsteer.core.lineas`): known answers on toy models, the proximal steps, and the loss."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import actsteer
from actsteer.core.lineas import LineasConfig, fit_lineas
from actsteer.core.grad_scope import grad_enabled
from actsteer.core.lineas_parts import ProximalAdam, W2Loss, coupling, steer_affine
from actsteer.eval.fidelity import wasserstein_1d

D = 4
MU = torch.tensor([1.0, -2.0, 0.5, 3.0])
SIGMA = torch.tensor([2.0, 0.5, 1.0, 1.5])


@pytest.fixture
def toy():
    """x -> site "0" (identity) -> fixed invertible mixing W -> site "2" (identity).

    Source inputs ~ N(0, I), target inputs ~ N(MU, SIGMA^2) per unit: the exact answer is the affine OT map
    ``omega = SIGMA``, ``beta = MU`` at site "0", after which site "2" already sees the target's distribution
    (W T(a) ~ W y) and needs nothing.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(D, D, bias=False), torch.nn.Identity())
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(D, D) + 2 * torch.eye(D))
    model.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    source = list(torch.randn(256, D, generator=g))
    target = list(MU + SIGMA * torch.randn(256, D, generator=g))
    return model, source, target


def _run(model):
    return lambda items, ctx: model(torch.stack(items))


def test_lineas_toy_recovers_the_known_maps(toy):
    model, source, target = toy
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = fit_lineas(model, ["0", "2"], source, target, run=_run(model), support="all", progress=False,
                   config=LineasConfig(steps=300, l1=0.0, group=0.0))
    assert t.method == "lineas" and t.mode == "end-to-end"
    assert_close(t["0"].omega, SIGMA, rtol=0.1, atol=0.0)
    assert_close(t["0"].beta, MU, rtol=0.0, atol=0.4)
    # and the steered outputs match the target's per unit, on held-out inputs
    g = torch.Generator().manual_seed(7)
    held_s, held_t = torch.randn(2000, D, generator=g), MU + SIGMA * torch.randn(2000, D, generator=g)
    with torch.no_grad():
        out_t = model(held_t)
        with actsteer.steer(model, t, 1.0):
            out_s = model(held_s)
        plain = model(held_s)
        sequential = actsteer.core.fit(model, ["0", "2"], source, target, run=_run(model), support="all", progress=False)
        with actsteer.steer(model, sequential, 1.0):
            out_seq = model(held_s)
    std = out_t.double().std(0)
    w_after = wasserstein_1d(out_s.double(), out_t.double()) / std
    w_before = wasserstein_1d(plain.double(), out_t.double()) / std
    w_sequential = wasserstein_1d(out_seq.double(), out_t.double()) / std  # 0.13-0.24 here: the sampling floor
    assert (w_before > 0.5).all() and (w_after < 0.3).all(), (w_after, w_before)
    assert (w_after < 1.25 * w_sequential + 0.02).all(), (w_after, w_sequential)
    # the model was used, never changed: no weight moved and no gradient was left on it
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n


def test_lineas_group_penalty_switches_off_a_useless_site(toy):
    model, source, target = toy
    t = fit_lineas(model, ["0", "2"], source, target, run=_run(model), support="all", progress=False,
                   config=LineasConfig(steps=200, l1=0.0, group=5.0))
    assert t.sites == ["0"]
    assert t.extra["fit"]["sites_kept"] == 1 and t.extra["fit"]["sites_given"] == 2


def test_lineas_l1_keeps_only_the_units_that_pay():
    """Only unit 0 differs between source and target: L1 leaves exactly alone the units whose standardized mean
    difference is below l1 / 4 (here 0.5: sampling noise between two N(0, 1) samples is ~0.13)."""
    model = torch.nn.Sequential(torch.nn.Identity())
    g = torch.Generator().manual_seed(0)
    source = list(torch.randn(128, D, generator=g))
    target = list(torch.randn(128, D, generator=g) + torch.tensor([3.0, 0.0, 0.0, 0.0]))
    t = fit_lineas(model, ["0"], source, target, run=_run(model), support="all", progress=False,
                   config=LineasConfig(steps=150, l1=2.0, group=0.0))
    m = t["0"]
    assert float(m.beta[0]) > 2.0
    assert m.omega[1:].eq(1).all() and m.beta[1:].eq(0).all()


def test_lineas_refuses_when_everything_is_pruned(toy):
    model, source, target = toy
    with pytest.raises(ValueError, match="lower them"):
        fit_lineas(model, ["0"], source[:16], target[:16], run=_run(model), progress=False,
                   config=LineasConfig(steps=5, group=1e6))


def test_lineas_observed_support_is_the_source_range_reaching_the_site(toy):
    model, source, target = toy
    t = fit_lineas(model, ["0"], source, target, run=_run(model), progress=False, config=LineasConfig(steps=20))
    stacked = torch.stack(source)
    assert_close(t["0"].lo, stacked.min(0).values)
    assert_close(t["0"].hi, stacked.max(0).values)
    assert t.support == "observed"


def test_lineas_config_refuses_bad_values():
    with pytest.raises(ValueError, match="steps"):
        LineasConfig(steps=0)
    with pytest.raises(ValueError, match="l1"):
        LineasConfig(l1=-1.0)
    with pytest.raises(ValueError, match="held_out"):
        LineasConfig(held_out=1.0)


def test_w2_loss_is_the_exact_normalised_squared_distance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 3, generator=g), 2 + 3 * torch.randn(5, 3, generator=g)
    ia, ib, w = coupling(7, 5)
    sa, sb = a.sort(0).values, b.sort(0).values
    expected = ((w.unsqueeze(1) * (sa[ia] - sb[ib]).double() ** 2).sum(0) / b.double().var(0)).mean()
    assert_close(W2Loss(b)(a).double(), expected, rtol=1e-5, atol=1e-6)
    assert float(W2Loss(b)(b)) == 0.0


def test_steer_affine_is_the_unit_map_and_keeps_dtype():
    theta = torch.tensor([[0.5, -0.25], [1.0, 2.0]])
    center, scale = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.5])
    x = torch.randn(3, 4, 2)
    out = steer_affine(x, theta, center, scale)
    omega, beta = 1 + theta[0], theta[1] * scale - theta[0] * center
    assert_close(out, actsteer.UnitMap(omega, beta)(x))
    assert steer_affine(x.bfloat16(), theta, center, scale).dtype == torch.bfloat16


def test_proximal_adam_converges_to_the_lasso_solutions():
    """On ``0.5 ||theta - t||^2`` plus the penalties the fixed points are the closed-form lasso answers: L1 soft-
    thresholds each coordinate by its coefficient, the group penalty zeroes a whole group whose norm is too small."""
    t = {"a": torch.tensor([[0.05, 1.0]]), "b": torch.tensor([[-0.5, 2.0]])}
    theta = {s: torch.zeros_like(v) for s, v in t.items()}
    opt = ProximalAdam(theta, lr=0.05, l1=0.8, group=0.0)  # 4 parameters: 0.2 per coordinate
    for step in range(600):
        opt.step({s: theta[s] - t[s] for s in t}, lr_factor=1.0 if step < 300 else 0.1)
    assert theta["a"][0, 0] == 0.0
    assert_close(theta["a"][0, 1], torch.tensor(0.8), rtol=0, atol=0.02)
    assert_close(theta["b"], torch.tensor([[-0.3, 1.8]]), rtol=0, atol=0.02)
    t = {"a": torch.tensor([[1.0, 1.0]]), "b": torch.tensor([[0.05, -0.05]])}
    theta = {s: torch.zeros_like(v) for s, v in t.items()}
    opt = ProximalAdam(theta, lr=0.05, l1=0.0, group=0.5)  # 2 sites of 2: 0.25 / sqrt(2) per site norm
    for step in range(600):
        opt.step({s: theta[s] - t[s] for s in t}, lr_factor=1.0 if step < 300 else 0.1)
    assert theta["b"].eq(0).all()
    assert_close(theta["a"], t["a"] * (1 - 0.25 / 2**0.5 / 2**0.5), rtol=0, atol=0.02)


def test_grad_enabled_inside_no_grad_and_inference_mode_hosts():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Identity())
    theta = torch.zeros(2, requires_grad=True)
    seen = []
    model[1].register_forward_hook(lambda m, a, out: seen.append(torch.is_grad_enabled()) or out + theta)
    with grad_enabled(model, ["1"]):
        with torch.inference_mode():
            x = torch.ones(1, 2)  # an inference tensor, as ComfyUI's inputs are
            out = model(x)
        assert out.requires_grad
        with torch.no_grad():
            assert model(torch.ones(1, 2)).requires_grad
    assert seen == [True, True]
    assert not model._forward_pre_hooks and len(model._forward_hooks) == 0


def test_grad_enabled_backpropagates_through_weights_made_in_inference_mode():
    """ComfyUI loads weights under torch.inference_mode(): autograd cannot save them, so they are used through
    ordinary copies while the block runs; the module keeps its own tensors and requires_grad flags afterwards."""
    with torch.inference_mode():
        model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
        x = torch.randn(4, 3)
    originals = [p for p in model.parameters()]
    theta = torch.zeros(3, requires_grad=True)
    model[0].register_forward_hook(lambda m, a, out: out + theta)
    with grad_enabled(model, ["0"]):
        with torch.inference_mode():
            out = model(x)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), [theta])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert [p for p in model.parameters()] == originals and all(p.requires_grad for p in model.parameters())
    assert all(p.is_inference() and p.grad is None for p in model.parameters())
