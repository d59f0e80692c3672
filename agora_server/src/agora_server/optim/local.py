"""A stage's local optimizer (AdamW or Nesterov-corrected Adam) with linear warm-up and clipping."""

from __future__ import annotations

import torch
from torch import nn

from agora_server.optim.config import OptimizerConfig
from agora_server.optim.nesterov import NesterovAdamW, linear_momentum_warmup


def build_optimizer(module: nn.Module, config: OptimizerConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        # norm gains are scale parameters: decaying them towards zero only hurts
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.name == "nesterov":
        schedule = linear_momentum_warmup(config.betas[0], config.momentum_start, config.momentum_warmup_steps)
        optimizer = NesterovAdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, momentum_schedule=schedule)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    warmup = config.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    return optimizer, schedule


def clip_and_check(module: nn.Module, max_norm: float | None) -> float:
    """Clip gradients in place; return the global norm before clipping (inf or nan if not finite)."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    limit = max_norm if max_norm is not None else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, limit, error_if_nonfinite=False))
