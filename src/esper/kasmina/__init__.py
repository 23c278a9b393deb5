"""esper.kasmina: the reference execution layer (seed slots, lifecycle, alpha blending)."""

from esper.kasmina.alpha import alpha_at
from esper.kasmina.blueprints import (
    AUTO,
    BLUEPRINTS,
    Blueprint,
    BlueprintError,
    BlueprintSpec,
    build_blueprint,
    fitting_blueprints,
    resolve_blueprint,
)
from esper.kasmina.config import KasminaConfig
from esper.kasmina.layer import SEED_CONTAINER, KasminaLayer, SeedModule
from esper.kasmina.lifecycle import APPLIED_STAGES, LIVE_STAGES, TRANSITIONS, SeedRecord

__all__ = [
    "APPLIED_STAGES",
    "AUTO",
    "BLUEPRINTS",
    "LIVE_STAGES",
    "SEED_CONTAINER",
    "TRANSITIONS",
    "Blueprint",
    "BlueprintError",
    "BlueprintSpec",
    "KasminaConfig",
    "KasminaLayer",
    "SeedModule",
    "SeedRecord",
    "alpha_at",
    "build_blueprint",
    "fitting_blueprints",
    "resolve_blueprint",
]
