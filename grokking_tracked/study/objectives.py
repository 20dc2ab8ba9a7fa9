"""What a study minimises: one registry of objectives. Adding one is one ``register(StudyObjective(...))`` here (or
in a user's own module imported before the spec loads): the spec validates against it, the trial scores with it,
the dashboard and the parent run name its values from it.

Every objective scores one ``Outcome`` (a finished training of one seed); a trial trained with several seeds
(``[study] seeds``) scores the median of its seeds' values, component by component.

  ``steps``   -- the generalization_step; not generalized within the budget: ``penalty_factor x max_steps``
                 (default 2 x budget: worse than any generalizing trial).
  ``seconds`` -- wall seconds of the training loop until generalization; not generalized: ``penalty_factor`` x
                 the seconds the whole budget took.
  ``delay``   -- generalization_step - memorization_step: how long the model sits memorised before it generalises
                 (at a fixed dataset, the quantity grokking is about). A trial that never memorises or never
                 generalises within the budget: ``penalty_factor x max_steps`` (a delay is at most max_steps, so
                 the penalty is worse than any real delay).
  ``steps_vs_train_frac`` -- two objectives (steps as above, train_frac): a Pareto front. Needs train_frac in
                 [search]; no pruning (Optuna does not prune multi-objective trials).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the spec loads before torch does (the CLI checks a spec first)
    from ..config import Config
    from ..train import TrainResult


@dataclass(frozen=True)
class Outcome:
    """What an objective may score: one finished training and its setting."""

    result: "TrainResult"
    config: "Config"
    penalty_factor: float
    seconds_to_generalize: float | None = None

    @property
    def penalty(self) -> float:
        return self.penalty_factor * self.config.max_steps


@dataclass(frozen=True)
class StudyObjective:
    name: str
    metric_names: tuple[str, ...]  # the dashboard's and the parent run's names of the values, in order
    score: Callable[[Outcome], float | tuple[float, ...]]  # a tuple when there are several values
    description: str
    needs_search: tuple[str, ...] = ()  # config fields that must be in [search]
    can_prune: bool = True  # False: the spec must say [pruner] name = "none"

    @property
    def directions(self) -> list[str]:
        return ["minimize"] * len(self.metric_names)


REGISTRY: dict[str, StudyObjective] = {}


def register(objective: StudyObjective) -> StudyObjective:
    if objective.name in REGISTRY:
        raise ValueError(f"objective {objective.name!r} is registered already")
    if len(objective.metric_names) > 1 and objective.can_prune:
        raise ValueError(f"objective {objective.name!r}: Optuna does not prune multi-objective trials")
    REGISTRY[objective.name] = objective
    return objective


def get(name: str) -> StudyObjective:
    return REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def median_value(values: list[float | tuple[float, ...]]) -> float | tuple[float, ...]:
    """The median over seeds (per component for several objectives)."""
    if isinstance(values[0], tuple):
        return tuple(statistics.median(column) for column in zip(*values))
    return statistics.median(values)


def _steps(outcome: Outcome) -> float:
    gen = outcome.result.step_of("generalization")
    return float(gen) if gen is not None else outcome.penalty


def _seconds(outcome: Outcome) -> float:
    if outcome.result.step_of("generalization") is None or outcome.seconds_to_generalize is None:
        return outcome.penalty_factor * outcome.result.train_seconds
    return outcome.seconds_to_generalize


def _delay(outcome: Outcome) -> float:
    gen, mem = outcome.result.step_of("generalization"), outcome.result.step_of("memorization")
    if gen is None or mem is None:
        return outcome.penalty
    return float(max(0, gen - mem))  # both fire at the same evaluation when the model generalises as it fits


register(StudyObjective("steps", ("steps_to_generalize",), _steps,
                        "generalization step; not generalized: penalty_factor x max_steps"))
register(StudyObjective("seconds", ("seconds_to_generalize",), _seconds,
                        "training seconds until generalization; not generalized: penalty_factor x seconds trained"))
register(StudyObjective("delay", ("grokking_delay_steps",), _delay,
                        "generalization step - memorization step; never memorized or never generalized: "
                        "penalty_factor x max_steps"))
register(StudyObjective("steps_vs_train_frac", ("steps_to_generalize", "train_frac"),
                        lambda outcome: (_steps(outcome), outcome.config.train_frac),
                        "steps (as above) and train_frac: a Pareto front", needs_search=("train_frac",),
                        can_prune=False))
