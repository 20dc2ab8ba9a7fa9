"""``MlflowTracker``: the training callback that streams one training into its ``TrackedRun``.

The loop never waits on the tracking server: evaluations are buffered and sent as one batch about once a second
(and at every event, checkpoint and the end); a checkpoint is written straight into the run's staging area and
sent in order after the metrics of its steps, so a checkpoint never exists on the server before those metrics
(``--resume`` relies on that). After a resume, evaluations whose step the run already holds are not sent again,
so every step appears exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from mlflow.entities import Metric

from ..train import Callback, TrainingState, TrainResult
from .models import model_reasons
from .names import event_metric, mlflow_metrics
from .provenance import DESCRIPTION_TAG, run_description, runtime_tags
from .runs import EVENTS_ARTIFACT, TrackedRun, metrics_at

if TYPE_CHECKING:
    from .drawer import FigureDrawer

CHECKPOINT_DIR = "checkpoints"
KEY_FREQUENCIES_TAG = "grokking_tracked.key_frequencies"  # the live progress measures' current key frequencies
KEY_FREQUENCIES_STEP_TAG = "grokking_tracked.key_frequencies_step"
GROKKED_TAG = "grokked"
FIGURES_DIR = "figures"


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"


class MlflowTracker(Callback):
    """``drawer``: draw the run's figures in that ``FigureDrawer``'s process (the run then waits for them before
    its final status); default: here, at the end of training."""

    def __init__(self, run: TrackedRun, logged_steps: Iterable[int] = (), log_figures: bool = True,
                 flush_seconds: float = 1.0, drawer: FigureDrawer | None = None):
        self.run = run
        self.logged_steps = set(logged_steps)
        self.log_figures = log_figures
        self.drawer = drawer
        self.flush_seconds = flush_seconds
        self._key_frequencies: list[int] | None = None
        self._buffer: list[Metric] = []
        self._last_send = time.monotonic()
        self._last_eval: tuple[int, list[Metric]] = (-1, [])  # a LoggedModel carries its step's metrics

    def on_train_start(self, state: TrainingState) -> None:
        self.run.set_tags(runtime_tags(state.device, state.threads))

    def on_eval(self, state: TrainingState, step: int, metrics: dict, events: list[dict]) -> None:
        if step in self.logged_steps:
            return
        evaluation = metrics_at(mlflow_metrics(metrics), step)
        self._last_eval = (step, evaluation)
        self._buffer += evaluation
        measures = getattr(state, "progress_measures", None)
        if "n_key_frequencies" in metrics and measures is not None and measures.key_frequencies != self._key_frequencies:
            self._key_frequencies = list(measures.key_frequencies)  # a tag, as they settle: a list is no metric
            self.run.set_tags({KEY_FREQUENCIES_TAG: json.dumps(self._key_frequencies),
                               KEY_FREQUENCIES_STEP_TAG: str(step)})
        self._buffer += metrics_at({event_metric(event["event"]): event["step"] for event in events}, step)
        if events or time.monotonic() - self._last_send >= self.flush_seconds:
            self._send()
        if events:  # rare (a few a run), so a person watching the UI sees them arrive
            self.run.log_dict([dict(event) for event in state.detector.events], EVENTS_ARTIFACT)
            if any(event["event"] == "generalization" for event in events):
                self.run.set_tags({GROKKED_TAG: "true"})

    def _send(self) -> None:
        if self._buffer:
            batch, self._buffer = self._buffer, []
            self.run.log_metrics(batch)
        self._last_send = time.monotonic()

    def on_checkpoint(self, state: TrainingState, step: int, reasons: list[str]) -> None:
        self._send()
        path = self.run.staging_path(checkpoint_name(step))
        checkpoint = state.state_dict()
        torch.save(checkpoint, path)
        self.run.log_file(path, CHECKPOINT_DIR, move=True)
        reasons = model_reasons(reasons)
        if reasons:  # events and the end: also an MLflow LoggedModel (weights only, safetensors)
            metrics = self._last_eval[1] if self._last_eval[0] == step else []
            self.run.log_model(checkpoint["model"], state.config, step, reasons, metrics)

    def on_train_end(self, state: TrainingState, result: TrainResult) -> None:
        self._send()
        self.run.log_dict(result.events, EVENTS_ARTIFACT)
        self.run.set_tags({GROKKED_TAG: "true" if result.grokked else "false",
                           DESCRIPTION_TAG: run_description(result)})
        if not self.log_figures:
            return
        from .. import figures  # matplotlib (~0.7 s): not before the first step

        config = state.config
        title = (f"{config.operation} mod {config.p}, train fraction {config.train_frac}, "
                 f"lr {config.lr:g}, wd {config.weight_decay:g}")
        grid = figures.attention_grid(state.model, config.p)
        directory = self.run.staging_path("figures")
        if self.drawer is not None:
            self.run.log_files_later(self.drawer.submit(directory, result.history, result.events, title, grid),
                                     FIGURES_DIR)
        else:
            for path in figures.save_run_figures(directory, result.history, result.events, title, grid):
                self.run.log_file(path, FIGURES_DIR, move=True)

    def on_train_stopped(self, state: TrainingState, error: BaseException) -> None:
        self._send()  # what was measured before the stop stays in the run
