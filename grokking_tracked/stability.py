"""Numerical stability of the training loss (Prieto et al. 2025, "Grokking at the edge of numerical stability"):
StableMax and its cross-entropy, the softmax-collapse fraction, the naive-loss-minimisation (NLM) alignment and the
logit scale. Pure torch; the definitions follow their public code (``LucasPrietoAl/grokking-at-the-edge-of-numerical-
stability``: ``utils.py`` for StableMax, ``logger.py`` for the collapse, ``orthograd.py`` for the projection, which
lives in ``optim.py``).

Formulas (z: one example's logits, y: its label, theta: all parameters, g: the loss gradient):

- StableMax: s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0; StableMax(z)_i = s(z_i) / sum_j s(z_j). Its
  cross-entropy is -log StableMax(z)_y, computed in float64 as their code does.
- softmax-collapse fraction: the share of training examples whose float32 softmax sums, after subtracting the
  largest logit, to exactly 1: sum_j exp(z_j - max z) == 1, i.e. every other class's exp rounds away and the top
  class gets probability exactly 1.0. Once the top class is the label (memorised), that example's float32 loss is
  exactly 0 and its gradient on the correct logit, p_y - 1, exactly zero (Prieto et al.'s softmax collapse). Their ``compute_softmax_collapse`` in the precision of the loss; we read
  it in float32 (their default, and the precision our logits are computed in) whatever the loss.
- NLM alignment: cos(-g, theta) over all parameters flattened together. +1: the step only scales the weights up
  (naive loss minimisation), -1: it only shrinks them, 0: it is orthogonal to them (what the projection of ⊥Grad
  enforces per tensor).
- logit scale: the mean over training examples of the largest logit, max_i z_i.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .metrics import per_example_loss
# The live measures this module adds to the progress section (their MLflow names: progress/<name>).
STABILITY_METRICS = ("softmax_collapse", "nlm_cosine", "logit_scale")


def stablemax_s(x: torch.Tensor, epsilon: float = 1e-30) -> torch.Tensor:
    """s(x) = x + 1 for x >= 0 and 1 / (1 - x) below: positive, increasing, linear instead of exponential growth.
    ``epsilon`` keeps the division finite as their code does (it is far below float64's resolution at 1)."""
    return torch.where(x < 0, 1 / (1 - x + epsilon), x + 1)


def stablemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """StableMax probabilities: s(z_i) / sum_j s(z_j)."""
    s = stablemax_s(logits)
    return s / s.sum(dim=dim, keepdim=True)


def log_stablemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.log(stablemax(logits, dim=dim))


def training_loss_per_example(logits: torch.Tensor, labels: torch.Tensor, loss: str = "softmax") -> torch.Tensor:
    """Each example's loss: logits (..., N, classes), labels (N,) or (..., N) -> (..., N) float64.

    ``softmax``: cross-entropy with the log-softmax in float64 (this project's default, as TransformerLens's grokking
    demo); ``softmax32``: the log-softmax in float32 (Prieto et al.'s default ``cross_entropy_float32``, the one that
    collapses), returned as float64; ``stablemax``: StableMax cross-entropy in float64 (their
    ``stablemax_cross_entropy``)."""
    if loss == "softmax":
        return per_example_loss(logits, labels)  # metrics.py's, the one every evaluation reports
    if loss == "stablemax":
        log_probs = log_stablemax(logits.to(torch.float64))
    else:  # softmax32
        log_probs = logits.to(torch.float32).log_softmax(dim=-1)
    picked = log_probs.gather(-1, labels.expand(logits.shape[:-1])[..., None]).squeeze(-1)
    return -picked.to(torch.float64)


def softmax_collapse(logits: torch.Tensor) -> torch.Tensor:
    """(N,) bool: does float32 softmax give the top class of each row exactly 1 (sum_j exp(z_j - max z) == 1)?"""
    shifted = logits.to(torch.float32)
    shifted = shifted - shifted.amax(dim=-1, keepdim=True)
    return torch.exp(shifted).sum(dim=-1) == 1


def softmax_collapse_fraction(logits: torch.Tensor) -> torch.Tensor:
    """The share of rows of ``logits`` (N, classes) in softmax collapse, a float64 device scalar."""
    return softmax_collapse(logits).to(torch.float64).mean()


def logit_scale(logits: torch.Tensor) -> torch.Tensor:
    """The mean over rows of the largest logit, a float64 device scalar."""
    return logits.amax(dim=-1).to(torch.float64).mean()


def nlm_cosine(parameters: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """cos(-g, theta) over all parameters flattened together, a float64 device scalar (0 where either is zero).
    ``grads`` defaults to each parameter's ``.grad``; a parameter without one counts as a zero gradient."""
    params = [p.detach() for p in parameters]
    grads = [p.grad for p in parameters] if grads is None else list(grads)
    pairs = [(p, g.detach()) for p, g in zip(params, grads) if g is not None]
    if not pairs:
        return torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)
    dot = torch.stack([-(p.to(torch.float64) * g.to(torch.float64)).sum() for p, g in pairs]).sum()
    weight = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.to(torch.float64)) for p in params]))
    grad = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.to(torch.float64)) for _, g in pairs]))
    denominator = weight * grad
    return torch.where(denominator > 0, dot / denominator.clamp_min(torch.finfo(torch.float64).tiny),
                       torch.zeros_like(dot))


def stability_measures(train_logits: torch.Tensor, parameters: Sequence[torch.Tensor],
                       nlm: torch.Tensor | None = None) -> torch.Tensor:
    """(3,) float64 device tensor in STABILITY_METRICS order: collapse fraction and logit scale over the training
    examples' logits (N, classes), NLM cosine of the parameters' current gradients (or ``nlm`` where the optimizer
    measured it before changing the gradients: ⊥AdamW). Nothing is read to the host."""
    nlm = nlm_cosine(parameters) if nlm is None else nlm.to(torch.float64)
    return torch.stack([softmax_collapse_fraction(train_logits), nlm, logit_scale(train_logits)])
