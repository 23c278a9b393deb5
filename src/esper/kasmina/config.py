"""Kasmina's configuration: the `[kasmina]` section of Tolaria's TOML config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from esper.kasmina.blueprints import AUTO, BLUEPRINTS


class KasminaConfig(BaseModel):
    """Settings of the Kasmina execution layer. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_training_steps: int = Field(default=50, ge=0)
    """Isolated optimizer steps a seed must spend in TRAINING before START_GRAFTING is allowed."""

    blend_steps: int = Field(default=100, ge=1)
    """Length of the BLENDING window in steps: alpha ramps from 0 to exactly 1 over it."""

    alpha_steepness: float = Field(default=8.0, gt=0.0)
    """Steepness of the sigmoid alpha ramp (larger = sharper middle, flatter ends)."""

    evaluation_steps: int = Field(default=20, ge=1)
    """Steps of the evaluation window opened by EVALUATE (own-loss weight 0 while it lasts)."""

    fossilize_tolerance: float = Field(default=0.01, ge=0.0)
    """FOSSILIZE needs val loss now <= val loss when blending began * (1 + tolerance)."""

    default_blueprint: str = AUTO
    """Blueprint used when a GERMINATE command leaves `blueprint_id` empty; "auto" picks by the slot's
    activation shape ((F,) and (T, C) -> residual_mlp, (C, H, W) -> conv_residual)."""

    seed_hidden: int = Field(default=64, ge=1)
    """Hidden width of `residual_mlp` and channel width of `conv_residual` seeds."""

    adapter_dim: int = Field(default=16, ge=1)
    """Bottleneck width of `bottleneck_adapter` seeds."""

    lowrank_rank: int = Field(default=8, ge=1)
    """Rank of `lowrank_adapter` seeds."""

    attention_head_dim: int = Field(default=16, ge=1)
    """Query/key/value width of `attention_head` seeds."""

    attention_causal: bool = True
    """`attention_head` seeds attend to earlier positions only (never let a causal LM see the future)."""

    widen: list[list[str]] = Field(default_factory=list)
    """Host layers a `net2wider` GERMINATE may widen: [layer, consumer] or [layer, norm, consumer] by
    module name (a Linear into a Linear, or a Conv2d into a Conv2d, with only unit-wise modules
    between; the norm a BatchNorm of the layer's units). See widen.py."""

    widen_units: int = Field(default=4, ge=1)
    """Units (features or channels) one widening adds."""

    @field_validator("default_blueprint")
    @classmethod
    def _known_blueprint(cls, value: str) -> str:
        if value != AUTO and value not in BLUEPRINTS:
            raise ValueError(
                f"kasmina.default_blueprint {value!r} is unknown; "
                f"use {AUTO!r} (pick by shape) or one of {sorted(BLUEPRINTS)}"
            )
        return value
