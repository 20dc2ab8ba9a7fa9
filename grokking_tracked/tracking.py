"""MLflow adapter: a training run as an MLflow run, and back.

Everything MLflow-specific lives here: where the store is, run life cycle (no run is ever left RUNNING
by an error we can catch), params, step-indexed metrics logged asynchronously so the training loop
never waits on HTTP, detection events, checkpoints and figures as artifacts, and fetching them back
for ``--resume`` and ``analyze``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

from . import figures
from .config import Config, UserError
from .analysis.checkpoints import CheckpointError, load_checkpoint
from .train import Callback, Trainer, TrainingStopped, TrainResult

METRIC_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm", "grad_norm", "lr")
CHECKPOINT_DIR = "checkpoints"
DEFAULT_EXPERIMENT = "grokking"


class TrackingError(UserError, RuntimeError):
    """A user-facing tracking problem (unreachable server, unknown run, missing artifact); one line."""


# ---------------------------------------------------------------------------------------------- store
def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the embedded store: SQLite + artifacts under ./mlruns/."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path("mlruns").resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store}/mlflow.db"


def connect(uri: str | None = None) -> MlflowClient:
    """A client for the store; a remote server is probed first so an unreachable one fails in seconds."""
    uri = resolve_tracking_uri(uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # ours shows checkpoint by checkpoint
    if uri.startswith(("http://", "https://")):
        # MLflow retries 7 times with exponential back-off by default: minutes before an error.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as exc:
            raise TrackingError(f"cannot reach the MLflow tracking server at {uri} ({type(exc).__name__})") from None
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another worker created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def get_run(client: MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"no MLflow run with id {run_id!r} at {client.tracking_uri}") from None


def end_run(client: MlflowClient, run_id: str, status: str) -> None:
    client.set_terminated(run_id, status=status)


def status_for(exc: BaseException) -> str:
    """KILLED for interruptions (Ctrl-C, SIGTERM, a pruned trial), FAILED for errors."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit, TrainingStopped)):
        return RunStatus.to_string(RunStatus.KILLED)
    return RunStatus.to_string(RunStatus.FAILED)


# ---------------------------------------------------------------------------------------------- logging
def config_params(config: Config) -> list[Param]:
    return [Param(k, str(v)) for k, v in config.to_dict().items()]


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_DIR}/step_{step:07d}.pt"


