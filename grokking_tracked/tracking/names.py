"""Metric names in MLflow, in one place: the core and the histories keep their own names (``train_loss``...); the
tracker maps them on the way out, ``fetch_history`` maps them back (both these names and the flat ones runs were
logged under before issue 21, so older runs stay readable).

MLflow's run page groups metrics into sections by the prefix before ``/`` and shows the rest as the chart title.
MLflow 3.17's UI sorts those sections alphabetically, then puts "Model metrics" (no prefix) and "System metrics"
last (``RunsChartsCardConfig``: ``.sort()`` of the section names). So the learning curves are ``accuracy/…`` and
``loss/…`` (train and test of one quantity in one section, TensorBoard-style), then ``optim/``, ``progress/`` and
the event steps, ``steps_to/<event>``: one value per run, a sortable column of the runs table.
"""

from __future__ import annotations

from collections.abc import Mapping

TO_MLFLOW = {
    "train_acc": "accuracy/train", "test_acc": "accuracy/test",
    "train_loss": "loss/train", "test_loss": "loss/test",
    "lr": "optim/lr", "grad_norm": "optim/grad_norm", "weight_norm": "optim/weight_norm",
}
FROM_MLFLOW = {name: key for key, name in TO_MLFLOW.items()}
PROGRESS_PREFIX = "progress/"  # the live progress measures (measures.py), whatever their names
EVENT_PREFIX = "steps_to/"
SYSTEM_PREFIX = "system/"  # MLflow's own system metrics: left as they are
_OLD_EVENT_SUFFIX = "_step"  # before issue 21: `generalization_step`


def event_metric(event: str) -> str:
    """The MLflow metric holding the step at which ``event`` fired."""
    return f"{EVENT_PREFIX}{event}"


def to_mlflow(key: str) -> str:
    return TO_MLFLOW.get(key) or f"{PROGRESS_PREFIX}{key}"


def mlflow_metrics(values: Mapping[str, float]) -> dict[str, float]:
    """One evaluation's metrics under their MLflow names."""
    return {to_mlflow(key): value for key, value in values.items()}


def is_event_metric(name: str) -> bool:
    """An event step (new or old name): not an evaluation."""
    return name.startswith(EVENT_PREFIX) or name.endswith(_OLD_EVENT_SUFFIX)


def from_mlflow(name: str) -> str:
    """The internal name of an MLflow metric; a name from before issue 21 is already one."""
    if name in FROM_MLFLOW:
        return FROM_MLFLOW[name]
    if name.startswith(PROGRESS_PREFIX):
        return name[len(PROGRESS_PREFIX):]
    if name.startswith(EVENT_PREFIX):
        return name[len(EVENT_PREFIX):] + _OLD_EVENT_SUFFIX
    return name
