"""The life cycle of every MLflow run we write: open (create or reopen), send, end. One place.

A plain run, a resumed run, a study trial, a lockstep member and a study's parent run are all a
``TrackedRun``: a context manager that creates the run with its params, tags and opening artifacts in as few
requests as MLflow allows, hands out its ``MlflowTracker`` and always ends it with the status that matches how
the block ended (FINISHED; KILLED for Ctrl-C, SIGTERM or a deliberate stop; FAILED for an error).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from ..config import Config
from ..train import TrainingStopped
from .store import ensure_experiment

RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
PARENT_RUN_TAG = "mlflow.parentRunId"
TASK_TAG = "grokking_tracked.task"
PRESET_TAG = "grokking_tracked.preset"
ROLE_TAG = "grokking_tracked.role"  # "trial" or "study" for a study's runs
CONFIG_ARTIFACT = "config.json"
EVENTS_ARTIFACT = "events.json"
END_WAIT_SECONDS = 60.0  # how long ending a run waits for what it still has to send


def status_for(error: BaseException | None) -> str:
    """FINISHED without an error; KILLED for interruptions (Ctrl-C, SIGTERM, a deliberate stop), else FAILED."""
    if error is None:
        return FINISHED
    if isinstance(error, (KeyboardInterrupt, SystemExit, TrainingStopped)):
        return KILLED
    return FAILED


def metrics_at(values: dict[str, float], step: int) -> list[Metric]:
    """MLflow metrics of one step, timestamped now (None values are skipped)."""
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for key, value in values.items() if value is not None]


def config_params(config: Config) -> list[Param]:
    return [Param(key, str(value)) for key, value in config.to_dict().items()]


class _DirectSender:
    """Sends a run's operations in order without blocking the caller: metric batches through MLflow's
    asynchronous logging, files and small artifacts on one upload thread that first waits for the metrics sent
    before them (so a checkpoint never exists before its steps' metrics)."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-upload")
        self._pending_metrics: list = []
        self._pending: list = []
        self._scratch = tempfile.TemporaryDirectory(prefix="grokking-tracked-")

    def staging_path(self, name: str) -> Path:
        return Path(self._scratch.name) / name

    def log_metrics(self, metrics: list[Metric]) -> None:
        if metrics:
            self._pending_metrics.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))

    def _submit(self, function, *args) -> None:
        metrics, self._pending_metrics = self._pending_metrics, []

        def after_metrics():
            for operation in metrics:
                operation.wait()
            function(*args)

        self._pending.append(self._uploads.submit(after_metrics))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit(self.client.log_batch, self.run_id, (), (), [RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, value: Any, artifact_file: str) -> None:
        self._submit(self.client.log_dict, self.run_id, value, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit(self.client.log_text, self.run_id, text, artifact_file)

    def log_file(self, path: Path, artifact_path: str | None = None, move: bool = False) -> None:
        def upload():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
            if move:
                Path(path).unlink(missing_ok=True)

        self._submit(upload)

    def log_figure(self, figure, artifact_file: str) -> None:
        from ..figures import save_figure

        path = save_figure(figure, self.staging_path(Path(artifact_file).name))
        self.log_file(path, str(Path(artifact_file).parent), move=True)

    def terminate(self, status: str) -> None:
        self._submit(self.client.set_terminated, self.run_id, status)

    def wait(self, timeout: float | None = None) -> bool:
        """True once everything sent so far is stored; re-raises the first error."""
        metrics, self._pending_metrics = self._pending_metrics, []
        for operation in metrics:
            operation.wait()
        pending, self._pending = self._pending, []
        for future in pending:
            future.result(timeout=timeout)
        return True

    def close(self) -> None:
        self._uploads.shutdown(wait=True)
        self._scratch.cleanup()


class TrackedRun:
    """One MLflow run from open to end. Use ``TrackedRun.create``/``TrackedRun.reopen`` in a ``with`` block."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id
        self.sender = _DirectSender(client, run_id)
        self.status: str | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, client: MlflowClient, experiment: str, *, run_name: str | None = None,
               tags: dict[str, str] | None = None, params: Iterable[Param] = (),
               artifacts: dict[str, Any] | None = None, parent_run_id: str | None = None) -> "TrackedRun":
        """A new RUNNING run with its tags (one request), params (one request) and opening JSON/text artifacts.
        If filling it fails, it ends FAILED (KILLED on Ctrl-C) before the error propagates."""
        tags = dict(tags or {})
        if parent_run_id:
            tags[PARENT_RUN_TAG] = parent_run_id
        run = client.create_run(ensure_experiment(client, experiment), run_name=run_name, tags=tags)
        tracked = cls(client, run.info.run_id)
        try:
            params = list(params)
            if params:
                client.log_batch(tracked.run_id, params=params)
            for name, value in (artifacts or {}).items():
                if isinstance(value, str):
                    client.log_text(tracked.run_id, value, name)
                else:
                    client.log_dict(tracked.run_id, value, name)
        except BaseException as error:
            tracked.end(status_for(error))
            raise
        return tracked

    @classmethod
    def create_for_config(cls, client: MlflowClient, config: Config, experiment: str, *, run_name: str | None = None,
                          tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> "TrackedRun":
        """A training run: the config as params and ``config.json``, an empty ``events.json``."""
        tags = {TASK_TAG: f"{config.operation} mod {config.p}", **(tags or {})}
        return cls.create(client, experiment, run_name=run_name, tags=tags, params=config_params(config),
                          artifacts={CONFIG_ARTIFACT: config.to_dict(), EVENTS_ARTIFACT: []},
                          parent_run_id=parent_run_id)

    @classmethod
    def reopen(cls, client: MlflowClient, run_id: str) -> "TrackedRun":
        """An existing run continued (``--resume``, a study's parent on a later invocation): RUNNING again."""
        client.update_run(run_id, status=RUNNING)
        return cls(client, run_id)

    # ------------------------------------------------------------------ sending
    def tracker(self, **options):
        from .tracker import MlflowTracker

        return MlflowTracker(self, **options)

    def log_metrics(self, metrics: list[Metric]) -> None:
        self.sender.log_metrics(metrics)

    def log_values(self, values: dict[str, float], step: int) -> None:
        self.log_metrics(metrics_at(values, step))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.sender.set_tags(tags)

    def log_dict(self, value: Any, artifact_file: str) -> None:
        self.sender.log_dict(value, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.sender.log_text(text, artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.sender.log_figure(figure, artifact_file)

    def log_file(self, path: Path, artifact_path: str | None = None, move: bool = False) -> None:
        """Upload a file; ``move``: it was written into ``staging_path()`` and is ours to delete once sent."""
        self.sender.log_file(path, artifact_path, move=move)

    def staging_path(self, name: str) -> Path:
        """Where to write a file (a checkpoint) that ``log_file(..., move=True)`` will send."""
        return self.sender.staging_path(name)

    # ------------------------------------------------------------------ ending
    def end(self, status: str) -> None:
        """Deliver what is pending, then set the final status; once only. Never raises over the error that
        ended the block (a failed send is reported on stderr, and the run still gets its status)."""
        if self.status is not None:
            return
        self.status = status
        try:
            try:
                self.sender.terminate(status)
                self.sender.wait(END_WAIT_SECONDS)
            finally:
                self.sender.close()
        except Exception as error:  # noqa: BLE001
            if status == FINISHED:
                self.status = None
                self._terminate_directly(FAILED)
                raise
            print(f"grokking-tracked: could not deliver everything to run {self.run_id}: "
                  f"{str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
            self._terminate_directly(status)

    def _terminate_directly(self, status: str) -> None:
        try:
            self.client.set_terminated(self.run_id, status=status)
            self.status = status
        except Exception:  # noqa: BLE001 - the server may be the reason we are ending; nothing more to do
            pass

    def __enter__(self) -> "TrackedRun":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        self.end(status_for(error))
        return False

