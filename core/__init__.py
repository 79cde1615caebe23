"""actsteer.core: estimation, transport maps, the hook engine and the file format (torch only)."""

from .collect import collect
from .estimate import ESTIMATORS, estimate
from .fit import fit
from .record import ForwardContext, Recorder
from .hooks import Steering, SteeringHandle, attach, steer, validate
from .pooling import pool
from .sites import list_sites, resolve_sites
from .transport import Transport, UnitMap

__all__ = [
    "ESTIMATORS",
    "ForwardContext",
    "Recorder",
    "Steering",
    "SteeringHandle",
    "Transport",
    "UnitMap",
    "attach",
    "collect",
    "estimate",
    "fit",
    "list_sites",
    "pool",
    "resolve_sites",
    "steer",
    "validate",
]
