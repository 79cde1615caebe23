"""The arms of the frontier benchmark: a way to steer (fitted once) and the settings it is swept over.

An arm is actsteer with some `fit_lm` arguments (swept over strength), or a peer from its own code (swept over its
own unbounded scale). Fits are cached beside the cells. Settings: the bounded AcT strength runs on a fixed grid;
the peers' scales start at their default and double / halve until the perplexity budget is crossed; then every arm
gets the same refinement, bisecting the setting where its perplexity (alone) crosses 1.5x and 2x unsteered, so each
method's frontier is resolved equally well where it matters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from benchmarks import frontier_data as fd
from benchmarks.frontier_cells import Cache, decode, fingerprint, generate_ids

BOUNDED_GRID = (0.5, 0.75, 1.0, 1.25)
REFINE = ((2.0, 1), (1.5, 1))  # (perplexity budget as a multiple of unsteered, bisection rounds)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way to steer. ``options``: fit_lm keyword arguments (actsteer), ``layers`` (sv), ``method`` (repeng)."""

    name: str
    family: str  # "actsteer", "sv", "repeng"
    data: str = "unmatched"  # or "pairs" (minimal pairs)
    options: tuple[tuple[str, Any], ...] = ()
    apply_to: str = "all"
    weights: tuple[tuple[str, float], ...] = ()  # actsteer: (regex, factor) per-site strength multipliers
    start: float = 1.0  # unbounded scales: the first setting tried (the library's default where it has one)

    @property
    def label(self) -> str:
        return f"{self.name} [{'minimal pairs' if self.data == 'pairs' else 'unmatched'}]"

    @property
    def bounded(self) -> bool:
        return self.family == "actsteer"

    def key(self, model=None) -> str:
        """The cache folder of this arm's fits and cells. actsteer arms are keyed by what fit_lm RESOLVES their
        options to on ``model`` (sites, method, pooling, support, ...), so an arm spelled two ways (the defaults,
        or the preset they pick) shares its cells, and a changed default gets new ones."""
        if self.family != "actsteer":
            return f"{self.family}-{self.name.replace(' ', '_').replace('/', '_')}-{self.data}-" + fingerprint(
                self.family, self.data, self.options, self.apply_to)
        return "actsteer-" + fingerprint(self.data, self.apply_to, self.weights, resolved_fit(model, self.options))


