"""Toy 1-D transport benchmark: how close does each estimator bring a source distribution to a target?

The idea of Figure 2 of Rodriguez et al., "Controlling Language and Diffusion Models by Transporting
Activations" (ICLR 2025): one unit, a source and a target distribution that differ in mean and spread,
Gaussian or skewed. Every method of `actsteer.estimate` is fitted on one sample (support "all") and
applied at strength 1 to a fresh held-out source sample, which is compared with a fresh target sample:

- ``W1/sd``: 1-D Wasserstein-1 distance between the empirical distributions, divided by the target std;
- ``dmean/sd``: (mean of transported source - target mean) / target std;
- ``sd ratio``: std of transported source / target std (1 is right).

ActAdd, CAA and ITI-c add a vector whose scale ("strength") is unbounded in their papers, so strength 1
is not their tuned setting; the ``best s`` column gives, for every method, the strength in [0, 3] that
minimises W1 on the fit sample, and ``W1@best`` its held-out W1/sd. Strength 1 should be best for the
transport methods.

Run: ``.venv/bin/python -m benchmarks.toy_transport [--seed 0] [--n 2000]``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch

import actsteer  # the repo root, installed with `pip install -e .`

METHODS = ["linear-act", "mean-act", "gaussian-ot", "actadd", "caa", "itic", "aura"]
ADDITIVE = {"actadd", "caa", "itic"}  # bias-only maps whose strength is an unbounded multiplier
STRENGTHS = torch.linspace(0.0, 3.0, 31)  # step 0.1

Sampler = Callable[[torch.Generator, int], torch.Tensor]


def _normal(mean: float, std: float) -> Sampler:
    return lambda g, n: mean + std * torch.randn(n, 1, generator=g, dtype=torch.float64)


def _lognormal(sigma: float) -> Sampler:
    return lambda g, n: (sigma * torch.randn(n, 1, generator=g, dtype=torch.float64)).exp()


def _gamma2(scale: float, shift: float = 0.0) -> Sampler:
    """Gamma(shape 2): the sum of two exponentials, drawn from uniforms so the generator fixes it."""
    return lambda g, n: shift - scale * torch.rand(n, 2, generator=g, dtype=torch.float64).log().sum(1, keepdim=True)


def _exponential(scale: float) -> Sampler:
    return lambda g, n: -scale * torch.rand(n, 1, generator=g, dtype=torch.float64).log()


# (name, source description, source sampler, target description, target sampler)
SETTINGS: list[tuple[str, str, Sampler, str, Sampler]] = [
    ("gauss->gauss wider", "N(0,1)", _normal(0.0, 1.0), "N(3,2^2)", _normal(3.0, 2.0)),
    ("gauss->gauss narrower", "N(0,2^2)", _normal(0.0, 2.0), "N(-1,0.5^2)", _normal(-1.0, 0.5)),
    ("gauss->gauss shift only", "N(0,1)", _normal(0.0, 1.0), "N(2,1)", _normal(2.0, 1.0)),
    ("gauss->lognormal", "N(0,1)", _normal(0.0, 1.0), "LogN(0,0.75^2)", _lognormal(0.75)),
    ("gauss->gamma", "N(0,1)", _normal(0.0, 1.0), "Gamma(2,1)", _gamma2(1.0)),
    ("exponential->gauss", "Exp(1)", _exponential(1.0), "N(2,0.5^2)", _normal(2.0, 0.5)),
    ("gamma->gauss", "Gamma(2,1)+1", _gamma2(1.0, shift=1.0), "N(0,1)", _normal(0.0, 1.0)),
]


def wasserstein_1d(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W1 between the empirical distributions of ``u`` (..., n) and ``v`` (m,): the integral of |F_u - F_v|.

    With n == m it is the mean gap between the sorted samples (batched over leading dims of ``u``).
    """
    u, v = u.sort(dim=-1).values, v.sort().values
    if u.shape[-1] == v.numel():
        return (u - v).abs().mean(dim=-1)
    if u.dim() != 1:
        raise ValueError("unequal sample sizes: pass one sample at a time")
    points = torch.cat([u, v]).sort().values
    widths = points.diff()
    cdf_u = torch.searchsorted(u, points[:-1], right=True).to(u.dtype) / u.numel()
    cdf_v = torch.searchsorted(v, points[:-1], right=True).to(v.dtype) / v.numel()
    return ((cdf_u - cdf_v).abs() * widths).sum()


