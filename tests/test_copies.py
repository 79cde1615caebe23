"""Copies and pickles of steered models (issue 21, items 1 and 7): a copy is plain unless steered itself, and then
steered at every call like any model; the original's steering is unaffected; nothing of actsteer piles up.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import types

import pytest
import torch

import actsteer
from actsteer.core.dispatch import Hook

D = 64  # the tiny models' hidden size


def _transport(model: torch.nn.Module, shift: float, *, seed: int = 0) -> actsteer.Transport:
    """An all-reals map on every norm of a tiny LM: a clear, deterministic change of the logits."""
    g = torch.Generator().manual_seed(seed)
    sites = [n for n, _ in model.named_modules() if n.endswith("norm") or n.endswith("layernorm")]
    return actsteer.Transport({
        s: actsteer.UnitMap(1 + 0.2 * torch.rand(D, generator=g), shift * torch.randn(D, generator=g)) for s in sites
    })


def _actsteer_hooks(model: torch.nn.Module) -> int:
    return sum(isinstance(h, Hook) for m in model.modules()
               for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


def _markers(model: torch.nn.Module) -> int:
    return sum("forward" in m.__dict__ for m in model.modules())


@pytest.fixture
def lm(tiny_lm_factory):
    model, tok = tiny_lm_factory("llama")
    ids = tok(["hello there", "a longer prompt for padding"], return_tensors="pt", padding=True)
    return model, ids, _transport(model, 1.0, seed=1), _transport(model, 2.0, seed=2)


def _logits(model, ids):
    with torch.no_grad():
        return model(**ids).logits


def _reference(model, ids, transport):
    """What a fresh copy steered by ``transport`` alone gives (no other steering anywhere)."""
    fresh = copy.deepcopy(model)
    with actsteer.steer(fresh, transport):
        return _logits(fresh, ids)


@pytest.mark.parametrize("made", ["under-attach", "inside-steer"])
def test_copies_a_copy_of_a_steered_model_is_steered_at_every_call_by_its_own_steering(lm, made):
    model, ids, ta, tb = lm
    plain, only_a, only_b = _logits(model, ids), _reference(model, ids, ta), _reference(model, ids, tb)
    with contextlib.ExitStack() as original:  # the original stays steered while the copy is used
        if made == "under-attach":
            original.callback(actsteer.attach(model, ta).remove)
        else:
            original.enter_context(actsteer.steer(model, ta))
        clone = copy.deepcopy(model)
        with actsteer.steer(clone, tb):
            calls = [_logits(clone, ids) for _ in range(3)]
        assert all(torch.equal(c, only_b) for c in calls)  # every call, not only the first
        assert torch.equal(_logits(clone, ids), plain)  # plain again after its own block
        assert torch.equal(_logits(model, ids), only_a)  # the original's steering is unaffected
    assert torch.equal(_logits(model, ids), plain)
    assert _actsteer_hooks(clone) == 0 and _actsteer_hooks(model) == 0
    assert _markers(clone) == 0 and _markers(model) == 0


def test_copies_attach_on_a_copy_steers_every_generated_token(lm, tiny_lm_factory):
    model, ids, ta, tb = lm
    fresh = copy.deepcopy(model)
    with torch.no_grad(), actsteer.steer(fresh, tb):
        expected = fresh.generate(**ids, max_new_tokens=6, do_sample=False)
    handle = actsteer.attach(model, ta)
    try:
        clone = copy.deepcopy(model)
        own = actsteer.attach(clone, tb)
        with torch.no_grad():
            assert torch.equal(clone.generate(**ids, max_new_tokens=6, do_sample=False), expected)
        own.remove()
        actsteer.enable_steering(clone)
        with torch.no_grad():
            assert torch.equal(clone.generate(**ids, max_new_tokens=6, do_sample=False, steering=tb), expected)
    finally:
        handle.remove()


def test_copies_the_original_steering_ending_leaves_the_copy_clean(lm):
    model, ids, ta, _ = lm
    plain = _logits(model, ids)
    handle = actsteer.attach(model, ta)
    clone = copy.deepcopy(model)  # never called while the original is steered
    assert _markers(clone) > 0  # carries the original's (inert) dispatcher and compile markers for now ...
    handle.remove()
    assert _actsteer_hooks(clone) == 0 and _markers(clone) == 0  # ... and loses both with the original's steering
    assert torch.equal(_logits(clone, ids), plain)


def test_copies_a_copys_first_call_removes_the_inherited_hooks_and_markers(lm):
    model, ids, ta, _ = lm
    with actsteer.steer(model, ta):
        clone = copy.deepcopy(model)
        _logits(clone, ids)
        assert _actsteer_hooks(clone) == 0 and _markers(clone) == 0


def _pickle_cycle(model: torch.nn.Module, transport: actsteer.Transport) -> torch.nn.Module:
    handle = actsteer.attach(model, transport)
    try:
        return pickle.loads(pickle.dumps(model))
    finally:
        handle.remove()


def _noop_hooks(model: torch.nn.Module) -> int:
    return sum(isinstance(h, types.MethodType) for m in model.modules()
               for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


def test_copies_pickling_a_steered_model_again_and_again_does_not_pile_up_hooks(lm):
    model, ids, ta, _ = lm
    plain = _logits(model, ids)
    once = _pickle_cycle(model, ta)
    counts = [_noop_hooks(once)]
    current = once
    for _ in range(3):
        current = _pickle_cycle(current, ta)
        counts.append(_noop_hooks(current))
    assert counts[0] > 0 and counts == [counts[0]] * 4  # what one pickle writes, never more
    assert torch.equal(_logits(current, ids), plain)
    with actsteer.steer(current, ta):  # a pickled model can be steered again; its no-op hooks are dropped
        assert torch.equal(_logits(current, ids), _reference(model, ids, ta))
    assert _noop_hooks(current) == 0


def _flux_transport(pipe, shift: float) -> actsteer.Transport:
    g = torch.Generator().manual_seed(int(shift * 10))
    sites = ["transformer.transformer_blocks.0:1", "transformer.single_transformer_blocks.0:1", "transformer.norm_out"]
    return actsteer.Transport({s: actsteer.UnitMap(1 + 0.3 * torch.rand(32, generator=g), shift * torch.randn(32, generator=g))
                               for s in sites})


def test_copies_a_deep_copied_pipeline_is_steered_like_the_original(flux_pipe):
    from support.tiny_pipelines import flux_call_kwargs

    pipe = flux_pipe
    ta, tb = _flux_transport(pipe, 0.5), _flux_transport(pipe, 1.5)

    def image(p, **steering):
        return p("a cat", **flux_call_kwargs(seed=3), **steering).images

    plain = image(pipe)
    with actsteer.steer(pipe, tb, steps=(0.0, 0.5)):
        expected = image(pipe)
    with actsteer.steer(pipe, ta):
        only_a = image(pipe)
    assert not torch.equal(expected, plain)
    handle = actsteer.attach(pipe, ta)
    try:
        clone = copy.deepcopy(pipe)
        with actsteer.steer(clone, tb, steps=(0.0, 0.5)):
            assert torch.equal(image(clone), expected)
            assert torch.equal(image(clone), expected)
        assert torch.equal(image(clone), plain)
        assert torch.equal(image(pipe), only_a)
    finally:
        handle.remove()
    assert torch.equal(image(pipe), plain)


@pytest.fixture
def flux_pipe():
    from support.tiny_pipelines import make_flux_pipeline

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_flux_pipeline()
    torch.set_num_threads(n)