def resolved_fit(model, options: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """What ``fit_lm(model, ..., **options)`` fits with: its defaults filled in, the sites resolved."""
    import inspect

    import actsteer
    from actsteer.core import canonical_method, method_defaults
    from actsteer.hf_integration.presets import lm_sites

    params = inspect.signature(actsteer.fit_lm).parameters.values()
    opts = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    opts.update({k: list(v) if isinstance(v, tuple) else v for k, v in options})
    method = canonical_method(opts.pop("method"))
    defaults = method_defaults(method)
    pooling, support = opts.pop("pooling"), opts.pop("support")
    out = {
        "sites": lm_sites(model, opts.pop("modules")), "method": method,
        "pooling": defaults["pooling"] if pooling is None else pooling,
        "support": repr(defaults["support"] if support is None else support),
    }
    for k in ("progress", "description"):
        opts.pop(k, None)
    if opts.get("options") is None:  # fit_lm's method options (issue 22 items 3-4): keys without them stay as before
        opts.pop("options", None)
    return {**out, **{k: repr(v) for k, v in sorted(opts.items())}}


def actsteer_arm(name: str, data: str = "unmatched", apply_to: str = "all", weights: dict[str, float] | None = None,
                 **fit: Any) -> Arm:
    fit = {k: tuple(v) if isinstance(v, list) else v for k, v in fit.items()}
    return Arm(name, "actsteer", data, tuple(sorted(fit.items())), apply_to, tuple((weights or {}).items()))


def site_strengths(sites: list[str], strength: float, weights: tuple[tuple[str, float], ...]) -> dict[str, float]:
    """``strength`` times the factor of the first ``weights`` regex that matches each site in full (else 1)."""
    import re

    out = {}
    for site in sites:
        factor = next((w for rx, w in weights if re.fullmatch(rx, site)), 1.0)
        out[site] = strength * factor
    return out


PEER_ARMS = tuple(
    arm for data in ("unmatched", "pairs") for arm in (
        Arm("steering-vectors L12-16", "sv", data, (("layers", tuple(range(12, 17))),), start=1.0),
        Arm("steering-vectors all layers", "sv", data, (("layers", None),), start=0.25),
        Arm("repeng pca_diff (default)", "repeng", data, (("method", "pca_diff"),), start=4.0),
        Arm("repeng pca_center", "repeng", data, (("method", "pca_center"),), start=4.0),
    )
)


class Steerer:
    """A fitted arm: ``texts(setting)`` generates the prompts' continuations steered at ``setting``."""

    def __init__(self, arm: Arm, concept: str, model, tokenizer, prompts: list[str], cache: Cache) -> None:
        self.arm, self.model, self.tok, self.prompts = arm, model, tokenizer, prompts
        opts = dict(arm.options)
        fit_key = f"fits/{concept}/{arm.key(model)}"
        if arm.family == "actsteer":
            import actsteer

            path = cache.path(fit_key, ".safetensors")
            if path.is_file():
                self.transport = actsteer.Transport.load(path)
            else:
                source, target = fd.fitting_texts(concept, arm.data, tokenizer)
                opts = {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}
                self.transport = actsteer.fit_lm(model, tokenizer, source, target, progress=False, **opts)
                path.parent.mkdir(parents=True, exist_ok=True)
                self.transport.save(path, overwrite=True)
            actsteer.enable_steering(model)
            return
        from benchmarks import frontier_peers as peers

        cls = peers.SteeringVectorsPeer if arm.family == "sv" else peers.RepengPeer
        state = cache.get(fit_key)
        if state is not None:
            self.peer = cls.from_state(model, state)
            return
        pairs = fd.fitting_pairs(concept, arm.data, tokenizer)
        if arm.family == "sv":
            layers = opts["layers"]
            self.peer = cls(model, tokenizer, pairs, None if layers is None else list(layers))
        else:
            self.peer = cls(model, tokenizer, pairs, opts["method"])
        cache.put(fit_key, self.peer.state())

    def texts(self, setting: float) -> list[str]:
        if self.arm.family == "actsteer":
            import actsteer

            strength = float(setting)
            if self.arm.weights:
                strength = site_strengths(self.transport.sites, strength, self.arm.weights)
            steering = actsteer.Steering(self.transport, strength, self.arm.apply_to)
            return decode(self.tok, generate_ids(self.model, self.tok, self.prompts, steering=steering))
        with self.peer.applied(float(setting)) as generate:
            return decode(self.tok, generate_ids(self.model, self.tok, self.prompts, generate=generate))


def fmt_setting(s: float) -> str:
    return f"{s:.6g}"


def sweep_arm(arm: Arm, run: Callable[[float], dict], base_ppl: float, *, max_up: int = 6, max_down: int = 2,
              grid: tuple[float, ...] = BOUNDED_GRID) -> dict[float, dict]:
    """Run an arm's settings through ``run(setting) -> cell``; returns {setting: cell}.

    Bounded (actsteer): ``grid``. Unbounded (peers): from ``arm.start`` double while perplexity (alone) stays
    within 2x unsteered, halve while it is above 1.1x and presence is still rising. Then bisect each budget
    crossing of `REFINE`.
    """
    cells: dict[float, dict] = {}

    def ratio(s: float) -> float:
        if s not in cells:
            cells[s] = run(s)
        return cells[s]["summary"]["ppl_alone"] / base_ppl

    if arm.bounded:
        for s in grid:
            ratio(s)
    else:
        s = arm.start
        for _ in range(max_up):
            if not ratio(s) <= 2.0:  # NaN counts as over budget
                break
            s *= 2
        s = arm.start / 2
        for _ in range(max_down):
            if ratio(s) <= 1.1:
                break
            s /= 2
    for budget, rounds in REFINE:
        for _ in range(rounds):
            ordered = sorted(cells)
            over = [s for s in ordered if not ratio(s) <= budget]
            if not over or over[0] == ordered[0]:
                break
            hi = over[0]
            lo = max(s for s in ordered if s < hi)
            if not ratio(lo) <= budget:
                break
            mid = (lo + hi) / 2 if arm.bounded else math.sqrt(lo * hi)
            mid = float(f"{mid:.4g}")
            if mid in cells:
                break
            ratio(mid)
    return dict(sorted(cells.items()))