class MlflowTracker(Callback):
    """Logs a Trainer into one MLflow run without making the training loop wait on the tracking server.

    - Evaluations are buffered and sent as one ``log_batch`` about once a second (and at every event,
      checkpoint and the end) through MLflow's asynchronous logging: one HTTP request a second instead of
      one per evaluation, which also spares a server sharing the machine.
    - Checkpoints and event artifacts are uploaded by one background thread, in order.
    - After ``--resume``, evaluations whose step the run already holds (``logged_steps``) are not sent
      again, so every step appears exactly once even if the crash left a gap.
    """

    def __init__(self, client: MlflowClient, run_id: str, logged_steps: Iterable[int] = (),
                 log_figures: bool = True, flush_seconds: float = 1.0):
        from concurrent.futures import ThreadPoolExecutor

        self.client, self.run_id = client, run_id
        self.logged_steps = set(logged_steps)
        self.log_figures = log_figures
        self.flush_seconds = flush_seconds
        self._buffer: list[Metric] = []
        self._last_send = time.monotonic()
        self._pending_metrics = []
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-upload")
        self._pending_uploads = []
        self._scratch = tempfile.TemporaryDirectory(prefix="grokking-tracked-")

    def on_eval(self, trainer: Trainer, step: int, metrics: dict, events: list[dict]) -> None:
        if step in self.logged_steps:
            return
        now = int(time.time() * 1000)
        self._buffer += [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self._buffer += [Metric(f"{event['event']}_step", float(event["step"]), now, step) for event in events]
        if events or time.monotonic() - self._last_send >= self.flush_seconds:
            self._send()
        if events:  # rare (at most three a run), so a person watching the UI sees them arrive
            detected = [dict(event) for event in trainer.detector.events]
            self._upload(self.client.log_dict, self.run_id, detected, "events.json")
            if any(event["event"] == "generalization" for event in events):
                self._upload(self.client.set_tag, self.run_id, "grokked", "true")

    def _send(self) -> None:
        if self._buffer:
            batch, self._buffer = self._buffer, []
            self._pending_metrics.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))
        self._last_send = time.monotonic()

    def _upload(self, function, *args) -> None:
        self._pending_uploads.append(self._uploads.submit(function, *args))

    def on_checkpoint(self, trainer: Trainer, step: int, reasons: list[str]) -> None:
        # The loop only snapshots the state (a copy on the device, no host sync); serialising and uploading
        # happen on the upload thread. That thread first waits for the metrics sent so far, so a checkpoint
        # never exists before the metrics of its steps: a resume from it never has to guess what was logged.
        self._send()
        metrics_sent, self._pending_metrics = self._pending_metrics, []
        self._upload(self._save_and_log, step, copy.deepcopy(trainer.state_dict()), metrics_sent)

    def _save_and_log(self, step: int, state: dict, metrics_sent: list) -> None:
        for operation in metrics_sent:
            operation.wait()
        path = Path(self._scratch.name) / Path(checkpoint_name(step)).name
        torch.save(state, path)
        self.client.log_artifact(self.run_id, str(path), CHECKPOINT_DIR)
        path.unlink()

    def flush_metrics(self) -> None:
        self._send()
        pending, self._pending_metrics = self._pending_metrics, []
        for operation in pending:
            operation.wait()

    def flush(self) -> None:
        """Wait until everything sent so far is stored; re-raises the first upload error."""
        self.flush_metrics()
        pending, self._pending_uploads = self._pending_uploads, []
        for future in pending:
            future.result()

    def close(self) -> None:
        self._uploads.shutdown(wait=True)
        self._scratch.cleanup()

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        self.flush()
        self.client.log_dict(self.run_id, result.events, "events.json")
        self.client.set_tag(self.run_id, "grokked", "true" if result.grokked else "false")
        if self.log_figures:
            log_run_figures(self.client, self.run_id, trainer, result)


def log_run_figures(client: MlflowClient, run_id: str, trainer: Trainer, result: TrainResult) -> None:
    title = (f"{trainer.config.operation} mod {trainer.config.p}, train fraction {trainer.config.train_frac}, "
             f"lr {trainer.config.lr:g}, wd {trainer.config.weight_decay:g}")
    for name, fig in (("learning_curves", figures.learning_curves(result.history, result.events, title)),
                      ("norms", figures.norm_curves(result.history, result.events)),
                      ("attention", figures.attention_heatmap(trainer.model, trainer.config.p))):
        client.log_figure(run_id, fig, f"figures/{name}.png")


# ---------------------------------------------------------------------------------------------- run / resume
@dataclass
class ExperimentResult:
    run_id: str
    result: TrainResult
    tracking_uri: str

    @property
    def history(self) -> list[tuple[int, dict]]:
        return self.result.history

    def history_frame(self):
        """The metric history as a pandas DataFrame indexed by step."""
        import pandas as pd

        return pd.DataFrame([{"step": s, **m} for s, m in self.history]).set_index("step")

    def summary(self) -> str:
        mem, gen = self.result.step_of("memorization"), self.result.step_of("generalization")
        return (f"memorized at step {mem if mem is not None else '-'}, "
                f"generalized at step {gen if gen is not None else '- (not within the budget)'}, "
                f"{self.result.final_step} steps in {self.result.train_seconds:.1f} s")


def _train_in_run(client: MlflowClient, run_id: str, trainer: Trainer, tracker: MlflowTracker) -> TrainResult:
    """Train inside an open run; whatever happens, the run leaves RUNNING."""
    try:
        result = trainer.train()
    except BaseException as exc:
        try:
            tracker.flush()
        finally:
            tracker.close()
            end_run(client, run_id, status_for(exc))
        raise
    tracker.close()
    end_run(client, run_id, "FINISHED")
    return result


