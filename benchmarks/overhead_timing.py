"""Shared timing for the overhead benchmarks: interleaved arms, wall and CPU time, device-aware, paired ratios.

Every benchmark here compares arms (``plain`` against steered variants) measured side by side in one process:
each repetition runs every arm once, in a rotated order, so slow spells of a shared machine hit all arms alike.
Reported per arm: the median over repetitions of the PAIRED ratio (this repetition's plain time / the arm's time,
i.e. a speed ratio, 1.0 = no cost) and its interquartile range. On CPU both wall time and process CPU time are
kept: on an oversubscribed machine CPU time is the steadier of the two. On CUDA, every timing is bracketed by
``torch.cuda.synchronize()`` (wall) and CUDA events (GPU time).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def sync(device: str | torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str | torch.device = "cpu") -> dict[str, float]:
    """``{"wall": s, "cpu": s[, "gpu": s]}`` for one call of ``fn`` (device work included)."""
    dev = torch.device(device)
    start_event = end_event = None
    if dev.type == "cuda":
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync(dev)
    c0, t0 = time.process_time(), time.perf_counter()
    if start_event is not None:
        start_event.record()
    fn()
    if end_event is not None:
        end_event.record()
    sync(dev)
    out = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    if start_event is not None:
        out["gpu"] = start_event.elapsed_time(end_event) / 1000.0
    return out


Arm = Callable[[], Any] | tuple[Callable[[], Any], Callable[[], Any], Callable[[], Any]]


def _run_arm(arm: Arm, device: str, timing: bool) -> dict[str, float] | None:
    before, run, after = arm if isinstance(arm, tuple) else (None, arm, None)
    if before is not None:
        before()  # untimed: e.g. attach steering
    try:
        return timed(run, device) if timing else (run(), None)[1]
    finally:
        if after is not None:
            after()


def interleave(arms: dict[str, Arm], reps: int, *, device: str = "cpu",
               warmup: int = 1) -> dict[str, list[dict[str, float]]]:
    """Run every arm ``warmup`` times untimed, then ``reps`` rounds of every arm once, rotating who goes first.

    An arm is a callable, or ``(before, run, after)`` where only ``run`` is timed.
    """
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            _run_arm(arms[name], device, False)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(_run_arm(arms[name], device, True))
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    v = sorted(values)
    if len(v) < 4:
        return v[0], statistics.median(v), v[-1]
    q = statistics.quantiles(v, n=4)
    return q[0], q[1], q[2]


def speed_ratios(times: dict[str, list[dict[str, float]]], *, base: str = "plain",
                 clock: str = "wall") -> dict[str, tuple[float, float, float]]:
    """Per arm: quartiles of the paired speed ratio ``base time / arm time`` (1.0 = as fast as ``base``)."""
    out = {}
    for name, runs in times.items():
        pairs = [b[clock] / r[clock] for b, r in zip(times[base], runs)]
        out[name] = quartiles(pairs)
    return out


def report(times: dict[str, list[dict[str, float]]], *, base: str = "plain", unit: Callable[[float], str] | None = None,
           clocks: tuple[str, ...] | None = None) -> list[str]:
    """Lines: per clock, the base's median time and each arm's paired speed ratio (median [IQR])."""
    clocks = clocks or tuple(k for k in ("wall", "cpu", "gpu") if k in times[base][0])
    lines = []
    for clock in clocks:
        med = statistics.median(r[clock] for r in times[base])
        label = unit(med) if unit else f"{med * 1e3:.1f} ms"
        ratios = speed_ratios(times, base=base, clock=clock)
        parts = [f"{name} {q2:.3f} [{q1:.3f}-{q3:.3f}]" for name, (q1, q2, q3) in ratios.items() if name != base]
        lines.append(f"  {clock:>4}: {base} {label}; speed vs {base}: " + ", ".join(parts))
    return lines


def summary(times: dict[str, list[dict[str, float]]], *, base: str = "plain") -> dict[str, Any]:
    """A JSON-ready summary: per clock, the base's median seconds and each arm's ratio quartiles."""
    clocks = [k for k in ("wall", "cpu", "gpu") if k in times[base][0]]
    return {
        clock: {
            "base_median_s": statistics.median(r[clock] for r in times[base]),
            "speed_ratio": {name: dict(zip(("q1", "median", "q3"), q)) for name, q in
                            speed_ratios(times, base=base, clock=clock).items() if name != base},
        }
        for clock in clocks
    }


def write_json(path: Path | None, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` (parents created); nothing when ``path`` is None."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
