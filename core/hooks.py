"""The public face of the hook engine: `attach` (model-wide), `steer` (request-scoped), `Steering`, `validate`.

The engine itself is `actsteer.core.engine`; what to steer with, and strength validation, is
`actsteer.core.steering`. This module re-exports both under the names the rest of the package imports.
"""

from __future__ import annotations

from .engine import SteeringHandle, attach, steer, steering_of, validate
from .steering import (
    ApplyTo,
    SiteStrength,
    Steering,
    SteeringLike,
    as_steerings,
    check_site_strength,
    check_strength,
)

__all__ = [
    "ApplyTo",
    "SiteStrength",
    "Steering",
    "SteeringHandle",
    "SteeringLike",
    "as_steerings",
    "attach",
    "check_site_strength",
    "check_strength",
    "steer",
    "steering_of",
    "validate",
]
