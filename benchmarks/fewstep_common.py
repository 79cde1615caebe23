"""Shared pieces of the few-step diffusion benchmarks (`diffusion_fewstep_style.py`, `diffusion_fewstep_guidance.py`,
`diffusion_fewstep_negation.py`): the two miniatures behind one interface, steered generation with a CFG placement,
and the fits every benchmark compares.

Two miniatures (tests/support/miniature):
- ``fewstep`` (the paper's setting: 4 Euler steps, guidance 0, six global styles: `miniature.fewstep`);
- ``tenstep`` (the first miniature: 10 DDIM steps, guidance 3, styles striped / speckled / outlined), for contrast.

CFG placements (where the steer enters the classifier-free-guidance batch ``[uncond; cond]``; with guidance <= 1
there is no such batch and all placements are the same):
- ``both``: both halves at the strength (actsteer's behaviour before issue 23);
- ``cond``: the conditional half only: the steer stands in for the prompt's words, which reach only that half;
- ``both x g``: both halves at ``g`` times the strength, the strength a linear picture says "both" needs to match
  the prompt's weight under guidance ``g`` (a guidance-aware strength).
Generation runs them through actsteer's own ``cfg=`` option (`actsteer.hf_integration.cfg`: "both",
"conditional", "guidance-aware"), text-encoder sites included (the prompt's encoding is the conditional branch).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

import actsteer
from tests.support.miniature.fewstep import metrics as fmetrics

logger = logging.getLogger("fewstep")
TEXT_SITE = "text_encoder.final_layer_norm"
PLACEMENTS = ("both", "cond", "both x g")
LIBRARY_CFG = {"both": "both", "cond": "conditional", "both x g": "guidance-aware"}  # actsteer's ``cfg=`` names
SITE_SETS = ("unet", "te", "both")


def known_methods() -> list[str]:
    """The AcT-family estimators this actsteer has, of those the benchmarks compare."""
    from actsteer.core import canonical_method

    out = []
    for name in ("linear-act", "mean-act", "itic", "lineas", "quantile", "exact-1d", "exact"):
        try:
            out.append(canonical_method(name))
        except (ValueError, KeyError):
            continue
    return list(dict.fromkeys(out))


class _WithPosition:
    """The first miniature's judges (style, shape, colour) plus the few-step position judge (white grounds)."""

    def __init__(self, judges: Any, position: Any) -> None:
        self.judges, self.position = judges, position

    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        from tests.support.miniature.fewstep.judges import ATTRIBUTES

        out = self.judges.predict(images)
        with torch.no_grad():
            idx = self.position(images.float()).argmax(-1).tolist()
        out["position"] = [ATTRIBUTES["position"][i] for i in idx]
        return out

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.judges.features(images)


@dataclasses.dataclass
class Mini:
    """One miniature: pipeline, judges, styles, protocol (steps, guidance), fit and held-out attributes."""

    name: str
    pipe: Any
    judges: Any
    styles: tuple[str, ...]
    plain: str
    steps: int
    guidance: float
    colour_styles: tuple[str, ...]
    fit_attrs: list
    eval_attrs: list  # held-out prompts, each repeated once per seed

    def captions(self, attrs: Sequence[Any], suffix: str = "") -> list[str]:
        return fmetrics.captions(attrs, suffix=suffix) if self.name == "fewstep" else \
            _tenstep_metrics().captions(attrs, suffix=suffix)

    def score(self, images: torch.Tensor, reference: torch.Tensor | None, style: str | None) -> dict[str, float]:
        return fmetrics.score(self.judges, images, self.eval_attrs, reference, style=style,
                              colour_kept=style not in self.colour_styles)


def _tenstep_metrics():
    from tests.support.miniature import metrics

    return metrics


def load(name: str, *, n_fit: int = 32, n_eval: int = 32, seeds: int = 3, seed: int = 0) -> Mini:
    """Load a miniature (``"fewstep"`` or ``"tenstep"``) with ``n_fit`` fit captions and ``n_eval`` x ``seeds``
    held-out images (disjoint (shape, colour, position, size) combinations). The few-step pipeline is the committed
    one, or the diffusers folder named by ``$ACTSTEER_FEWSTEP_PIPELINE`` (a training snapshot)."""
    from tests.support.miniature.fewstep import judges as fjudges
    from tests.support.miniature.fewstep import model as fmodel
    from tests.support.miniature.fewstep import styles as fstyles

    if name == "fewstep":
        fit_attrs, eval_attrs = fmetrics.split_prompts(n_fit, n_eval, seed=seed)
        weights = os.environ.get("ACTSTEER_FEWSTEP_PIPELINE")  # another snapshot than the committed weights
        pipe = fmodel.load_pipeline(weights) if weights else fmodel.load_pipeline()
        return Mini("fewstep", pipe, fjudges.Judges.load(), fstyles.STYLES[1:], "plain",
                    fmodel.STEPS, 0.0, fstyles.COLOUR_STYLES, fit_attrs, eval_attrs * seeds)
    if name == "tenstep":
        from tests.support.miniature import judges as tjudges
        from tests.support.miniature import model as tmodel

        fit_attrs, eval_attrs = _tenstep_metrics().split_prompts(n_fit, n_eval, seed=seed)
        judges = _WithPosition(tjudges.Judges.load(), fjudges.Judges.load().nets["position"])
        return Mini("tenstep", tmodel.load_pipeline(), judges, ("striped", "speckled", "outlined"), "flat", 10, 3.0,
                    (), fit_attrs, eval_attrs * seeds)
    raise ValueError(f"Unknown miniature {name!r}; use 'fewstep' or 'tenstep'")


