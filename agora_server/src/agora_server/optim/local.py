"""A stage's local optimizer (AdamW or Nesterov-corrected Adam) with linear warm-up and clipping."""

from __future__ import annotations

import math

import torch
from torch import nn

from agora_server.optim.config import OptimizerConfig
from agora_server.optim.nesterov import NesterovAdamW, linear_momentum_warmup


def learning_rate(epoch: int, config: OptimizerConfig) -> float:
    """The rate for the step that ends ``epoch``: linear warm-up, then constant or cosine decay.
    A function of the stage's epoch, so workers that join late use the stage's rate at once."""
    if epoch < config.warmup_steps:
        return config.lr * (epoch + 1) / config.warmup_steps
    if config.decay_steps is None:
        return config.lr
    progress = min(1.0, (epoch - config.warmup_steps) / config.decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def build_optimizer(module: nn.Module, config: OptimizerConfig):
    """(optimizer, scheduler stepping ``learning_rate`` once per optimizer step)."""
    optimizer = make_optimizer(module, config)
    base = config.lr
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate(step, config) / base)
    return optimizer, schedule


def make_optimizer(module: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
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
    return optimizer


def clip_and_check(module: nn.Module, max_norm: float | None) -> float:
    """Clip gradients in place; return the global norm before clipping (inf or nan if not finite)."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    limit = max_norm if max_norm is not None else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, limit, error_if_nonfinite=False))
