"""Request-scoped steering (`actsteer.steer`, ``generate(steering=...)``) on ONE shared model object.

Concurrent requests in threads or asyncio tasks must each produce exactly what they produce alone (greedy tokens
bit-identical); model-wide `attach` composes with them in a defined order; copies and pickles of a steered model
carry no steering.
"""

from __future__ import annotations

import asyncio
import copy
import io
import pickle
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import actsteer
from actsteer import Steering

SOURCE = [f"the cat sat on mat number {i} today" for i in range(10)]
OCEAN = [f"STORMY SEAS AND WAVES {i}!!" * (1 + i % 3) for i in range(10)]
FOOD = [f"bread, cheese and {i} ripe figs on a plate" for i in range(10)]
PROMPTS = ["hello there", "a much longer prompt for padding"]
N_TOKENS = 12


@pytest.fixture(scope="module")
def served(tiny_lm_factory_module):
    """One tiny Llama shared by every request, two transports, and each request kind's solo output."""
    model, tok = tiny_lm_factory_module("llama")
    ocean = actsteer.fit_lm(model, tok, SOURCE, OCEAN, support="all", progress=False)
    food = actsteer.fit_lm(model, tok, SOURCE, FOOD, support="all", progress=False)
    actsteer.enable_steering(model)
    inputs = tok(PROMPTS, return_tensors="pt", padding=True)
    requests = {
        "plain": None,
        "ocean": Steering(ocean, 3.0),
        "ocean-weak": Steering(ocean, 1.0),
        "food": Steering(food, 3.0),
        "composed": [Steering(ocean, 2.0), Steering(food, 2.0)],
        "per-row": Steering(ocean, torch.tensor([0.0, 3.0])),
    }
    solo = {name: _generate(model, inputs, steering) for name, steering in requests.items()}
    return model, tok, inputs, requests, solo, (ocean, food)


@pytest.fixture(scope="module")
def tiny_lm_factory_module():
    from support.tiny_lm import make_tiny_lm

    return make_tiny_lm


def _generate(model, inputs, steering):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=N_TOKENS, do_sample=False, steering=steering)


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_solo_outputs_differ_between_request_kinds(served):
    _, _, _, _, solo, _ = served
    outputs = list(solo.values())
    distinct = {tuple(o.flatten().tolist()) for o in outputs}
    assert len(distinct) == len(outputs)  # every kind of request really steers differently


@pytest.mark.parametrize("rounds", [4])
def test_concurrent_threads_each_get_their_own_steering(served, rounds):
    model, _, inputs, requests, solo, _ = served
    names = list(requests) * 2  # 12 requests at once: each kind twice
    order: list[int] = []  # the thread of every forward pass, to check that requests really interleaved
    probe = model.register_forward_pre_hook(lambda module, args: order.append(threading.get_ident()))
    try:
        for _ in range(rounds):
            barrier = threading.Barrier(len(names))

            def run(name):
                barrier.wait()  # start together, so that their forwards interleave
                return name, _generate(model, inputs, requests[name])

            with ThreadPoolExecutor(max_workers=len(names)) as pool:
                results = list(pool.map(run, names))
            for name, out in results:
                assert torch.equal(out, solo[name]), name
    finally:
        probe.remove()
    switches = sum(a != b for a, b in zip(order, order[1:]))
    assert switches > 2 * rounds * len(names)  # far more than one switch per request: forwards interleaved
    assert _hooks(model) == 0


def test_concurrent_context_managers_and_plain_calls(served):
    model, _, inputs, _, solo, (ocean, food) = served
    blocks = {"ocean": (ocean, 3.0), "food": (food, 3.0), "plain": None}
    expected = {"ocean": solo["ocean"], "food": solo["food"], "plain": solo["plain"]}
    names = list(blocks) * 3
    barrier = threading.Barrier(len(names))

    def run(name):
        barrier.wait()
        if blocks[name] is None:
            return name, _generate(model, inputs, None)
        transport, strength = blocks[name]
        with actsteer.steer(model, transport, strength=strength):  # the whole call, request-scoped
            return name, _generate(model, inputs, None)

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        for name, out in pool.map(run, names):
            assert torch.equal(out, expected[name]), name
    assert _hooks(model) == 0


