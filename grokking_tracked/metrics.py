"""The loss and the evaluation metrics, written once for ``Trainer``, ``LockstepTrainer`` and the analysis.

Log-softmax runs in float64: at train losses near 1e-7, float32 rounding distorts the gradient (as
TransformerLens's grokking demo notes), and the reported losses are that small after memorisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EVAL_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm", "grad_norm")


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example in float64: logits (..., N, classes), labels (N,) or (..., N) -> (..., N)."""
    log_probs = logits.to(torch.float64).log_softmax(dim=-1)
    return -log_probs.gather(-1, labels.expand(logits.shape[:-1])[..., None]).squeeze(-1)


def cross_entropy_high_precision(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy with the log-softmax in float64 (the training loss)."""
    return per_example_loss(logits, labels).mean()


def split_metrics(logits: torch.Tensor, labels: torch.Tensor, train_mask: torch.Tensor) -> torch.Tensor:
    """(..., 4) float64: train loss, train accuracy, test loss, test accuracy over all examples at once.

    logits (..., N, classes); labels (N,); train_mask (..., N) bool marks each model's training examples
    (one model: shape (N,); K models in lockstep: (K, N)). Nothing is read back to the host here."""
    losses = per_example_loss(logits, labels)
    correct = (logits.argmax(dim=-1) == labels).to(torch.float64)
    train = train_mask.to(torch.float64).expand_as(losses)
    test = 1.0 - train
    n_train, n_test = train.sum(-1), test.sum(-1)
    return torch.stack([(losses * train).sum(-1) / n_train, (correct * train).sum(-1) / n_train,
                        (losses * test).sum(-1) / n_test, (correct * test).sum(-1) / n_test], dim=-1)


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all tensors together (0 for none), as a float64 device scalar."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors)))).to(torch.float64)


def weight_and_grad_norms(parameters: Sequence[torch.Tensor]) -> torch.Tensor:
    """(2,) float64: the norm of all parameters and of their current gradients (0 before any backward)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    weight = global_norm(parameters)
    grad = global_norm(grads).to(weight.device) if grads else torch.zeros((), dtype=torch.float64, device=weight.device)
    return torch.stack([weight, grad])
