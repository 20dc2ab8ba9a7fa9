"""Mechanistic analysis over training checkpoints (imports neither mlflow nor optuna).

- ``grokking_tracked.checkpoints`` (the core; re-exported here): the checkpoint format, safe loading
  (``weights_only=True``) and model reconstruction, one-line errors.
- ``mechanics``: attention patterns, activation statistics, gradient flow, weight evolution (TransformerLens hooks).
- ``grokking_tracked.fourier`` (the core, beside ``measures``): Nanda et al. 2023's Fourier formulas.
- ``report``: ``analyze_checkpoints`` (figures + ``summary.json``); ``plots``: its figures and ``compare_figure``.
- ``detection``: the onset early warning over many runs; ``importer``: runs trained elsewhere.

Names are imported lazily so that ``from grokking_tracked.analysis import CheckpointError`` stays cheap
for the CLI's error paths (transformer_lens takes seconds to import).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "..checkpoints",
    "load_checkpoint": "..checkpoints",
    "model_from_checkpoint": "..checkpoints",
    "find_checkpoints": "..checkpoints",
    "analyze_checkpoints": ".report",
    "compare_figure": ".plots",
    "load_foreign_run": ".importer",
    "onset_quality": ".detection",
    "onset_quality_figure": ".detection",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
