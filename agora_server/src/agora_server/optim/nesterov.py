"""Nesterov-corrected Adam for asynchronous pipelines (Ajanthan et al., ICML 2025).

In an asynchronous pipeline a stage's gradient was computed on weights a few steps old. A
Nesterov look-ahead with high momentum (β1 ≈ 0.99) compensates: the update uses where the
momentum is about to take the weights, not where they are. This is NAdam (Dozat 2016) with
decoupled weight decay:

    m_t = β1 m + (1 − β1) g                v_t = β2 v + (1 − β2) g²
    m̂   = μ_{t+1} m_t / (1 − Π_{i≤t+1} μ_i) + (1 − μ_t) g / (1 − Π_{i≤t} μ_i)
    θ  ← θ − lr·wd·θ − lr · m̂ / (√(v_t / (1 − β2^t)) + ε)

μ_t is the momentum schedule. torch's NAdam warms it up with μ_t = β1(1 − ½·0.96^{tψ}), which
at ψ = 0.004 is still ≈ 0.5 after 100 steps: a short or freshly joined run never reaches its
high momentum. Here the warm-up is explicit and linear: μ goes from ``momentum_start`` to β1
over ``momentum_warmup_steps`` steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def linear_momentum_warmup(beta1: float, start: float, steps: int) -> Callable[[int], float]:
    """μ_t for t = 1, 2, …: ``start`` at t = 1, rising linearly to ``beta1`` at t = ``steps``."""

    def mu(t: int) -> float:
        if steps <= 1:
            return beta1
        return start + (beta1 - start) * min(1.0, (t - 1) / (steps - 1))

    return mu


class NesterovAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.99, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_schedule: Callable[[int], float] | None = None,
    ):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        # kept off the param groups: they hold plain numbers only, so the state saves and loads safely
        self.momentum_schedule = momentum_schedule or (lambda t: betas[0])
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, mu_of = group["lr"], group["eps"], group["weight_decay"], self.momentum_schedule
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["mu_product"] = 1.0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                t = state["step"]
                mu, mu_next = mu_of(t), mu_of(t + 1)
                mu_product = state["mu_product"] * mu
                state["mu_product"] = mu_product

                param.mul_(1 - lr * wd)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq / (1 - beta2**t)).sqrt_().add_(eps)
                param.addcdiv_(grad, denom, value=-lr * (1 - mu) / (1 - mu_product))
                param.addcdiv_(exp_avg, denom, value=-lr * mu_next / (1 - mu_product * mu_next))
        return loss
