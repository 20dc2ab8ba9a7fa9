"""A training run as an MLflow run: ``run_experiment`` (new) and ``resume_experiment`` (continue one)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..config import Config
from ..train import Callback, Trainer, TrainResult, check_runnable
from .fetch import complete_steps, fetch_config, fetch_history, newest_loadable_checkpoint
from .runs import CONFIG_ARTIFACT, TrackedRun
from .store import DEFAULT_EXPERIMENT, connect, get_run

RESUMED_MAX_STEPS_TAG = "resumed_max_steps"


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


def run_experiment(config: Config, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                   run_name: str | None = None, parent_run_id: str | None = None, tags: dict | None = None,
                   callbacks: Iterable[Callback] = (), progress: bool = True,
                   on_run_started: Callable[[str], None] | None = None, client=None,
                   threads: int | None = None) -> ExperimentResult:
    """Train ``config`` as one MLflow run; returns its run id and the metric history.

    ``client``: an open MlflowClient to reuse (a study worker keeps one); else one for ``tracking_uri``."""
    check_runnable(config)  # refused before a run exists
    client = client or connect(tracking_uri)
    with TrackedRun.create_for_config(client, config, experiment, run_name=run_name, tags=tags,
                                      parent_run_id=parent_run_id) as run:
        if on_run_started is not None:
            on_run_started(run.run_id)
        trainer = Trainer(config, [run.tracker(), *callbacks], progress=progress, threads=threads)
        result = trainer.train()
    return ExperimentResult(run.run_id, result, client.tracking_uri)


def resume_experiment(run_id: str, tracking_uri: str | None = None, progress: bool = True,
                      callbacks: Iterable[Callback] = (), max_steps: int | None = None) -> ExperimentResult:
    """Continue a run from its newest loadable checkpoint, in the same MLflow run (after a crash, or to train
    longer with a larger ``max_steps``: MLflow params are immutable, so the new budget goes to config.json and
    a tag)."""
    client = connect(tracking_uri)
    get_run(client, run_id)
    with tempfile.TemporaryDirectory(prefix="grokking-resume-") as scratch:
        config = fetch_config(client, run_id, scratch)
        if max_steps is not None:
            config = config.replace(max_steps=max_steps)
        check_runnable(config)
        state = newest_loadable_checkpoint(client, run_id, scratch)
    history = fetch_history(client, run_id)
    with TrackedRun.reopen(client, run_id) as run:
        trainer = Trainer(config, [run.tracker(logged_steps=complete_steps(history)), *callbacks], progress=progress)
        trainer.load_state_dict(state)
        trainer.history = [(s, m) for s, m in history if s <= trainer.step]
        if max_steps is not None:
            run.set_tags({RESUMED_MAX_STEPS_TAG: str(max_steps)})
            run.log_dict(config.to_dict(), CONFIG_ARTIFACT)
        result = trainer.train()
    return ExperimentResult(run_id, result, client.tracking_uri)
