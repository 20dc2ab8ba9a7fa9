"""Reading a run back from the tracking server: its config, metric history and checkpoints.

Artifact paths that come from a server are never trusted as local paths: a checkpoint is only ever a name
matching ``checkpoints/step_<digits>.pt``, rebuilt by us before anything local is made from it; anything else
in ``checkpoints/`` is skipped with a warning.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ..analysis.checkpoints import CheckpointError, load_checkpoint
from ..config import Config
from ..metrics import EVAL_METRICS
from .runs import CONFIG_ARTIFACT
from .store import TrackingError
from .tracker import CHECKPOINT_DIR

_CHECKPOINT_NAME = re.compile(r"step_(\d{1,12})\.pt")


def list_checkpoints(client: MlflowClient, run_id: str, warn=None) -> list[tuple[int, str]]:
    """(step, artifact path) of every checkpoint of the run, by step; other files are skipped with a warning."""
    warn = warn or (lambda message: print(message, file=sys.stderr))
    found = []
    for info in client.list_artifacts(run_id, CHECKPOINT_DIR):
        name = info.path.rsplit("/", 1)[-1]
        match = _CHECKPOINT_NAME.fullmatch(name)
        if info.is_dir or not match or info.path != f"{CHECKPOINT_DIR}/{name}":
            warn(f"grokking-tracked: ignoring {info.path!r} in run {run_id}: not a checkpoint of ours")
            continue
        found.append((int(match.group(1)), f"{CHECKPOINT_DIR}/step_{match.group(1)}.pt"))
    return sorted(found)


def download_artifact(client: MlflowClient, run_id: str, path: str, dst: str | Path) -> Path:
    try:
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"cannot download {path!r} of run {run_id}: {str(exc).splitlines()[0]}") from None


def fetch_history(client: MlflowClient, run_id: str) -> list[tuple[int, dict]]:
    """The run's evaluations as (step, metrics), rebuilt from MLflow's metric histories (event metrics,
    ``*_step``, are not evaluations and are left out)."""
    keys = [key for key in client.get_run(run_id).data.metrics if not key.endswith("_step")]
    by_step: dict[int, dict] = {}
    for key in keys:
        for metric in client.get_metric_history(run_id, key):
            by_step.setdefault(metric.step, {})[key] = metric.value
    return sorted(by_step.items())


def complete_steps(history: list[tuple[int, dict]]) -> list[int]:
    """Steps whose every evaluation metric is stored (a crash mid-batch can leave a partial step)."""
    return [step for step, metrics in history if set(EVAL_METRICS) <= set(metrics)]


def fetch_config(client: MlflowClient, run_id: str, scratch: str | Path) -> Config:
    path = download_artifact(client, run_id, CONFIG_ARTIFACT, scratch)
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except ValueError as exc:
        raise TrackingError(f"run {run_id} has an unusable {CONFIG_ARTIFACT}: {str(exc).splitlines()[0]}") from None


def newest_loadable_checkpoint(client: MlflowClient, run_id: str, scratch: str | Path) -> dict:
    """The newest checkpoint that loads (a kill mid-upload can leave the last one truncated), weights_only."""
    checkpoints = list_checkpoints(client, run_id)
    if not checkpoints:
        raise TrackingError(f"run {run_id} has no checkpoints to resume from")
    for step, artifact in reversed(checkpoints):
        try:
            return load_checkpoint(download_artifact(client, run_id, artifact, scratch))
        except CheckpointError as exc:
            print(f"grokking-tracked: skipping {artifact}: {exc}", file=sys.stderr)
    raise TrackingError(f"run {run_id} has no loadable checkpoint to resume from")