def _best_strength(unit_map: actsteer.UnitMap, source: torch.Tensor, target: torch.Tensor) -> float:
    """The strength on STRENGTHS that minimises W1 on the fit sample (one call, one strength per row)."""
    rows = source.T.expand(len(STRENGTHS), -1).unsqueeze(-1)  # (S, n, 1): row r gets STRENGTHS[r]
    distances = wasserstein_1d(unit_map(rows, STRENGTHS)[..., 0], target[:, 0])  # (S,)
    return float(STRENGTHS[distances.argmin()])


def _scores(moved: torch.Tensor, target: torch.Tensor) -> tuple[float, float, float]:
    sd = target.std()
    return (
        float(wasserstein_1d(moved[:, 0], target[:, 0]) / sd),
        float((moved.mean() - target.mean()) / sd),
        float(moved.std() / sd),
    )


def run(seed: int, n: int) -> list[dict[str, object]]:
    """Fit every method on every setting and score it on held-out samples; one dict per (setting, method)."""
    rows = []
    for k, (name, src_desc, sample_source, tgt_desc, sample_target) in enumerate(SETTINGS):
        fit_gen = torch.Generator().manual_seed(seed * 1000 + 2 * k)
        test_gen = torch.Generator().manual_seed(seed * 1000 + 2 * k + 1)
        source, target = sample_source(fit_gen, n), sample_target(fit_gen, n)
        held_source, held_target = sample_source(test_gen, n), sample_target(test_gen, n)
        w1, dmean, sd_ratio = _scores(held_source, held_target)
        rows.append({"setting": name, "source": src_desc, "target": tgt_desc, "method": "(identity)",
                     "w1": w1, "dmean": dmean, "sd": sd_ratio, "best": float("nan"), "w1_best": float("nan")})
        for method in METHODS:
            unit_map = actsteer.estimate(source, target, method=method, support="all")
            w1, dmean, sd_ratio = _scores(unit_map(held_source, 1.0), held_target)
            best = _best_strength(unit_map, source, target)
            w1_best = _scores(unit_map(held_source, best), held_target)[0]
            rows.append({"setting": name, "source": src_desc, "target": tgt_desc, "method": method,
                         "w1": w1, "dmean": dmean, "sd": sd_ratio, "best": best, "w1_best": w1_best})
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    header = ("setting", "source -> target", "method", "W1/sd", "dmean/sd", "sd ratio", "best s", "W1@best")
    body = []
    last = None
    for r in rows:
        first = r["setting"] != last
        last = r["setting"]
        method = f"{r['method']}{'*' if r['method'] in ADDITIVE else ''}"
        best = "" if r["best"] != r["best"] else f"{r['best']:.2f}"  # NaN for the identity row
        w1_best = "" if r["w1_best"] != r["w1_best"] else f"{r['w1_best']:.3f}"
        body.append((
            r["setting"] if first else "", f"{r['source']} -> {r['target']}" if first else "", method,
            f"{r['w1']:.3f}", f"{r['dmean']:+.3f}", f"{r['sd']:.3f}", best, w1_best,
        ))
    widths = [max(len(header[i]), *(len(b[i]) for b in body)) for i in range(len(header))]
    numeric = {3, 4, 5, 6, 7}

    def line(cells: tuple[str, ...]) -> str:
        padded = (c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    out = [line(header), line(tuple("-" * w for w in widths))]
    for cells in body:
        if cells[0] and len(out) > 2:
            out.append("")
        out.append(line(cells))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (fit and held-out samples derive from it)")
    parser.add_argument("--n", type=int, default=2000, help="samples per distribution, for fitting and for evaluation")
    args = parser.parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # 1-D toy data: threads only add OpenMP spinning on a shared CPU
    if args.n < 2:
        parser.error("--n must be at least 2")
    rows = run(args.seed, args.n)
    print(
        f"Toy 1-D transport, strength 1, support 'all'; fit on n={args.n}, "
        f"scored on a fresh n={args.n} (seed {args.seed})"
    )
    print(format_table(rows))
    print("* additive baseline: its strength is an unbounded multiplier, so strength 1 is not tuned; "
          "'best s' = strength in [0, 3] minimising W1 on the fit sample, 'W1@best' = held-out W1/sd there.")
    print("sd ratio = std(transported) / std(target); dmean/sd = (mean(transported) - mean(target)) / std(target).")


if __name__ == "__main__":
    main()
