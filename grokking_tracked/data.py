"""Modular-arithmetic datasets (Power et al. 2022; Nanda et al. 2023).

Every example is the token sequence ``[a, b, =]`` with the label ``a ∘ b mod p``; token ``p`` is "=".
The split is a seeded random permutation, independent of the model seed, so one data seed gives the
same train/test sets on every machine and on resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Config


@dataclass
class ModularData:
    train_tokens: torch.Tensor  # (n_train, 3) int64
    train_labels: torch.Tensor  # (n_train,) int64
    test_tokens: torch.Tensor
    test_labels: torch.Tensor
    p: int

    def to(self, device: torch.device | str) -> "ModularData":
        return ModularData(*(t.to(device) for t in
                             (self.train_tokens, self.train_labels, self.test_tokens, self.test_labels)), self.p)

    @property
    def all_tokens(self) -> torch.Tensor:
        return torch.cat([self.train_tokens, self.test_tokens])


def apply_operation(a: torch.Tensor, b: torch.Tensor, p: int, operation: str) -> torch.Tensor:
    if operation == "add":
        return (a + b) % p
    if operation == "sub":
        return (a - b) % p
    if operation == "mul":
        return (a * b) % p
    if operation == "div":
        # a / b = a * b^(p-2) mod p by Fermat's little theorem (p prime, b != 0).
        inverse = torch.tensor([pow(int(x), p - 2, p) for x in range(p)], dtype=torch.long)
        return (a * inverse[b]) % p
    raise ValueError(f"unknown operation {operation!r}")


def all_pairs(p: int, operation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (a, b) pair of the task in a fixed order; division excludes b = 0."""
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(-1)
    if operation == "div":
        keep = b != 0
        a, b = a[keep], b[keep]
    equals = torch.full_like(a, p)
    tokens = torch.stack([a, b, equals], dim=-1)
    return tokens, apply_operation(a, b, p, operation)


def make_dataset(config: Config) -> ModularData:
    tokens, labels = all_pairs(config.p, config.operation)
    generator = torch.Generator().manual_seed(config.data_seed)
    order = torch.randperm(len(tokens), generator=generator)
    n_train = max(1, int(round(config.train_frac * len(tokens))))
    train, test = order[:n_train], order[n_train:]
    return ModularData(tokens[train], labels[train], tokens[test], labels[test], config.p)


def curriculum_order(train_tokens: torch.Tensor) -> torch.Tensor:
    """Indices of the training set from easy to hard: small operands first (the earlier project's idea)."""
    difficulty = train_tokens[:, :2].max(dim=-1).values * train_tokens.shape[0] + torch.arange(len(train_tokens))
    return torch.argsort(difficulty)


def sampler_seed(model_seed: int) -> int:
    """The minibatch sampler's own seed, derived from the model seed (one splitmix64 round), so that the
    order of batches is fixed by the config yet independent of the model's initialisation stream."""
    z = (model_seed + 0x9E3779B97F4A7C15) % 2 ** 64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2 ** 64
    return (z ^ (z >> 31)) % 2 ** 63


class MinibatchSampler:
    """Epochs of shuffled minibatches over ``n`` examples: a fresh permutation each epoch from a private
    ``torch.Generator`` (not the global RNG), consecutive slices of ``batch_size``, the last one shorter when
    ``batch_size`` does not divide ``n`` (as ``torch.split`` in Grokfast's loop). ``state()`` holds the
    generator, the epoch's permutation and the position in it: loading it continues the same sequence."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.permutation: torch.Tensor | None = None
        self.position = 0

    def next_indices(self) -> torch.Tensor:
        if self.permutation is None or self.position >= self.n:
            self.permutation = torch.randperm(self.n, generator=self.generator)
            self.position = 0
        indices = self.permutation[self.position:self.position + self.batch_size]
        self.position += len(indices)
        return indices

    def state(self) -> dict:
        return {"generator": self.generator.get_state(), "permutation": self.permutation, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())
        self.permutation = None if state["permutation"] is None else state["permutation"].cpu()
        self.position = int(state["position"])
