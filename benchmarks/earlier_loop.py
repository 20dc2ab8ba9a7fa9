"""A faithful re-implementation of the earlier project's training loop (../shared/seed), for speed comparison.

What it keeps from the earlier loop: the same model size (p=113, d_model 64, d_mlp 256, 4 heads, 1 layer),
the full forward over all 3 positions, float32 cross-entropy on the last position, AdamW (lr 1e-3, wd 1,
betas 0.9/0.98, torch's default implementation), the full training batch, an evaluation on the whole test
set after EVERY step with host syncs (``.item()``), per-step Python metric lists and a tqdm bar.

What differs: the earlier project used TransformerLens's ``HookedTransformer``, which TransformerLens 4
removed; our ``GrokkingTransformer`` full forward (same architecture and hook points) stands in for it.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from grokking_tracked.config import Config, preset
from grokking_tracked.data import make_dataset
from grokking_tracked.model import GrokkingTransformer


class EarlierLoop:
    def __init__(self, config: Config | None = None):
        self.config = config or preset("seed")
        self.data = make_dataset(self.config)
        self.model = GrokkingTransformer(self.config)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.lr,
                                           weight_decay=self.config.weight_decay,
                                           betas=(self.config.beta1, self.config.beta2))
        self.train_losses: list[float] = []
        self.test_losses: list[float] = []
        self.train_accs: list[float] = []
        self.test_accs: list[float] = []

    def run(self, steps: int, progress: bool = False) -> float:
        """Train ``steps`` epochs; returns the wall seconds they took."""
        d = self.data
        started = time.perf_counter()
        for _ in tqdm(range(steps), disable=not progress, desc="earlier loop"):
            self.model.train()
            logits = self.model(d.train_tokens)[:, -1]
            loss = F.cross_entropy(logits, d.train_labels)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.train_losses.append(loss.item())
            self.train_accs.append((logits.argmax(-1) == d.train_labels).float().mean().item())
            self.model.eval()
            with torch.no_grad():
                test_logits = self.model(d.test_tokens)[:, -1]
                self.test_losses.append(F.cross_entropy(test_logits, d.test_labels).item())
                self.test_accs.append((test_logits.argmax(-1) == d.test_labels).float().mean().item())
        return time.perf_counter() - started


if __name__ == "__main__":
    loop = EarlierLoop()
    loop.run(5)
    seconds = loop.run(50, progress=True)
    print(f"earlier loop, seed preset: {50 / seconds:.2f} steps/s (torch threads {torch.get_num_threads()})")
