"""Nesterov-corrected Adam for asynchronous pipelines (Ajanthan et al., ICML 2025).

In an asynchronous pipeline a stage's gradient was computed on weights a few steps old. A
Nesterov look-ahead with high momentum compensates: the update uses where the momentum is about to
take the weights, not where they are. This is NAdam (Dozat 2016) with decoupled weight decay, its
momentum average built with the same momentum it is bias-corrected for:

    m_t = μ_t m_{t−1} + (1 − μ_t) g_t                       v_t = β2 v_{t−1} + (1 − β2) g_t²
    m̂_t = (μ_{t+1} m_t + (1 − μ_{t+1}) g_t) / (1 − Π_{i≤t+1} μ_i)       (the next step's average)
    θ  ← θ − lr·wd·θ − lr · m̂_t / (√(v_t / (1 − β2^t)) + ε)

Under a constant gradient m̂_t equals it exactly at every step, so the step is Adam's size from the
first one. (torch's NAdam averages with a fixed β1 but corrects with the product of its μ_t: with
β1 = 0.99 its early steps are 0.4-0.6 of Adam's.) μ_t is the momentum schedule: from
``momentum_start`` to β1 over ``momentum_warmup_steps``, explicit and linear, so a short or freshly
joined run reaches its momentum; the average of a lower μ fills faster, so the ramp never outruns it.
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
            _, beta2 = group["betas"]  # β1 enters through the momentum schedule
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
                exp_avg.lerp_(grad, 1 - mu)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq / (1 - beta2**t)).sqrt_().add_(eps)
                correction = 1 - mu_product * mu_next
                param.addcdiv_(exp_avg, denom, value=-lr * mu_next / correction)
                param.addcdiv_(grad, denom, value=-lr * (1 - mu_next) / correction)
        return loss
