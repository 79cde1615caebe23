"""Per-call cost of one steered site: the affine map vs the quantile map (a sum of clamped segments, ~4 float ops
per knot), and the forms that were measured and not chosen: a ``searchsorted`` of each value among its unit's knots
followed by gathers of the segment's line (search and gathers are slow on CPU), and a uniform-grid lookup (cheaper,
but equally spaced knots lose resolution on skewed units, and its inverse must be resampled).

Interleaved in one process (the machine is shared: only ratios are meaningful), two rounds, one thread, eager and
torch.compile'd (inductor) for the chosen forms, at SmolLM2 sizes (D = 576): a prefill batch (8 x 64 tokens) and a
decode step (8 x 1).

Run (about 1-2 min): ``python -m benchmarks.quantile_apply_cost``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import actsteer


def searchsorted_lines(x, knots_t, anchor_x, anchor_y, slope, offsets):
    """The rejected form: the segment of each value by ``searchsorted`` among its unit's knots (``(D, K)``: the
    values must be transposed to ``(D, N)`` for it), then ``anchor_y + slope (x - anchor_x)`` gathered per value."""
    d = knots_t.shape[0]
    idx = torch.searchsorted(knots_t, x.reshape(-1, d).T.contiguous(), right=True).T.reshape(x.shape) + offsets
    return torch.addcmul(anchor_y.take(idx), x - anchor_x.take(idx), slope.take(idx))


def grid(x, x0, inv_step, table, offsets, k):
    """The rejected form: equally spaced knots, index = floor((x - x0) / step), two gathers and a lerp."""
    t = torch.addcmul(-x0 * inv_step, x, inv_step).clamp_(0, k - 1)
    j = t.floor().clamp_(max=k - 2)
    idx = j.long().add_(offsets)
    return table.take(idx).lerp_(table.take(idx.add_(1)), t.sub_(j))


def timed(fn, reps: int) -> float:
    fn()
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, default=576)
    parser.add_argument("--knots", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    d, k = args.units, args.knots
    g = torch.Generator().manual_seed(0)
    source, target = torch.randn(256, d, generator=g), torch.randn(256, d, generator=g).exp()
    affine = actsteer.estimate(source, target, support="observed")
    quantile = actsteer.estimate(source, target, method="quantile", support="observed", knots=k)
    fa, fq = affine.fold(1.0), quantile.fold(1.0)
    knots, values = quantile.knots, quantile.values
    slope = torch.cat([quantile.omega[None], (values[1:] - values[:-1]) / (knots[1:] - knots[:-1]).clamp_min(1e-12),
                       quantile.omega[None]])
    lines = (knots.T.contiguous(), torch.cat([knots[:1], knots]).T.reshape(-1), torch.cat([values[:1], values]).T.reshape(-1),
             slope.T.reshape(-1), torch.arange(d) * (k + 1))
    x0, x1 = knots[0], knots[-1]
    grid_args = (x0, (k - 1) / (x1 - x0), torch.randn(d * k, generator=g), torch.arange(d) * k, k)
    rows = {}
    for shape in ((8, 64, d), (8, 1, d)):
        x = torch.randn(*shape, generator=g)
        arms = {
            "affine": lambda: fa.apply_last(x),
            "quantile (clamped segments)": lambda: fq.apply_last(x),
            "searchsorted + gathers": lambda: searchsorted_lines(x, *lines),
            "uniform grid": lambda: grid(x, *grid_args),
        }
        if not args.no_compile:
            ca, cq = torch.compile(fa.apply_last), torch.compile(fq.apply_last)
            arms["affine, compiled"] = lambda: ca(x)
            arms["quantile, compiled"] = lambda: cq(x)
        for _ in range(args.rounds):
            for name, fn in arms.items():
                rows.setdefault((shape, name), []).append(timed(fn, args.reps))
    print(f"| shape | form | ms per call (rounds) | x affine |")
    print("|---|---|---|---|")
    for (shape, name), times in rows.items():
        base = statistics.median(rows[(shape, "affine")])
        print(f"| {shape} | {name} | {' / '.join(f'{t:.3f}' for t in times)} | {statistics.median(times) / base:.1f} |")


if __name__ == "__main__":
    main()
