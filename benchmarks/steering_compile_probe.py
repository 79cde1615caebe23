"""Issue 20 probe: what the steering ops cost vLLM-style compilation, and whether one opaque op per site cuts it.

A SmolLM2-width stack (hidden 576, MLP 1536, 10 blocks, 21 RMS norms, tokens flattened to ``(N, D)`` as vLLM runs
them) compiled with ``torch.compile(dynamic=True)`` (inductor), five ways, each in its own process with its own
inductor cache (a cold compile), interleaved over ``--rounds``:

- ``stock``: no steering;
- ``fused``: the plugin's fused formula (`actsteer.core.stacked_affine`, 2 composition positions, 17 table rows)
  traced into the graph, as the bank's ``kind="fused"`` does;
- ``op``: the same formula behind one functional ``torch.library.custom_op`` per site (one graph node, but the
  per-token gathers stay in the graph, and the formula runs on every token);
- ``op-skip``: ``op`` that returns a copy when the host knows no token is steered (possible on CPU, where no graph is
  captured; a CUDA graph would freeze the branch);
- ``plugin-op``: what landed (``graph: "op"``, the CPU default): the plugin's own bank
  (`actsteer.vllm_integration.bank`, ``kind="op"``): one in-place ``torch.ops.actsteer.steer_`` per site, nothing
  else in the graph, and the host's plan of the steered tokens (`Bank.set_tokens`) read when the op runs.

Reported: compile CPU seconds (first call) and the median time of a 16-token call, unsteered and with half the
tokens steered. Run: ``python -m benchmarks.steering_compile_probe [--rounds 2]``.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch  # at module scope: custom_op reads the annotations

D, LAYERS, TOKENS, DEPTH, ROWS = 576, 10, 16, 2, 17
MODES = ("stock", "fused", "op", "op-skip", "plugin-op")


def child(mode: str) -> None:
    from actsteer.core import stacked_affine

    torch.set_num_threads(1)
    steered = [False]

    @torch.library.custom_op("actsteer_probe::stacked_affine", mutates_args=())
    def steer_op(x: torch.Tensor, rows: torch.Tensor, amount: torch.Tensor, delta: torch.Tensor,
                 bias: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        if mode == "op-skip" and not steered[0]:
            return x.clone()
        return stacked_affine(x, rows, amount, delta, bias, lo, hi)

    @steer_op.register_fake
    def _(x, rows, amount, delta, bias, lo, hi):
        return torch.empty_like(x)

    class Norm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(D))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.w

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n1, self.n2 = Norm(), Norm()
            self.q, self.o = torch.nn.Linear(D, D), torch.nn.Linear(D, D)
            self.up, self.down = torch.nn.Linear(D, 1536), torch.nn.Linear(1536, D)

        def forward(self, x):
            x = x + self.o(torch.tanh(self.q(self.n1(x))))
            return x + self.down(torch.nn.functional.silu(self.up(self.n2(x))))

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
            self.final = Norm()

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.final(x)

    torch.manual_seed(0)
    model = Stack().eval()
    rows, amount = torch.zeros(DEPTH, 64, dtype=torch.long), torch.zeros(DEPTH, 64)
    for m in [m for m in model.modules() if isinstance(m, Norm)]:
        tables = (torch.randn(ROWS, D) * 0.1, torch.randn(ROWS, D) * 0.1, torch.full((ROWS, D), -1e9),
                  torch.full((ROWS, D), 1e9))
        for t in tables:
            t[0] = 0  # row 0: the identity

        def hook(module, args, out, tables=tables):
            tokens = torch.arange(out.shape[0])
            r, a = rows.index_select(1, tokens), amount.index_select(1, tokens)
            return stacked_affine(out, r, a, *tables) if mode == "fused" else steer_op(out, r, a, *tables)

        if mode not in ("stock", "plugin-op"):
            m.register_forward_hook(hook)
    bank = None
    if mode == "plugin-op":
        from actsteer.core import Transport, UnitMap
        from actsteer.vllm_integration.bank import install

        names = [n for n, m in model.named_modules() if isinstance(m, Norm)]
        bank, _ = install(model, dict.fromkeys(names, D), slots=(ROWS - 1) // 2, depth=DEPTH, max_tokens=64,
                          device=torch.device("cpu"), kind="op")
        g = torch.Generator().manual_seed(0)
        maps = {n: UnitMap(1 + 0.1 * torch.randn(D, generator=g), 0.1 * torch.randn(D, generator=g)) for n in names}
        bank.load_slot(1, Transport(maps, support="all"))
    compiled = torch.compile(model, dynamic=True)
    x = torch.randn(TOKENS, D)
    c0 = time.process_time()
    with torch.no_grad():
        compiled(x)
    out = {"compile_cpu_s": time.process_time() - c0}

    def median_ms() -> float:
        times = []
        with torch.no_grad():
            for _ in range(30):
                compiled(x)
            for _ in range(300):
                t = time.perf_counter()
                compiled(x)
                times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    out["unsteered_ms"] = median_ms()
    if mode != "stock":
        rows[0, : TOKENS // 2], amount[0, : TOKENS // 2], steered[0] = 3, 1.0, True
        if bank is not None:  # the worker's step: the plan of this forward (row 1: slot 1's forward map)
            plan_rows, plan_amount = torch.zeros(DEPTH, TOKENS, dtype=torch.long), torch.zeros(DEPTH, TOKENS)
            plan_rows[0, : TOKENS // 2], plan_amount[0, : TOKENS // 2] = 1, 1.0
            bank.set_tokens(plan_rows, plan_amount, used=1)
        out["half_steered_ms"] = median_ms()
    print(repr(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    results = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:  # interleaved: the machine's load drifts
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
                done = subprocess.run([sys.executable, "-m", "benchmarks.steering_compile_probe", "--child", mode],
                                      env=env, capture_output=True, text=True, check=True)
                results[mode].append(eval(done.stdout.strip().splitlines()[-1]))  # our own repr of a dict
    print(f"{'mode':8s} {'compile CPU s':>14s} {'unsteered ms':>13s} {'half steered ms':>16s}   (per round)")
    for mode, rows in results.items():
        cells = [" / ".join(f"{r.get(k, float('nan')):.1f}" for r in rows)
                 for k in ("compile_cpu_s", "unsteered_ms", "half_steered_ms")]
        print(f"{mode:8s} {cells[0]:>14s} {cells[1]:>13s} {cells[2]:>16s}")


if __name__ == "__main__":
    main()
