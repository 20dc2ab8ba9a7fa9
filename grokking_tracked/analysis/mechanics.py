"""The earlier project's analyses, done with TransformerLens hooks: attention patterns, activation
statistics, gradient flow and weight evolution, one checkpoint at a time.

Every function takes one model (and at most the previous checkpoint's small summaries), so a sweep over
checkpoints costs linear time and constant memory.
"""

from __future__ import annotations

import torch

from ..metrics import cross_entropy_high_precision
from ..model import attention_from_equals  # noqa: F401 - analyze reads it here

NEAR_ZERO = 1e-6  # |x| below this counts as zero for sparsity (ReLU outputs are exactly 0)


def grid_tokens(p: int) -> torch.Tensor:
    """Every [a, b, =] for a, b in 0..p−1, row-major in (a, b): the input of the forward analyses."""
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(-1)
    return torch.stack([a, b, torch.full_like(a, p)], dim=-1)


@torch.no_grad()
def forward_with_cache(model, p: int):
    """Full forward over the (a, b) grid with every hook cached: (logits (p·p, 3, p), ActivationCache)."""
    return model.run_with_cache(grid_tokens(p))


def attention_summary(grid: torch.Tensor, previous: torch.Tensor | None) -> dict[str, dict[str, float]]:
    """Per head: mean attention to a and b, and mean |change| of the grid since the previous checkpoint."""
    out = {}
    for h in range(grid.shape[0]):
        out[f"head_{h}"] = {
            "to_a": float(grid[h, 0].mean()),
            "to_b": float(grid[h, 1].mean()),
            "change": None if previous is None else float((grid[h] - previous[h]).abs().mean()),
        }
    return out


def activation_stats(cache) -> dict[str, dict[str, float]]:
    """Per hook: mean, std, sparsity (fraction with |x| < NEAR_ZERO) and mean L2 norm of the last axis.

    Attention scores hold −inf where the causal mask hides a key; only finite entries are counted there.
    Reductions run in float32 on the cached tensors without copies (the hot spot of the whole analysis)."""
    stats = {}
    for name in cache.keys():
        x = cache[name].detach()
        finite = torch.isfinite(x) if name.endswith("hook_attn_scores") else None  # only masked scores are ±inf
        if finite is not None:
            x = torch.where(finite, x, 0.0)
            count = int(finite.sum())
            if count == 0:
                continue
            mean = float(x.sum() / count)
            var = float((torch.where(finite, x - mean, 0.0).pow(2)).sum() / max(1, count - 1))
            zeros = float(((x.abs() < NEAR_ZERO) & finite).sum() / count)
        else:
            var_t, mean_t = torch.var_mean(x) if x.numel() > 1 else (torch.zeros(()), x.mean())
            mean, var = float(mean_t), float(var_t)
            zeros = float(torch.count_nonzero(x.abs() < NEAR_ZERO) / x.numel())
        stats[name] = {
            "mean": mean,
            "std": var ** 0.5,
            "sparsity": zeros,
            "norm": float(torch.linalg.vector_norm(x, dim=-1).mean()),
        }
    return stats


def gradient_flow(model, train_tokens: torch.Tensor, train_labels: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per parameter: gradient norm and gradient/parameter norm ratio of the training loss (a real backward,
    on the whole training set as the full-batch trainer does)."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss = cross_entropy_high_precision(model(train_tokens, last_only=True), train_labels)
        loss.backward()
    out = {}
    for name, param in model.named_parameters():
        grad_norm = 0.0 if param.grad is None else float(param.grad.norm())
        param_norm = float(param.detach().norm())
        out[name] = {"grad_norm": grad_norm, "ratio": grad_norm / param_norm if param_norm > 0 else float("nan")}
    model.zero_grad(set_to_none=True)
    return out


def weight_evolution(model, previous: dict[str, torch.Tensor] | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Per-parameter norms, total norm and relative change ||W_t − W_prev|| / ||W_prev|| since the previous
    checkpoint (only consecutive pairs: linear in the number of checkpoints). Returns (summary, snapshot)."""
    snapshot = {name: p.detach().clone() for name, p in model.named_parameters()}
    norms = {name: float(w.norm()) for name, w in snapshot.items()}
    total = float(torch.linalg.vector_norm(torch.stack([w.norm() for w in snapshot.values()])))
    summary = {"norms": norms, "total_norm": total, "relative_change": None, "relative_change_per_param": None}
    if previous is not None:
        per = {name: float((w - previous[name]).norm() / previous[name].norm().clamp_min(1e-12))
               for name, w in snapshot.items()}
        diff = torch.linalg.vector_norm(torch.stack([(w - previous[n]).norm() for n, w in snapshot.items()]))
        prev_total = torch.linalg.vector_norm(torch.stack([w.norm() for w in previous.values()]))
        summary["relative_change"] = float(diff / prev_total.clamp_min(1e-12))
        summary["relative_change_per_param"] = per
    return summary, snapshot
