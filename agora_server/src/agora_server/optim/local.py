"""A stage's local optimizer (AdamW or Nesterov-corrected Adam) with linear warm-up and clipping."""

from __future__ import annotations

import math
from collections.abc import Iterable

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


def make_optimizer(params: nn.Module | Iterable[torch.Tensor], config: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer of a module's trainable parameters, or of given float32 tensors (master weights)."""
    if isinstance(params, nn.Module):
        params = (p for p in params.parameters() if p.requires_grad)
    decay, no_decay = [], []
    for param in params:
        # norm gains are scale parameters: decaying them towards zero only hurts
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.name == "nesterov":
        schedule = linear_momentum_warmup(config.betas[0], config.momentum_start, config.momentum_warmup_steps)
        return NesterovAdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, momentum_schedule=schedule)
    # fused: one multi-threaded pass per tensor, without the full-size temporaries of the per-tensor
    # path (a 657M-parameter LM head stepped on the CPU would otherwise allocate gigabytes each step)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=True)


def clip_and_check(module: nn.Module, max_norm: float | None) -> float:
    """Clip a module's gradients in place; return the global norm before clipping (inf or nan if not finite)."""
    return clip_gradients([p.grad for p in module.parameters() if p.grad is not None], max_norm)


def clip_gradients(grads: list[torch.Tensor], max_norm: float | None) -> float:
    """Scale ``grads`` in place to a global norm of at most ``max_norm``; return the norm before (inf
    or nan if not finite, and then nothing is scaled)."""
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
    if max_norm is not None and bool(torch.isfinite(norm)):
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(scale.to(grad.device))
    return float(norm)