def create_config_run(client: MlflowClient, config: Config, experiment: str = DEFAULT_EXPERIMENT,
                      run_name: str | None = None, parent_run_id: str | None = None, tags: dict | None = None) -> str:
    """A new RUNNING run holding the config (params, config.json) and an empty events.json; its id.
    If filling it fails, the run ends FAILED/KILLED before the error propagates."""
    run_tags = {"grokking_tracked.task": f"{config.operation} mod {config.p}", **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(ensure_experiment(client, experiment), run_name=run_name, tags=run_tags)
    run_id = run.info.run_id
    try:
        client.log_batch(run_id, params=config_params(config))
        client.log_dict(run_id, config.to_dict(), "config.json")
        client.log_dict(run_id, [], "events.json")
    except BaseException as exc:
        end_run(client, run_id, status_for(exc))
        raise
    return run_id


def run_experiment(config: Config, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                   run_name: str | None = None, parent_run_id: str | None = None, tags: dict | None = None,
                   callbacks: Iterable[Callback] = (), progress: bool = True,
                   on_run_started: Callable[[str], None] | None = None) -> ExperimentResult:
    """Train ``config`` as one MLflow run; returns its run id and the metric history."""
    config.validate()
    client = connect(tracking_uri)
    run_id = create_config_run(client, config, experiment, run_name, parent_run_id, tags)
    try:
        tracker = MlflowTracker(client, run_id)
        trainer = Trainer(config, [tracker, *callbacks], progress=progress)
        if on_run_started is not None:
            on_run_started(run_id)
    except BaseException as exc:
        end_run(client, run_id, status_for(exc))
        raise
    return ExperimentResult(run_id, _train_in_run(client, run_id, trainer, tracker), client.tracking_uri)


def list_checkpoints(client: MlflowClient, run_id: str) -> list[tuple[int, str]]:
    """(step, artifact path) of every checkpoint of the run, by step."""
    found = []
    for info in client.list_artifacts(run_id, CHECKPOINT_DIR):
        name = Path(info.path).name
        if name.startswith("step_") and name.endswith(".pt"):
            found.append((int(name[len("step_"):-len(".pt")]), info.path))
    return sorted(found)


def download_artifact(client: MlflowClient, run_id: str, path: str, dst: str | Path) -> Path:
    try:
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"cannot download {path!r} of run {run_id}: {str(exc).splitlines()[0]}") from None


def fetch_history(client: MlflowClient, run_id: str) -> list[tuple[int, dict]]:
    """The run's evaluations as (step, metrics), rebuilt from MLflow's metric histories."""
    by_step: dict[int, dict] = {}
    for key in METRIC_KEYS:
        for metric in client.get_metric_history(run_id, key):
            by_step.setdefault(metric.step, {})[key] = metric.value
    return sorted(by_step.items())


def fetch_config(client: MlflowClient, run_id: str, scratch: str | Path) -> Config:
    path = download_artifact(client, run_id, "config.json", scratch)
    return Config.from_dict(json.loads(path.read_text()))


def resume_experiment(run_id: str, tracking_uri: str | None = None, progress: bool = True,
                      callbacks: Iterable[Callback] = (), max_steps: int | None = None) -> ExperimentResult:
    """Continue a run from its last checkpoint, in the same MLflow run (after a crash, or to train longer
    with a larger ``max_steps``: MLflow params are immutable, so the new budget goes to config.json and a tag)."""
    client = connect(tracking_uri)
    get_run(client, run_id)
    with tempfile.TemporaryDirectory(prefix="grokking-resume-") as scratch:
        config = fetch_config(client, run_id, scratch)
        if max_steps is not None:
            config = config.replace(max_steps=max_steps)
        checkpoints = list_checkpoints(client, run_id)
        if not checkpoints:
            raise TrackingError(f"run {run_id} has no checkpoints to resume from")
        state = None
        for step, artifact in reversed(checkpoints):  # newest first; a kill mid-upload can truncate the last
            try:
                state = load_checkpoint(download_artifact(client, run_id, artifact, scratch))  # weights_only
                break
            except CheckpointError as exc:
                print(f"grokking-tracked: skipping {artifact}: {exc}", file=sys.stderr)
        if state is None:
            raise TrackingError(f"run {run_id} has no loadable checkpoint to resume from")
    history = fetch_history(client, run_id)
    tracker = MlflowTracker(client, run_id, logged_steps=[s for s, m in history if set(METRIC_KEYS) <= set(m)])
    trainer = Trainer(config, [tracker, *callbacks], progress=progress)
    trainer.load_state_dict(state)
    trainer.history = [(s, m) for s, m in history if s <= trainer.step]
    if max_steps is not None:
        client.set_tag(run_id, "resumed_max_steps", str(max_steps))
        client.log_dict(run_id, config.to_dict(), "config.json")
    client.update_run(run_id, status="RUNNING")
    return ExperimentResult(run_id, _train_in_run(client, run_id, trainer, tracker), client.tracking_uri)


