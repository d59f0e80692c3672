"""Optimizer settings of a stage backend."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["adamw"] = "adamw"
    """Update rule. AdamW for now; the Nesterov-corrected rule for asynchronous pipelines comes later."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate, reached after ``warmup_steps``."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam moment decay rates."""
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay. Not applied to norm gains."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up length in optimizer steps; raise it for large models or large learning rates."""
    clip_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the stage's gradient to this global norm before each step; None disables clipping."""
