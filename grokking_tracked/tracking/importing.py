"""``grokking-tracked import PATH``: a run trained elsewhere (the earlier project's run folder, or a
TransformerLens ``HookedTransformer`` state dict of our shape) becomes an MLflow run that ``analyze`` and
``compare`` work on: params from its config, its checkpoints converted to ours, the losses it recorded as metrics,
and tags naming the source. Loading stays ``weights_only`` (``analysis/importer.py``)."""

from __future__ import annotations

import json

import torch

from .experiment import IMPORTED_TAG
from .names import mlflow_metrics
from .runs import TrackedRun, metrics_at
from .store import DEFAULT_EXPERIMENT, connect
from .tracker import CHECKPOINT_DIR, checkpoint_name

IMPORTED_KIND_TAG = "grokking_tracked.imported_kind"
IMPORT_NOTES_TAG = "grokking_tracked.import_notes"


def import_run(path: str, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
               run_name: str | None = None, **assumptions) -> str:
    """Import ``path`` as a new FINISHED run; returns its id. ``assumptions``: operation / train_frac / data_seed /
    step for a bare state dict (which records none of them)."""
    from ..analysis.importer import load_foreign_run  # the analysis side, loaded only to import a run

    imported = load_foreign_run(path, **assumptions)  # everything is read and checked before a run exists
    client = connect(tracking_uri)
    tags = {IMPORTED_TAG: imported.source, IMPORTED_KIND_TAG: imported.kind,
            IMPORT_NOTES_TAG: json.dumps(imported.notes)[:5000]}
    with TrackedRun.create_for_config(client, imported.config, experiment, run_name=run_name, tags=tags) as run:
        for step, metrics in imported.history:
            run.log_metrics(metrics_at(mlflow_metrics(metrics), step))
        for step, state in imported.checkpoints:
            staged = run.staging_path(checkpoint_name(step))
            torch.save(state, staged)
            run.log_file(staged, CHECKPOINT_DIR, move=True)
        run.set_tags({"mlflow.note.content": f"imported from {imported.source} ({imported.kind}): "
                                             f"{len(imported.checkpoints)} checkpoints"})
    return run.run_id
