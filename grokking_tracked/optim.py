"""Optimisation strategies of the earlier project, as torch.optim pieces: fused AdamW, lr schedules
(torch schedulers), a weight-decay schedule, the Grokfast gradient filter (Lee et al. 2024), and ⊥AdamW (Prieto et
al. 2025)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import Config


@dataclass
class GrokfastEMA:
    """Grokfast (Lee et al. 2024): amplify the slow gradient component, g <- g + lambda * EMA(g).

    No maintained library ships this filter as an optimizer hook; it is three foreach ops."""

    alpha: float
    lamb: float
    ema: list[torch.Tensor] | None = None

    def apply(self, grads: list[torch.Tensor]) -> None:
        if self.ema is None:
            self.ema = [g.detach().clone() for g in grads]
        else:
            torch._foreach_mul_(self.ema, self.alpha)
            torch._foreach_add_(self.ema, grads, alpha=1 - self.alpha)
        torch._foreach_add_(grads, self.ema, alpha=self.lamb)


def orthogonalize_gradients_(params: list[torch.Tensor], epsilon: float = 1e-30) -> torch.Tensor | None:
    """⊥Grad (Prieto et al. 2025, orthograd.py): per tensor, g <- g - (w.g / w.w) w, rescaled to g's former norm, so
    the step cannot just scale the weights up (naive loss minimisation). ``epsilon`` as their code: 0/0 stays 0.
    Returns cos(-g, w) of the gradient BEFORE the projection over these tensors (stability.nlm_cosine's measure,
    from the products computed here anyway), a device scalar; None without gradients."""
    pairs = [(p.detach(), p.grad) for p in params if p.grad is not None]
    if not pairs:
        return None
    weights, grads = [w for w, _ in pairs], [g for _, g in pairs]
    dots = torch.stack([(w * g).sum() for w, g in pairs])
    w_sq = torch.stack(torch._foreach_norm(weights)) ** 2 + epsilon
    g_norm = torch.stack(torch._foreach_norm(grads))
    raw_cosine = (-dots.sum() / ((w_sq - epsilon).sum().sqrt() * g_norm.square().sum().sqrt()).clamp_min(epsilon))
    torch._foreach_add_(grads, torch._foreach_mul(weights, list((-dots / w_sq).unbind())))
    scale = g_norm / (torch.stack(torch._foreach_norm(grads)) + epsilon)
    torch._foreach_mul_(grads, list(scale.unbind()))
    return raw_cosine.to(torch.float64)


class OrthoAdamW(torch.optim.AdamW):
    """⊥AdamW: AdamW stepping on the gradient made orthogonal to each weight tensor (``orthogonalize_gradients_``).
    A subclass rather than their wrapper, so checkpoints hold plain AdamW state and the fused step is kept.
    ``last_nlm_cosine``: the NLM cosine of the last step's gradient before its projection (a device scalar; after it,
    the gradient is orthogonal to every weight tensor by construction)."""

    last_nlm_cosine: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        self.last_nlm_cosine = orthogonalize_gradients_(params)
        return super().step(closure)


class OrthoSGD(torch.optim.SGD):
    """⊥SGD: SGD stepping on the gradient made orthogonal to each weight tensor, as ``OrthoAdamW``."""

    last_nlm_cosine: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        self.last_nlm_cosine = orthogonalize_gradients_(params)
        return super().step(closure)


def weight_decay_at(config: Config, step: int) -> float:
    """Weight-decay schedule (torch.optim has schedulers for lr only)."""
    if config.wd_schedule == "constant":
        return config.weight_decay
    t = min(1.0, step / max(1, config.wd_schedule_steps))
    if config.wd_schedule == "cosine":
        t = 0.5 * (1 - math.cos(math.pi * t))
    return config.weight_decay + t * (config.wd_final - config.weight_decay)


def make_optimizer(model: torch.nn.Module, config: Config, device: torch.device) -> torch.optim.Optimizer:
    # fused: one kernel per step for all parameters (CPU and CUDA, float32). "adam" is Grokfast's default
    # (its weight decay is an L2 term added to the gradient, not AdamW's decoupled shrinking).
    if config.optimizer in ("sgd", "orthosgd"):  # weight decay as torch's SGD has it: an L2 gradient term
        kind = OrthoSGD if config.optimizer == "orthosgd" else torch.optim.SGD
        return kind(model.parameters(), lr=config.lr, momentum=config.sgd_momentum,
                    weight_decay=config.weight_decay)
    kind = {"adam": torch.optim.Adam, "orthoadamw": OrthoAdamW}.get(config.optimizer, torch.optim.AdamW)
    return kind(model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                weight_decay=config.weight_decay, fused=device.type in ("cpu", "cuda"))


def make_scheduler(optimizer: torch.optim.Optimizer, config: Config):
    if config.lr_schedule == "warmup":
        return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / max(1, config.warmup_steps),
                                                 total_iters=config.warmup_steps)
    if config.lr_schedule == "cyclic":
        half = max(1, config.cyclic_period // 2)
        return torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=config.lr * config.cyclic_min_ratio,
                                                 max_lr=config.lr, step_size_up=half, cycle_momentum=False)
    if config.lr_schedule == "plateau":  # stepped at evaluations with the train loss
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=config.plateau_factor,
                                                          patience=config.plateau_patience)
    return None
