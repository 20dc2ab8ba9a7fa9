"""Progress measures of Nanda et al. 2023, cheap enough to compute during training.

``ProgressMeasures`` precomputes, once and on the model's device, the task's (a, b) grid in group order and
the Fourier basis; each reading is then one forward pass over the grid, a few small matrix products and ONE
host sync. The formulas live in ``fourier`` (one implementation, shared with ``analyze``).

Live readings use the key frequencies of the current embedding (a causal choice: the final ones are not
known yet); ``analyze`` uses the last checkpoint's, as the paper does, so early values of the restricted
loss differ between the two: before any key frequency stands out, the live restricted loss is the loss of
the constant logits (about log p) and the live excluded loss equals the training loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from . import fourier
from .data import all_pairs
from .measure_registry import MeasureInput, compute_all, hooks_of, measures as registered_measures

PROGRESS_METRICS = ("restricted_loss", "excluded_loss", "gini_embedding", "gini_neuron_logit", "total_weight_norm",
                    "n_key_frequencies")


@dataclass
class ProgressReading:
    metrics: dict[str, float]  # PROGRESS_METRICS
    key_frequencies: list[int]  # of the embedding W_E
    neuron_logit_key_frequencies: list[int]  # the cross-check, from W_L = W_out W_U
    embedding_freq_norms: list[float]  # per frequency 1..n//2
    neuron_logit_freq_norms: list[float]


class ProgressMeasures:
    """``measures(model)`` -> the PROGRESS_METRICS as floats; ``measures.key_frequencies`` the current keys."""

    def __init__(self, p: int, operation: str, train_tokens: torch.Tensor, device: torch.device | str = "cpu"):
        self.grid = fourier.TaskGrid.build(p, operation, train_tokens, device)
        self.pair_tokens = all_pairs(p, "add")[0].to(device)  # every (a, b) row-major (all p², whatever the task)
        self.train_rows = (train_tokens[:, 0] * p + train_tokens[:, 1]).to(device)
        self._residues = torch.tensor(self.grid.view.residues, device=device)
        self.key_frequencies: list[int] = []

    @torch.no_grad()
    def read(self, model, keys: list[int] | None = None, logits: torch.Tensor | None = None) -> ProgressReading:
        """All measures of one model. ``keys``: fixed key frequencies (``analyze`` passes the final model's);
        None picks them from this model's embedding. ``logits``: (n², c) grid logits if already computed."""
        grid, basis = self.grid, self.grid.basis
        if logits is None:
            logits = model(grid.tokens, last_only=True)
        embedding = model.embed.W_E[self._residues]  # (n, d_model) in group order
        w_l = rearrange(fourier.neuron_logit_map(model)[:, self._residues], "m x -> x m")  # over the output c
        embedding_norms = fourier.frequency_norms(embedding, basis)
        neuron_logit_norms = fourier.frequency_norms(w_l, basis)
        found = fourier.key_frequency_mask(embedding_norms)
        if keys is None:
            key_mask = found
        else:
            key_mask = torch.zeros_like(found)
            key_mask[torch.tensor(keys, dtype=torch.long, device=found.device) - 1] = True
        restricted, excluded = fourier.restricted_and_excluded_loss(logits, grid, key_mask)
        params = [p.detach() for p in model.parameters()]
        scalars = torch.stack([
            restricted, excluded,
            fourier.gini(fourier.basis_norms(embedding, basis)), fourier.gini(fourier.basis_norms(w_l, basis)),
            torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params))).to(torch.float64),
            found.sum().to(torch.float64),
        ])
        n_freqs = embedding_norms.numel()
        values = torch.cat([scalars, embedding_norms, neuron_logit_norms, found.to(torch.float64),
                            fourier.key_frequency_mask(neuron_logit_norms).to(torch.float64)]).tolist()  # one sync
        head, rest = values[: len(scalars)], values[len(scalars):]
        chunks = [rest[i * n_freqs:(i + 1) * n_freqs] for i in range(4)]
        return ProgressReading(
            metrics=dict(zip(PROGRESS_METRICS, head)),
            key_frequencies=[k + 1 for k, on in enumerate(chunks[2]) if on],
            neuron_logit_key_frequencies=[k + 1 for k, on in enumerate(chunks[3]) if on],
            embedding_freq_norms=chunks[0], neuron_logit_freq_norms=chunks[1])

    def __call__(self, model) -> dict[str, float]:
        reading = self.read(model)
        self.key_frequencies = reading.key_frequencies
        return {**reading.metrics, **self.live(model, reading.key_frequencies)}

    @torch.no_grad()
    def live(self, model, keys: list[int]) -> dict[str, float]:
        """The registered live measures (``measure_registry``, ``live=True``) at this reading: one forward over
        every pair caching only the hooks they declare; {} (and no forward) when none is registered."""
        selected = registered_measures(live=True)
        if not selected:
            return {}
        logits, cache = model.run_with_cache(self.pair_tokens, names_filter=list(hooks_of(selected)))
        values = compute_all(selected, MeasureInput(model, None, logits[:, -1], cache, self.grid, keys,
                                                    train_rows=self.train_rows))
        return {name: float(value) for name, value in values.items()
                if name in {m for measure in selected for m in measure.metrics} and value is not None}
