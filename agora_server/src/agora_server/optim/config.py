"""Optimizer settings of a stage backend."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["adamw", "nesterov"] = "adamw"
    """Update rule. "nesterov" is NAdam with decoupled weight decay, which corrects the staleness of
    gradients in an asynchronous pipeline (use it with betas like [0.99, 0.999])."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate, reached after ``warmup_steps``."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam moment decay rates."""
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay. Not applied to norm gains."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up length in epochs (stage-wide optimizer steps); raise it for large models or large learning rates."""
    decay_steps: int | None = Field(None, gt=0)
    """Epochs over which the rate decays (cosine) after warm-up, down to ``min_lr_ratio``; None keeps it constant."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The decayed rate as a fraction of ``lr``."""
    momentum_start: float = Field(0.5, ge=0, lt=1)
    """nesterov only: momentum μ at the first step; it rises linearly to betas[0]."""
    momentum_warmup_steps: int = Field(100, ge=0)
    """nesterov only: steps over which μ reaches betas[0]. 0 starts at full momentum."""
    clip_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the stage's gradient to this global norm before each step; None disables clipping."""