# ---------------------------------------------------------------------------------------------- analysis
ANALYSIS_DIR = "analysis"


def _delete_artifacts(client: MlflowClient, run_id: str, path: str) -> None:
    """Remove an artifact folder of a run (MlflowClient has no delete; the run's artifact repository does)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if client.list_artifacts(run_id, path):
        artifact_uri = f"{client.get_run(run_id).info.artifact_uri}/{path}"
        get_artifact_repository(artifact_uri, tracking_uri=client.tracking_uri).delete_artifacts()


def analyze_run(run_id: str, tracking_uri: str | None = None, output: str | Path | None = None,
                progress: bool = True) -> dict:
    """Fetch a run's config, metric history and checkpoints from the tracking server, analyse every checkpoint,
    and log figures + ``analysis/summary.json`` into the same run, replacing an earlier analysis.

    Everything is computed before anything is logged, so a bad checkpoint leaves the run untouched."""
    import shutil

    from .analysis import analyze_checkpoints

    client = connect(tracking_uri)
    get_run(client, run_id)
    with tempfile.TemporaryDirectory(prefix="grokking-analyze-") as scratch:
        scratch = Path(scratch)
        config = fetch_config(client, run_id, scratch)  # fails early and clearly on a run that is not ours
        checkpoints = list_checkpoints(client, run_id)
        if not checkpoints:
            raise TrackingError(f"run {run_id} has no checkpoints to analyse")
        local = [(step, download_artifact(client, run_id, path, scratch / "download")) for step, path in checkpoints]
        out_dir = scratch / ANALYSIS_DIR
        summary = analyze_checkpoints(local, out_dir, history=fetch_history(client, run_id), progress=progress,
                                      expected_config=config)
        _delete_artifacts(client, run_id, ANALYSIS_DIR)
        client.log_artifacts(run_id, str(out_dir), ANALYSIS_DIR)
        fourier = summary["fourier"]
        client.set_tag(run_id, "analysis.key_frequencies", json.dumps(fourier["key_frequencies"]))
        client.set_tag(run_id, "analysis.restricted_loss_falls_before_test_loss",
                       str(summary["restricted_loss_falls_before_test_loss"]["answer"]).lower())
        if output is not None:
            shutil.copytree(out_dir, Path(output), dirs_exist_ok=True)
    return summary


def compare_runs(run_ids: list[str], output: str | Path, tracking_uri: str | None = None,
                 log_to: str | None = None) -> Path:
    """Learning curves (and progress measures, where a run has been analysed) of several runs on shared axes."""
    from .analysis import compare_figure

    client = connect(tracking_uri)
    histories, progress = {}, {}
    with tempfile.TemporaryDirectory(prefix="grokking-compare-") as scratch:
        for run_id in run_ids:
            run = get_run(client, run_id)
            name = f"{run.info.run_name or run_id[:8]} ({run_id[:8]})"
            histories[name] = fetch_history(client, run_id)
            if client.list_artifacts(run_id, f"{ANALYSIS_DIR}/summary.json"):
                path = download_artifact(client, run_id, f"{ANALYSIS_DIR}/summary.json", Path(scratch) / run_id)
                progress[name] = json.loads(path.read_text())
    figure = compare_figure(histories, Path(output), progress=progress or None,
                            title=f"{len(run_ids)} runs compared")
    if log_to:
        get_run(client, log_to)
        client.log_artifact(log_to, str(figure), "comparisons")
    return figure