def test_concurrent_asyncio_tasks_each_get_their_own_steering(served):
    model, _, inputs, requests, solo, (ocean, _) = served

    async def request(name, barrier):
        async with barrier:
            pass
        if name == "ocean-block":
            with actsteer.steer(model, ocean, strength=3.0):
                await asyncio.sleep(0)  # yield while steered: other tasks must not see it
                return name, await asyncio.to_thread(_generate, model, inputs, None)  # to_thread copies the context
        await asyncio.sleep(0)
        return name, await asyncio.to_thread(_generate, model, inputs, requests[name])

    async def main():
        names = [*requests, "ocean-block"]
        barrier = asyncio.Barrier(len(names))
        return await asyncio.gather(*(request(n, barrier) for n in names))

    for name, out in asyncio.run(main()):
        assert torch.equal(out, solo["ocean"] if name == "ocean-block" else solo[name]), name
    assert _hooks(model) == 0


def test_steering_does_not_leak_into_a_thread_started_inside_the_block(served):
    model, _, inputs, _, solo, (ocean, _) = served
    with actsteer.steer(model, ocean, strength=3.0):
        with ThreadPoolExecutor(max_workers=1) as pool:  # a fresh thread starts with an empty context
            plain = pool.submit(_generate, model, inputs, None).result()
        steered = _generate(model, inputs, None)
    assert torch.equal(plain, solo["plain"]) and torch.equal(steered, solo["ocean"])


def test_model_wide_attach_applies_to_every_thread_and_composes_first(served):
    model, _, inputs, _, solo, (ocean, food) = served
    handle = actsteer.attach(model, ocean, strength=2.0)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            other = pool.submit(_generate, model, inputs, None).result()
        here = _generate(model, inputs, Steering(food, 2.0))  # model-wide ocean, then this request's food
    finally:
        handle.remove()
    assert torch.equal(other, _generate(model, inputs, Steering(ocean, 2.0)))
    assert torch.equal(here, solo["composed"])
    assert _hooks(model) == 0


