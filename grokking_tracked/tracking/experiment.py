"""A training run as an MLflow run: ``run_experiment`` (new) and ``resume_experiment`` (continue one)."""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from ..config import Config
from ..train import Callback, Trainer, TrainResult, check_runnable, default_threads
from .fetch import RunArtifacts, complete_steps, fetch_history
from .provenance import command_line, versions
from .runs import CONFIG_ARTIFACT, TrackedRun, check_reopenable
from .store import DEFAULT_EXPERIMENT, LOCAL_UI, TrackingError, connect, ui_base, ui_link
from .tracker import MlflowTracker

IMPORTED_TAG = "grokking_tracked.imported_from"  # tracking/importing.py sets it


RESUMED_MAX_STEPS_TAG = "resumed_max_steps"
RESUME_TAG = "grokking_tracked.resume.{number}"


def resume_tags(existing: dict[str, str], step: int, max_steps: int | None) -> dict[str, str]:
    """What this resume did, under a tag of its own: the run's origin (source, command, versions) is kept."""
    number = 1 + sum(1 for key in existing if key.startswith("grokking_tracked.resume."))
    record = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "from_step": step,
              "host": socket.gethostname(), "command": command_line(), "versions": versions()}
    tags = {RESUME_TAG.format(number=number): json.dumps(record, sort_keys=True)[:5000]}
    if max_steps is not None:
        tags[RESUMED_MAX_STEPS_TAG] = str(max_steps)
    return tags


@contextlib.contextmanager
def system_metrics(run_id: str, tracking_uri: str, enabled: bool = True, resume: bool = False):
    """MLflow's own system-metrics sampler (``system/cpu_utilization_percentage``, memory, disk, network, GPU)
    on ``run_id`` while the block runs: a thread that samples every
    ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (MLflow's default: 10) and logs straight to the store
    (not through the run's outbox). ``resume``: continue the run's earlier system-metric steps."""
    if not enabled:
        yield None
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield monitor
    finally:
        monitor.finish()  # stops the thread and flushes what it sampled, before the run ends


@dataclass
class ExperimentResult:
    run_id: str
    result: TrainResult
    tracking_uri: str
    experiment_id: str | None = None

    def runs_url(self, ui: str = LOCAL_UI) -> str:
        """The link that opens this run's experiment in MLflow's model-training runs view: on the tracking
        server itself, or on ``grokking-tracked ui`` (``ui``) for a local store."""
        return ui_link(ui_base(self.tracking_uri, ui), self.experiment_id)

    def models_url(self, ui: str = LOCAL_UI) -> str:
        """The experiment's Models tab (its LoggedModels: the event and final checkpoints) in the model-training
        view; without ``workflowType`` MLflow 3.17 lists them as GenAI "Agent versions"."""
        return ui_link(ui_base(self.tracking_uri, ui), self.experiment_id, page="models")

    def run_url(self, ui: str = LOCAL_UI) -> str:
        """This run's page in the model-training view."""
        return ui_link(ui_base(self.tracking_uri, ui), self.experiment_id, run_id=self.run_id)

    @property
    def history(self) -> list[tuple[int, dict]]:
        return self.result.history

    def history_frame(self):
        """The metric history as a pandas DataFrame indexed by step."""
        import pandas as pd

        return pd.DataFrame([{"step": s, **m} for s, m in self.history]).set_index("step")

    def plot(self, title: str | None = None):
        """The learning curves (loss on a log axis, accuracy) with the detected events, as a matplotlib ``Figure``.

        Built without pyplot: the process's backend and pyplot's current figure are left alone, so in a notebook
        the figure shows inline when it is a cell's value (and ``fig.savefig(...)`` writes it)."""
        from ..figures import learning_curves

        return learning_curves(self.history, self.result.events,
                               f"run {self.run_id[:8]}: {self.summary()}" if title is None else title)

    def _repr_png_(self) -> bytes:
        """Jupyter's rich display: the learning curves as PNG bytes, shown when the result is a cell's value."""
        import io

        from ..figures import style

        buffer = io.BytesIO()
        with style():
            self.plot().savefig(buffer, format="png")
        return buffer.getvalue()

    def summary(self) -> str:
        mem, gen = self.result.step_of("memorization"), self.result.step_of("generalization")
        return (f"memorized at step {mem if mem is not None else '-'}, "
                f"generalized at step {gen if gen is not None else '- (not within the budget)'}, "
                f"{self.result.final_step} steps in {self.result.train_seconds:.1f} s")


