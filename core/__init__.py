"""actsteer.core: estimation, transport maps, the hook engine, fitting and the file format (torch only).

This package is the one face of the core: the host layers (``hf_integration``, ``comfy_nodes``,
``vllm_integration``, ``eval``, ``archs``) import what they need from ``actsteer.core`` and never from its modules,
so that the modules can change behind these names. Who owns what:

- maps: `UnitMap`, `Transport` (``transport.py``); folding a strength and the per-call formula (``folding.py``);
  the exact 1-D map `QuantileMap` (``quantile.py``) and its folding and formula (``quantile_folding.py``); the
  per-token formula over stacked transports, for servers (`stacked_affine`, `stack_directions`, and its two steps
  `fold_rows`, `apply_folded`, ``stacked.py``: affine maps only);
- estimation: `estimate`, `ESTIMATORS`, `method_defaults` (``estimators.py``); pooling (``pooling.py``);
  LinEAS, all sites trained jointly through the model: `LineasConfig` (``lineas.py``, ``lineas_parts.py``);
- steering: `Steering` and strength checks (``steering.py``); `attach`, `steer`, `bind`, `SteeringHandle`
  (``engine.py``, with ``dispatch.py`` and ``apply.py`` behind it); `keep_context` for streamed generators
  (``streams.py``);
- recording and fitting: `collect`, `record_sites`, `Recorder`, `ForwardContext` (``record.py``); `fit`
  (``fitting.py``);
- diffusion steps: `StepClock`, `check_steps`, `locate` (``steps.py``, the one clock of fitting and steering), and
  per-step transports (`split_stages`, `join_stages`, `refuse_stages`: one map per denoising step);
- sites: `list_sites`, `resolve_sites`, the one width rule `infer_width` and the one check `validate` (``sites.py``);
- files: `read_header`, `resolve_path` (``io.py``), `check_transport`, `shorten`, `printable` (``validation.py``: what a
  usable file is, and the one way to show text that came from one);
- provenance: `model_record`, `naming_of`, `fitted_on` (``provenance.py``).

Example:
    >>> import torch
    >>> from actsteer import core
    >>> m = core.estimate(torch.zeros(4, 2) + torch.arange(4.0)[:, None], torch.ones(4, 2), method="mean-act")
    >>> m.beta.tolist()
    [-0.5, -0.5]
"""

from ._version import __version__
from .cfg import CFG_CHOICES, DEFAULT_CFG, Cfg, check_cfg, guidance_scaled
from .engine import SteeringHandle, attach, bind, steer, steering_of
from .estimators import ESTIMATORS, FIT_METHODS, Support, canonical_method, estimate, method_defaults
from .fitting import fit
from .folding import HALF_DTYPES, FoldedMap, in_support
from .io import read_header, resolve_path
from .lineas import LineasConfig, lineas_config
from .pooling import pool
from .quantile import QuantileMap
from .quantile_folding import FoldedQuantile
from .provenance import fitted_on, fitted_on_note, model_name, model_record, naming_of
from .record import ForwardContext, Recorder, collect, record_sites
from .sites import (
    WidthMismatch,
    element,
    infer_width,
    iter_site_modules,
    list_sites,
    parse_site,
    present_sites,
    replace_element,
    resolve_sites,
    validate,
)
from .stacked import apply_folded, fold_rows, stack_directions, stacked_affine
from .steering import SiteStrength, Steering, SteeringLike, as_steerings, check_strength, expand_stages
from .streams import keep_context
from .steps import (
    STAGE_MARK,
    StepClock,
    Steps,
    Window,
    check_steps,
    describe_size,
    in_window,
    join_stages,
    locate,
    refuse_stages,
    split_stages,
    stage_of,
    stage_windows,
)
from .transport import Transport, UnitMap
from .validation import check_transport, printable, shorten

__all__ = [
    "CFG_CHOICES",
    "DEFAULT_CFG",
    "ESTIMATORS",
    "FIT_METHODS",
    "FoldedQuantile",
    "LineasConfig",
    "QuantileMap",
    "lineas_config",
    "HALF_DTYPES",
    "Cfg",
    "FoldedMap",
    "ForwardContext",
    "Recorder",
    "SiteStrength",
    "Steering",
    "SteeringHandle",
    "SteeringLike",
    "StepClock",
    "Steps",
    "Support",
    "Transport",
    "UnitMap",
    "WidthMismatch",
    "Window",
    "__version__",
    "as_steerings",
    "attach",
    "check_cfg",
    "bind",
    "canonical_method",
    "check_steps",
    "check_strength",
    "check_transport",
    "collect",
    "element",
    "replace_element",
    "estimate",
    "fit",
    "fitted_on",
    "fitted_on_note",
    "guidance_scaled",
    "in_support",
    "in_window",
    "infer_width",
    "iter_site_modules",
    "keep_context",
    "list_sites",
    "locate",
    "method_defaults",
    "model_name",
    "model_record",
    "naming_of",
    "parse_site",
    "pool",
    "present_sites",
    "printable",
    "read_header",
    "record_sites",
    "resolve_path",
    "resolve_sites",
    "shorten",
    "stack_directions",
    "stacked_affine",
    "fold_rows",
    "apply_folded",
    "steer",
    "steering_of",
    "STAGE_MARK",
    "describe_size",
    "expand_stages",
    "join_stages",
    "refuse_stages",
    "split_stages",
    "stage_of",
    "stage_windows",
    "validate",
]
