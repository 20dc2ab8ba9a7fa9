"""Reading a run back from the tracking server: its config, metric history and checkpoints.

What a server says is never trusted as a local path:

- A run's artifact repository is the client's checked one (``artifacts.CheckedClient``): with a remote tracking
  server, a local location (``file:``, a bare path, ``runs:/``, ``models:/``) would let the server choose where
  on this machine we read and write, so it is refused unless ``$GROKKING_TRACKED_TRUST_LOCAL_ARTIFACTS=1`` says
  the path is a shared filesystem on purpose. Every later transfer goes through that one repository, whatever
  the server answers afterwards.
- A checkpoint is only ever a name matching ``checkpoints/step_<digits>.pt``, rebuilt by us before anything
  local is made from it; anything else in ``checkpoints/`` is skipped with a warning.
"""

from __future__ import annotations

import logging
import json
import re
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ..checkpoints import CheckpointError, load_checkpoint
from ..config import Config, ConfigError, config_file
from ..metrics import EVAL_METRICS
from .artifacts import checked
from .names import from_mlflow, is_event_metric
from .runs import CONFIG_ARTIFACT, EVENTS_ARTIFACT
from .store import TrackingError, get_run
from .tracker import CHECKPOINT_DIR
from ..messages import short_error

_CHECKPOINT_NAME = re.compile(r"step_(\d{1,12})\.pt")


class RunArtifacts:
    """One run's artifacts, through the client's checked repository of it."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = checked(client), run_id
        self.run = get_run(self.client, run_id)
        self.repository = self.client.artifact_repository(run_id)

    def list(self, path: str | None = None):
        try:
            return self.repository.list_artifacts(path)
        except (MlflowException, OSError) as exc:
            raise TrackingError(f"cannot list {path or 'the artifacts'} of run {self.run_id}: "
                                f"{short_error(exc)}") from None

    def download(self, path: str, destination: str | Path) -> Path:
        Path(destination).mkdir(parents=True, exist_ok=True)
        try:
            return Path(self.repository.download_artifacts(path, str(destination)))
        except (MlflowException, OSError) as exc:
            raise TrackingError(f"cannot download {path!r} of run {self.run_id}: {short_error(exc)}") from None

    def checkpoints(self, warn=None) -> list[tuple[int, str]]:
        """(step, artifact path) of every checkpoint, by step; other files are skipped with a warning."""
        warn = warn or logging.getLogger(__name__).warning
        found = []
        for info in self.list(CHECKPOINT_DIR):
            name = info.path.rsplit("/", 1)[-1]
            match = _CHECKPOINT_NAME.fullmatch(name)
            if info.is_dir or not match or info.path != f"{CHECKPOINT_DIR}/{name}":
                warn(f"grokking-tracked: ignoring {info.path!r} in run {self.run_id}: not a checkpoint of ours")
                continue
            found.append((int(match.group(1)), f"{CHECKPOINT_DIR}/step_{match.group(1)}.pt"))
        return sorted(found)

    def config(self, scratch: str | Path) -> Config:
        """The run's config.json, checked as a whole (``config.stored_config``) before anything is built from it."""
        path = self.download(CONFIG_ARTIFACT, scratch)
        try:
            return config_file(path, f"the {CONFIG_ARTIFACT} of run {self.run_id}")
        except ConfigError as exc:
            raise TrackingError(str(exc)) from None

    def events(self, scratch: str | Path) -> list[dict] | None:
        """The run's events.json (None if it has none, e.g. an imported run)."""
        if not any(info.path == EVENTS_ARTIFACT for info in self.list()):
            return None
        try:
            events = json.loads(self.download(EVENTS_ARTIFACT, Path(scratch) / "events").read_text())
        except ValueError:
            return None
        return events if isinstance(events, list) else None

    def newest_loadable_checkpoint(self, scratch: str | Path) -> dict:
        """The newest checkpoint that loads (a kill mid-upload can leave the last one truncated), weights_only."""
        checkpoints = self.checkpoints()
        if not checkpoints:
            raise TrackingError(f"run {self.run_id} has no checkpoints to resume from")
        for step, artifact in reversed(checkpoints):
            try:
                return load_checkpoint(self.download(artifact, Path(scratch) / f"step_{step}"))
            except CheckpointError as exc:
                logging.getLogger(__name__).warning(f"skipping {artifact}: {exc}")
        raise TrackingError(f"run {self.run_id} has no loadable checkpoint to resume from")


def fetch_history(client: MlflowClient, run_id: str) -> list[tuple[int, dict]]:
    """The run's evaluations as (step, metrics) under our internal names (names.py: today's MLflow names and the
    flat ones of older runs alike), rebuilt from MLflow's metric histories (event steps are left out)."""
    keys = [key for key in get_run(client, run_id).data.metrics if not is_event_metric(key)]
    by_step: dict[int, dict] = {}
    for key in keys:
        for metric in client.get_metric_history(run_id, key):
            by_step.setdefault(metric.step, {})[from_mlflow(key)] = metric.value
    return sorted(by_step.items())


def complete_steps(history: list[tuple[int, dict]]) -> list[int]:
    """Steps whose every evaluation metric is stored (a crash mid-batch can leave a partial step)."""
    return [step for step, metrics in history if set(EVAL_METRICS) <= set(metrics)]


def fetch_config(client: MlflowClient, run_id: str, scratch: str | Path) -> Config:
    return RunArtifacts(client, run_id).config(scratch)


def list_checkpoints(client: MlflowClient, run_id: str) -> list[tuple[int, str]]:
    return RunArtifacts(client, run_id).checkpoints()