def test_identical_requests_started_together_apply_the_transport_once(served):
    model, _, inputs, requests, solo, _ = served
    barrier = threading.Barrier(8)

    def run(_):
        barrier.wait()
        return _generate(model, inputs, requests["ocean"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        outs = list(pool.map(run, range(8)))
    assert all(torch.equal(o, solo["ocean"]) for o in outs)


# Copies and pickles --------------------------------------------------------------------------------------
def test_deepcopy_inside_steer_is_never_steered_and_loses_the_hooks(tiny_lm_factory):
    model, tok = tiny_lm_factory("llama")
    transport = actsteer.fit_lm(model, tok, SOURCE, OCEAN, support="all", progress=False)
    ids = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model(**ids).logits
        with actsteer.steer(model, transport, strength=3.0):
            steered = model(**ids).logits
            clone = copy.deepcopy(model)
            assert torch.equal(clone(**ids).logits, plain)  # the copy is not steered, even inside the block
            assert torch.equal(model(**ids).logits, steered)
        assert _hooks(clone) == 0 and _hooks(model) == 0
        handle = actsteer.attach(model, transport, strength=3.0)  # model-wide, long-lived
        try:
            clone = copy.deepcopy(model)
            assert _hooks(clone) > 0  # shares the (inert for it) dispatcher until its first call ...
            assert torch.equal(clone(**ids).logits, plain)
            assert _hooks(clone) == 0  # ... which removes it
            assert torch.equal(model(**ids).logits, steered)
        finally:
            handle.remove()


def test_deepcopy_of_an_enabled_model_is_plain(tiny_lm_factory):
    model, tok = tiny_lm_factory("gpt2")
    actsteer.enable_steering(model)
    clone = copy.deepcopy(model)
    ids = tok(PROMPTS, return_tensors="pt", padding=True)
    assert not actsteer.hf_integration.generation.is_steering_enabled(clone)
    with pytest.raises(ValueError, match="steering"):  # transformers' own error: the copy is not enabled
        clone.generate(**ids, max_new_tokens=2, steering="ocean")
    assert torch.equal(clone.generate(**ids, max_new_tokens=4, do_sample=False),
                       model.generate(**ids, max_new_tokens=4, do_sample=False))


PICKLE_CHECK = r"""
import pickle, sys, torch
sys.modules["actsteer"] = None  # loading must not need actsteer
model = pickle.loads(open(sys.argv[1], "rb").read())
x = torch.load(sys.argv[2])
out = model(x)
ref = torch.load(sys.argv[3])
print("equal" if torch.equal(out, ref) else "different")
"""


def test_pickled_steered_model_holds_no_actsteer_state(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3)).eval()
    t = actsteer.Transport({"1": actsteer.UnitMap(torch.full((6,), 2.0), torch.ones(6))})
    x = torch.randn(5, 4)
    plain = model(x)
    handle = actsteer.attach(model, t)
    try:
        data = pickle.dumps(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
    finally:
        handle.remove()
    assert b"actsteer" not in data and b"actsteer" not in buffer.getvalue()
    (tmp_path / "model.pkl").write_bytes(data)
    torch.save(x, tmp_path / "x.pt")
    torch.save(plain.detach(), tmp_path / "ref.pt")
    script = tmp_path / "check.py"
    script.write_text(PICKLE_CHECK)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model.pkl"), str(tmp_path / "x.pt"), str(tmp_path / "ref.pt")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.stdout.strip() == "equal", result.stderr[-2000:]


def test_pickled_enabled_lm_is_plain(tiny_lm_factory):
    model, tok = tiny_lm_factory("gpt2")
    actsteer.enable_steering(model)
    data = pickle.dumps(model)
    assert b"actsteer" not in data
    loaded = pickle.loads(data)
    ids = tok(PROMPTS, return_tensors="pt", padding=True)
    assert torch.equal(loaded.generate(**ids, max_new_tokens=4, do_sample=False),
                       model.generate(**ids, max_new_tokens=4, do_sample=False))


# SmolLM2 (slow tier) ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_concurrent_requests_match_their_solo_runs():
    from pathlib import Path

    from actsteer.hf_integration.cli import read_texts
    from actsteer.hf_integration.default_model import load_default_model

    data = Path(actsteer.__file__).parent / "hf_integration" / "data"
    model, tok = load_default_model()
    neutral, ocean_texts = read_texts(data / "neutral.txt")[:24], read_texts(data / "ocean.txt")[:24]
    food_texts = read_texts(Path(__file__).parents[1] / "benchmarks" / "data" / "food.txt")[:24]
    ocean = actsteer.fit_lm(model, tok, neutral, ocean_texts, modules="all-norms", progress=False)
    food = actsteer.fit_lm(model, tok, neutral, food_texts, modules="all-norms", progress=False)
    actsteer.enable_steering(model)
    tok.padding_side = "left"
    prompt = tok(["My favorite thing to do on weekends is"], return_tensors="pt")
    requests = {
        "plain": None,
        "ocean": Steering(ocean, 1.0),
        "ocean-half": Steering(ocean, 0.5),
        "food": Steering(food, 1.0),
        "ocean+food": [Steering(ocean, 0.7), Steering(food, 0.7)],
    }

    def gen(name):
        with torch.no_grad():
            return model.generate(**prompt, max_new_tokens=16, do_sample=False, steering=requests[name])

    solo = {name: gen(name) for name in requests}
    assert len({tuple(o.flatten().tolist()) for o in solo.values()}) == len(requests)
    for _ in range(2):
        barrier = threading.Barrier(len(requests))

        def run(name):
            barrier.wait()
            return name, gen(name)

        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            for name, out in pool.map(run, requests):
                assert torch.equal(out, solo[name]), (name, tok.decode(out[0]), tok.decode(solo[name][0]))
    assert _hooks(model) == 0