# Generation -----------------------------------------------------------------------------------------------
def placement_strengths(placement: str, strength: float, guidance: float) -> tuple[float, float]:
    """``(conditional, unconditional)`` strengths of a placement, to first order (see the module docstring)."""
    if placement == "both":
        return strength, strength
    if placement == "cond":
        return strength, 0.0
    if placement == "both x g":
        g = max(guidance, 1.0)
        return strength * g, strength * g
    raise ValueError(f"Unknown placement {placement!r}; use one of {PLACEMENTS}")


@torch.no_grad()
def generate(m: Mini, prompts: Sequence[str], transport: actsteer.Transport | None = None, *, strength: float = 0.0,
             placement: str = "both", guidance: float | None = None, steps: int | None = None,
             timesteps: tuple[float, float] | None = None, negative: Sequence[str] | None = None,
             seed: int = 1000) -> torch.Tensor:
    """Images ``(N, 3, 32, 32)`` in [-1, 1] of ``prompts`` (prompt ``i`` from the noise of ``seed + i``), steered
    with ``transport`` at ``strength`` through actsteer's own CFG placement (``cfg=LIBRARY_CFG[placement]``);
    ``timesteps`` is a step window in fractions of the schedule (`actsteer.core.steps`)."""
    g = m.guidance if guidance is None else guidance
    n = len(prompts)
    kw = dict(num_inference_steps=steps or m.steps, guidance_scale=g, output_type="pt",
              generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)])
    if negative is not None:
        kw["negative_prompt"] = list(negative)
    if transport is None or strength == 0:
        return m.pipe(list(prompts), **kw).images.float() * 2 - 1
    with actsteer.steer(m.pipe, transport, strength=strength, cfg=LIBRARY_CFG[placement],
                        **({"steps": timesteps} if timesteps else {})):
        images = m.pipe(list(prompts), **kw).images
    return images.float() * 2 - 1


# Fitting --------------------------------------------------------------------------------------------------
def site_modules(m: Mini, sites: str, unet_sites: list[str]) -> Any:
    if sites == "unet":
        return "auto"
    if sites == "te":
        return [TEXT_SITE]
    if sites == "both":
        return [TEXT_SITE, *unet_sites]
    raise ValueError(sites)


def fit(m: Mini, source: list[str], target: list[str], *, sites: str = "unet", unet_sites: list[str] | None = None,
        fit_guidance: float | None = None, **options: Any) -> actsteer.Transport:
    """`actsteer.fit_pipeline` with the miniature's protocol (its steps; guidance 0 on the few-step model, 3 on the
    ten-step one; the first step unless ``steps=`` says otherwise; seed 0)."""
    g = (0.0 if m.name == "fewstep" else m.guidance) if fit_guidance is None else fit_guidance
    options.setdefault("num_inference_steps", m.steps)
    options.setdefault("steps", "first")  # the protocol of the tables in RESULTS.md (the paper's rule); "each" by name
    return actsteer.fit_pipeline(m.pipe, source, target, modules=site_modules(m, sites, unet_sites or []),
                                 guidance_scale=g, progress=False, seed=0, **options)


def unet_site_names(m: Mini) -> list[str]:
    a = m.captions(m.fit_attrs[:2])
    return list(actsteer.fit_pipeline(m.pipe, a, a, modules="auto", num_inference_steps=m.steps, guidance_scale=0.0,
                                      steps="first", progress=False).sites)  # module names: no per-step marks


# Output ---------------------------------------------------------------------------------------------------
class Rows:
    """Rows appended to a JSON-lines file as they come (a long run can be read while it goes on)."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.start = time.time()
        with path.open("w") as f:
            f.write(json.dumps({"meta": meta}) + "\n")

    def add(self, **row: Any) -> dict[str, Any]:
        row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        row["t_s"] = round(time.time() - self.start, 1)
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        logger.info("%s", row)
        return row


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if "meta" not in r]


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def names(text: str) -> list[str]:
    """A comma-separated list on the command line (``"dark,sepia"``)."""
    return [v for v in text.split(",") if v]


def cli(doc: str, run: Any, argv: list[str] | None, *, own: Any = None, seeds: int = 3, model: bool = True) -> None:
    """The few-step benchmarks' command line: ``--model`` (unless ``model=False``), ``--out``, ``--styles``,
    ``--n-fit``, ``--n-eval``, ``--seeds``, ``--threads``, plus a script's ``own(parser)`` arguments; then logging,
    seeding and ``run(args)``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if model:
        parser.add_argument("--model", default="fewstep", choices=["fewstep", "tenstep"])
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file of rows")
    parser.add_argument("--styles", type=names, default=None)
    parser.add_argument("--n-fit", type=int, default=32)
    parser.add_argument("--n-eval", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=seeds)
    parser.add_argument("--threads", type=int, default=1)
    if own is not None:
        own(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    seed_everything(args.threads)
    run(args)


def seed_everything(threads: int) -> None:
    torch.set_num_threads(threads)
    np.random.seed(0)
