"""What ``analyze`` measures at every checkpoint, and what training also measures live: one registry of measures,
shaped like ``study/objectives.py``. Adding one is one ``register(Measure(...))`` (here, or in a user's module
imported before training or ``analyze``):

- ``analyze`` computes it at every checkpoint (``analysis/report.py``), stores its values in ``summary.json``'s
  ``checkpoints`` records and draws its figure (``<name>.png`` in the run's ``analysis/<n>/``);
- reanalysis logs each of its ``metrics`` as ``analysis/<metric>`` at the checkpoint's step
  (``tracking/reanalysis.py``);
- with ``live=True`` training computes it too, at every progress reading (``progress_every``), and the run logs it
  as ``progress/<metric>`` beside Nanda et al.'s measures (``measures.py``).

A measure reads a ``MeasureInput``: the model, the (a, b) grid's last-position logits, the activations of the hooks
it declares (``hooks``: names from TransformerLens's ``get_act_name``, never typed by hand), the task's Fourier
grid and the key frequencies. The core (imports neither mlflow nor optuna): ``analysis`` and ``measures`` read it.

Nanda et al.'s progress measures (``measures.ProgressMeasures``) are the base reading every checkpoint and every
live reading has (the detector's phases and the key frequencies come from it); the registry holds what is built
on top of it: Zhong et al.'s clock-or-pizza measures (registered by ``analysis/algorithm.py``, which ``analyze``
imports), the stability measures, yours.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class MeasureInput:
    """One checkpoint (or live reading) as a measure sees it. Rows of ``logits`` and of the cached activations are
    the p² pairs [a, b, =] in row-major (a, b) order (``mechanics.grid_tokens``); ``grid.flat_index`` reorders rows
    into the Fourier grid's group order."""

    model: Any  # GrokkingTransformer, eval mode
    config: Any  # the run's Config (None in a live reading)
    logits: Any  # (p², p) last-position logits, row-major (a, b)
    cache: Mapping[str, Any]  # hook name -> activation: at least every hook the measure declares
    grid: Any  # fourier.TaskGrid of the task
    keys: list[int] = field(default_factory=list)  # the key frequencies (analyze: the last checkpoint's)
    step: int | None = None
    train_rows: Any = None  # indices of the training pairs among the rows (a * p + b)

    @property
    def train_logits(self):
        """(n_train, p) logits of the training pairs (e.g. a softmax-collapse fraction over the training set)."""
        return self.logits[self.train_rows]

    @property
    def grid_logits(self):
        """(n², c) logits in the Fourier grid's group order."""
        return self.logits[self.grid.flat_index]


@dataclass(frozen=True)
class Measure:
    """``compute(MeasureInput) -> {name: float | None}`` holds every value of ``metrics`` (extra keys are kept in
    ``summary.json``'s records but not logged). ``hooks``: activation names it reads from ``MeasureInput.cache``.
    ``figure(records, measure) -> Figure``: its figure over the checkpoints' records (dicts with ``step`` and
    its values); None draws ``analysis.plots.measure_figure``, one panel per metric."""

    name: str
    metrics: tuple[str, ...]
    compute: Callable[[MeasureInput], Mapping[str, float | None]]
    hooks: tuple[str, ...] = ()
    figure: Callable[[Sequence[dict], "Measure"], Any] | None = None
    live: bool = False
    description: str = ""

    @property
    def figure_file(self) -> str:
        return f"{self.name}.png"


MEASURES: dict[str, Measure] = {}


def register(measure: Measure) -> Measure:
    if measure.name in MEASURES:
        raise ValueError(f"measure {measure.name!r} is registered already")
    MEASURES[measure.name] = measure
    return measure


def measures(live: bool | None = None) -> tuple[Measure, ...]:
    """Every registered measure (``live=True``: only those training also computes)."""
    return tuple(m for m in MEASURES.values() if live is None or m.live == live)


def logged_metrics() -> tuple[str, ...]:
    """The metric names reanalysis logs per checkpoint (as ``analysis/<name>``), in registry order."""
    return tuple(name for m in MEASURES.values() for name in m.metrics)


def hooks_of(selected: Sequence[Measure]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(hook for m in selected for hook in m.hooks))


def compute_all(selected: Sequence[Measure], given: MeasureInput) -> dict[str, float | None]:
    """Every selected measure's values on one input, merged (a name two measures share is refused)."""
    values: dict[str, float | None] = {}
    for measure in selected:
        out = dict(measure.compute(given))
        missing = set(measure.metrics) - set(out)
        if missing:
            raise ValueError(f"measure {measure.name!r} did not return {sorted(missing)}")
        clash = set(out) & set(values)
        if clash:
            raise ValueError(f"measure {measure.name!r} returns {sorted(clash)}, already given by another measure")
        values.update(out)
    return values
