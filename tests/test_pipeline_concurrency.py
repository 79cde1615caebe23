"""Concurrent diffusers calls (issue 21, item 5). One pipeline object cannot run two calls at once (its scheduler
holds the run's state; that fails without steering too); pipelines that share every component but the scheduler
can, and each call's steering, step window included, is its own, whether it is request-scoped (`steer`) or
model-wide (`attach` with ``steps=``).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from support.tiny_pipelines import flux_call_kwargs, make_flux_pipeline

import actsteer

SITES = ["transformer.transformer_blocks.0:1", "transformer.single_transformer_blocks.0:1", "transformer.norm_out"]


@pytest.fixture(scope="module")
def flux():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_flux_pipeline()
    torch.set_num_threads(n)


def _transport(shift: float, seed: int) -> actsteer.Transport:
    g = torch.Generator().manual_seed(seed)
    return actsteer.Transport({s: actsteer.UnitMap(1 + 0.3 * torch.rand(32, generator=g), shift * torch.randn(32, generator=g))
                               for s in SITES})


# The parts of a pipeline that hold a call's state. The tokenizers too: a fast tokenizer shared by threads switches its
# padding settings between the pipeline's "max_length" and "longest" calls, so a concurrent prompt could be encoded
# with the other call's padding (seen without any steering: four plain siblings sharing tokenizers differed by 7e-3
# in about one run in ten).
OWN = ("scheduler", "tokenizer", "tokenizer_2")


def sibling(pipe):
    """The README's pattern: a pipeline sharing every component of ``pipe`` (no copy of any weight) but with a
    scheduler and tokenizers of its own (`OWN`), so that calls on the two can run at the same time."""
    own = {k: copy.deepcopy(v) for k, v in pipe.components.items() if k in OWN}
    twin = type(pipe)(**{**pipe.components, **own})
    twin.set_progress_bar_config(disable=True)
    return twin


def _image(pipe, steps: int, seed: int, barrier: threading.Barrier | None = None, **kw):
    def in_lockstep(p, i, t, tensors):  # every thread finishes step i before any starts step i + 1
        barrier.wait(timeout=60)
        return tensors

    extra = {"callback_on_step_end": in_lockstep} if barrier is not None else {}
    return pipe("a cat", **flux_call_kwargs(seed=seed, num_inference_steps=steps), **extra, **kw).images


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding: concurrent CPU calls may sum in another order (3e-7 seen here, also without
    steering); the images compared here differ from each other by 1e-2 or more."""
    return bool((a - b).abs().max() < 1e-4)


def _run_together(jobs: dict[str, callable]) -> dict[str, torch.Tensor]:
    results, errors = {}, []
    n_threads = torch.get_num_threads()

    def run(name, job):
        torch.set_num_threads(n_threads)  # per thread in OpenMP: a new thread would sum with the default count
        try:
            results[name] = job()
        except BaseException as err:  # reported below, not lost in the thread
            errors.append((name, err))

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_pipeline_concurrency_request_scoped_windows_are_per_call(flux):
    ta, tb = _transport(0.8, 1), _transport(-0.8, 2)
    cases = {  # name: (transport or None, window)
        "early-a": (ta, (0.0, 0.5)), "late-a": (ta, (0.5, 1.0)), "all-b": (tb, "all"), "plain": (None, None),
    }
    pipes = {name: sibling(flux) for name in cases}

    def job(name, barrier=None):
        transport, window = cases[name]
        if transport is None:
            return _image(pipes[name], 4, seed=7, barrier=barrier)
        with actsteer.steer(pipes[name], transport, steps=window):
            return _image(pipes[name], 4, seed=7, barrier=barrier)

    solo = {name: job(name) for name in cases}
    assert all((solo[a] - solo[b]).abs().max() > 1e-2 for a in cases for b in cases if a < b)  # four images
    barrier = threading.Barrier(len(cases))
    for _ in range(2):
        together = _run_together({name: (lambda n=name: job(n, barrier)) for name in cases})
        for name in cases:
            assert _same(together[name], solo[name]), (name, float((together[name] - solo[name]).abs().max()))


def test_pipeline_concurrency_model_wide_window_follows_each_calls_own_schedule(flux):
    """attach(pipe, steps=...) steers the shared modules for every pipeline using them; each call's window is
    located in ITS OWN schedule (4 or 6 steps here), not in the schedule of the pipeline passed to attach."""
    t = _transport(0.8, 3)
    four, six = sibling(flux), sibling(flux)
    expected = {}
    for name, pipe, steps in (("four", four, 4), ("six", six, 6)):
        with actsteer.steer(pipe, t, steps=(0.0, 0.5)):
            expected[name] = _image(pipe, steps, seed=5)
    handle = actsteer.attach(flux, t, steps=(0.0, 0.5))  # `flux` itself never runs here
    try:
        assert torch.equal(_image(four, 4, seed=5), expected["four"])
        assert torch.equal(_image(six, 6, seed=5), expected["six"])
        for _ in range(2):
            together = _run_together({"four": lambda: _image(four, 4, seed=5), "six": lambda: _image(six, 6, seed=5)})
            assert _same(together["four"], expected["four"]) and _same(together["six"], expected["six"])
    finally:
        handle.remove()
    assert (expected["four"] - _image(four, 4, seed=5)).abs().max() > 1e-2  # plain again