def run_experiment(config: Config, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                   run_name: str | None = None, parent_run_id: str | None = None, tags: dict | None = None,
                   callbacks: Iterable[Callback] = (), progress: bool = True,
                   on_run_started: Callable[[str], None] | None = None, client=None,
                   threads: int | None = None, log_system_metrics: bool = False) -> ExperimentResult:
    """Train ``config`` as one MLflow run; returns its run id and the metric history.

    ``client``: an open MlflowClient to reuse (a study worker keeps one); else one for ``tracking_uri``.
    ``log_system_metrics``: MLflow's system-metrics sampler on the run while it trains (``system_metrics``)."""
    check_runnable(config)  # refused before a run exists
    client = client or connect(tracking_uri)
    with TrackedRun.create_for_config(client, config, experiment, run_name=run_name, tags=tags,
                                      parent_run_id=parent_run_id) as run:
        if on_run_started is not None:
            on_run_started(run.run_id)
        trainer = Trainer(config, [MlflowTracker(run), *callbacks], progress=progress, threads=threads)
        with system_metrics(run.run_id, client.tracking_uri, enabled=log_system_metrics):
            result = trainer.train()
    return ExperimentResult(run.run_id, result, client.tracking_uri, run.experiment_id)


def resume_experiment(run_id: str, tracking_uri: str | None = None, progress: bool = True,
                      callbacks: Iterable[Callback] = (), max_steps: int | None = None,
                      force: bool = False, log_system_metrics: bool = False,
                      lone: bool = False) -> ExperimentResult:
    """Continue a run from its newest loadable checkpoint, in the same MLflow run (after a crash, or to train
    longer with a larger ``max_steps``: MLflow params are immutable, so the new budget goes to config.json and
    a tag). A run another live process is writing is refused unless ``force``. ``lone`` (the CLI): train on every
    core if the model gains from it (``train.default_threads``)."""
    client = connect(tracking_uri)
    run = check_reopenable(client, run_id, force=force)  # a killed writer's spool is delivered before we read
    if IMPORTED_TAG in run.data.tags:
        raise TrackingError(f"run {run_id} was imported from {run.data.tags[IMPORTED_TAG]}: its checkpoints carry no "
                            "optimizer state to resume from")
    artifacts = RunArtifacts(client, run_id)
    with tempfile.TemporaryDirectory(prefix="grokking-resume-") as scratch:
        config = artifacts.config(scratch)
        if max_steps is not None:
            config = config.replace(max_steps=max_steps)
        device = check_runnable(config)
        state = artifacts.newest_loadable_checkpoint(scratch)
    history = fetch_history(client, run_id)
    with TrackedRun.reopen(client, run_id, force=force) as run:
        trainer = Trainer(config, [MlflowTracker(run, logged_steps=complete_steps(history)), *callbacks], progress=progress,
                          threads=default_threads(device, config, lone=True) if lone else None)
        trainer.load_state_dict(state)
        trainer.history = [(s, m) for s, m in history if s <= trainer.step]
        run.set_tags(resume_tags(run.client.get_run(run_id).data.tags, trainer.step, max_steps))
        if max_steps is not None:
            run.log_dict(config.to_dict(), CONFIG_ARTIFACT)
        with system_metrics(run_id, client.tracking_uri, enabled=log_system_metrics, resume=True):
            result = trainer.train()
    return ExperimentResult(run_id, result, client.tracking_uri, run.experiment_id)
