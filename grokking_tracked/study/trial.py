"""A study trial as an MLflow run: its state machine, its tags, the pruning callback and the objective.

Hand-written on purpose (optuna-integration's ``MLflowCallback`` logs a trial only after it ends, as a run with no
parent -- optuna #5148 -- and FINISHED even when pruned or failed -- optuna PR #3524): here the trial *is* the
training run, created before training starts (metrics stream live), nested under the study's parent run, and
``TrialRun`` moves it RUNNING -> COMPLETE (FINISHED) | PRUNED (KILLED) | FAIL (FAILED, or KILLED on Ctrl-C).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Iterator

import optuna
from mlflow import MlflowClient

from .. import learning_phases
from ..config import Config
from ..train import Callback, Trainer, TrainingStopped, TrainResult
from ..tracking.experiment import system_metrics
from ..tracking.runs import FAILED, FINISHED, KILLED, ROLE_TAG, TrackedRun, status_for
from ..tracking.redact import redact
from ..tracking.store import get_run
from ..tracking.drawer import FigureDrawer
from ..tracking.tracker import MlflowTracker
from .dashboard import DashboardNotes, link_trial_run
from .objectives import Outcome, median_value
from .pruners import DECISIONS_ATTR, SIGNALS_ATTR, Decision, Signals, RisingTestLoss, collapse_signal
from .spec import StudySpec
from .storage import GRID_SURPLUS, grid_point_problem, is_surplus, retried_trial_number

# Tags of a trial's run (the keys optuna-integration's MLflowCallback uses where it has one).
STUDY_NAME_TAG = "optuna.study_name"
TRIAL_NUMBER_TAG = "optuna.trial_number"
TRIAL_STATE_TAG = "optuna.trial_state"
RETRIED_TRIAL_TAG = "optuna.retried_trial_number"
PRUNED_STEP_TAG = "optuna.pruned_step"
PRUNE_REASON_TAG = "optuna.prune_reason"  # why the pruner stopped the trial (the grokking pruner's rule and reason)
PRUNER_DECISIONS_TAG = "grokking_tracked.pruner_decisions"  # the grokking pruner's changes of rule, as JSON
VALUE_TAG = "optuna.value"
GENERALIZED_TAG = "optuna.generalized"
FAIL_REASON_TAG = "optuna.fail_reason"
PHASE_TAG = "grokking_tracked.phase"  # Liu et al.'s learning phase (learning_phases.py)
SEEDS_TAG = "grokking_tracked.seeds"  # a seeded trial's run: how many seed runs are nested under it
SEED_INDEX_TAG = "grokking_tracked.seed_index"
TRIAL_ROLE = "trial"
TRIAL_SEED_ROLE = "trial_seed"  # one seed of a seeded trial: a child run of the trial's run
# The trial's user attributes in Optuna (what links a trial to its run, and what the objective measured).
RUN_ID_ATTR = "mlflow_run_id"
WORKER_ATTR = "worker"
FAIL_REASON_ATTR = "fail_reason"
PHASE_ATTR = "phase"
# Optuna trial state -> MLflow run status
RUNNING, COMPLETE, PRUNED, FAIL = "RUNNING", "COMPLETE", "PRUNED", "FAIL"


class TrialPrunedStop(TrainingStopped):
    """Raised from the pruning callback: training stops, the run ends KILLED, the trial becomes PRUNED."""


@dataclass
class StudyContext:
    """What every trial of one worker shares: the spec, where its runs go, one MLflow client."""

    spec: StudySpec
    study_name: str
    experiment: str
    parent_run_id: str
    client: MlflowClient
    progress: bool = True
    threads: int | None = None
    drawer: FigureDrawer | None = None  # the worker's figure process
    notes: DashboardNotes | None = None  # writes the trials' dashboard notes (default: in this process)
    system_metrics: bool = False  # MLflow's system-metrics sampler on each trial's run
    n_trials: int | None = None  # --n-trials: a trial asked beyond it ends at once (SurplusTrial)


class TrialRun:
    """One trial's MLflow run and its Optuna state, RUNNING until ``complete``, ``prune`` or ``fail`` (once)."""

    def __init__(self, run: TrackedRun, trial_number: int):
        self.run, self.trial_number = run, trial_number
        self.state = RUNNING
        self.fail_reason: str | None = None

    @classmethod
    def open(cls, context: StudyContext, trial: optuna.Trial, config: Config) -> "TrialRun":
        tags = {STUDY_NAME_TAG: context.study_name, TRIAL_NUMBER_TAG: str(trial.number),
                TRIAL_STATE_TAG: RUNNING, ROLE_TAG: TRIAL_ROLE}
        retried = retried_trial_number(trial.study, trial)
        if retried is not None:
            tags[RETRIED_TRIAL_TAG] = str(retried)
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        run = TrackedRun.create_for_config(context.client, config, context.experiment,
                                           run_name=f"{context.study_name} #{trial.number}", tags=tags,
                                           parent_run_id=context.parent_run_id)
        trial.set_user_attr(RUN_ID_ATTR, run.run_id)
        link_trial_run(trial, context.client.tracking_uri, run.experiment_id, run.run_id, notes=context.notes)
        return cls(run, trial.number)

    def _end(self, state: str, status: str, background: bool = False, **tags: str) -> None:
        if self.state != RUNNING:
            return
        self.state = state
        try:
            self.run.end(status, background=background, tags={TRIAL_STATE_TAG: state, **tags},
                         tags_if_interrupted={TRIAL_STATE_TAG: FAIL, **tags} if state != FAIL else None)
        except BaseException as error:
            if not isinstance(error, Exception):  # Ctrl-C/SIGTERM while delivering: run KILLED, Optuna fails the trial
                self.state = FAIL
            raise

    def complete(self, value, result: TrainResult | bool, tags: dict[str, str] | None = None) -> None:
        """COMPLETE once the run's data is delivered; its figures (drawn elsewhere) and FINISHED follow in the
        background, so the worker's next trial trains meanwhile. ``result``: the training's, or (a seeded trial)
        whether any seed generalized."""
        generalized = result if isinstance(result, bool) else result.grokked
        self._end(COMPLETE, FINISHED, background=True,
                  **{VALUE_TAG: str(value), GENERALIZED_TAG: str(generalized).lower(), **(tags or {})})

    def prune(self, step: int | None, reason: str | None = None, tags: dict[str, str] | None = None) -> None:
        self._end(PRUNED, KILLED, **{PRUNED_STEP_TAG: str(step)}, **({PRUNE_REASON_TAG: reason[:500]} if reason else {}),
                  **(tags or {}))

    def fail(self, error: BaseException | str) -> None:
        if self.state != RUNNING:
            return
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.fail_reason = reason[:500]
        status = FAILED if isinstance(error, str) else status_for(error)
        self._end(FAIL, FAILED if status == FINISHED else status, **{FAIL_REASON_TAG: reason[:500]})

    def stopped(self, error: BaseException, pruned_at: int | None) -> None:
        """Training ended by an exception: PRUNED if the pruner stopped it, FAIL otherwise."""
        if isinstance(error, TrialPrunedStop):
            self.prune(pruned_at, str(error))
        else:
            self.fail(error)

    def __enter__(self) -> "TrialRun":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is not None:
            self.stopped(error, None)
        else:
            self.fail("the trial ended without a value")  # no-op once completed
        return False


def close_stale_trial_run(client: MlflowClient, trial: optuna.trial.FrozenTrial, reason: str,
                          status: str = FAILED) -> bool:
    """End the MLflow run of a trial whose worker died (still RUNNING) FAILED (``status``: KILLED for a worker
    stopped by an interrupt); True if it did."""
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if not run_id:
        return False
    try:
        run = get_run(client, run_id)
    except Exception:  # noqa: BLE001 - unknown or unreachable: nothing to close
        return False
    if run.info.status != RUNNING or run.data.tags.get(TRIAL_NUMBER_TAG) != str(trial.number):
        return False
    TrialRun(TrackedRun(client, run_id, leased=False), trial.number)._end(FAIL, status, **{FAIL_REASON_TAG: reason[:500]})
    return True


class PruningCallback(Callback):
    """Reports the pruning metric to Optuna and stops training when the pruner says so; also times
    generalization for the ``seconds`` objective."""

    def __init__(self, trial: optuna.Trial, spec: StudySpec, report: bool = True):
        self.trial, self.spec = trial, spec
        self.report = report  # False: only time generalization (a seeded trial's later seeds)
        self.started = 0.0
        self.seconds_to_generalize: float | None = None
        self.pruned_at: int | None = None
        self._previous_weight_norm: float | None = None  # the grokking pruner's signals (pruners.Signals)
        self._collapse: float | None = None
        self._rise = RisingTestLoss()
        self._rising_since: int | None = None
        self._decisions: list[dict] = []

    def on_train_start(self, run) -> None:
        self.started = time.perf_counter()

    def on_eval(self, run, step: int, metrics: dict, events: list[dict]) -> None:
        if any(e["event"] == "generalization" for e in events) and self.seconds_to_generalize is None:
            self.seconds_to_generalize = time.perf_counter() - self.started
        self._collapse = metrics.get("softmax_collapse", self._collapse)  # the latest progress reading, any step
        self._rising_since = self._rise.update(step, metrics.get("test_loss"), run.detector.step_of("memorization"))
        if not self.report or self.spec.pruner == "none" or step == 0 or step % self.spec.report_every:
            return
        if run.detector.step_of("generalization") is not None:
            return  # already generalized: never prune a success during its stop margin
        value = metrics["test_loss"] if self.spec.prune_metric == "test_loss" else 1.0 - metrics["test_acc"]
        if not math.isfinite(value):
            value = float("inf")
        self.trial.report(value, step)
        if self.spec.pruner == "grokking":
            self._report_signals(run, step, metrics)
        if self.trial.should_prune():
            self.pruned_at = step
            decision = self._decision(step)
            why = f": {decision.rule}: {decision.reason}" if decision else ""
            raise TrialPrunedStop(f"pruned at step {step} ({self.spec.prune_metric} {value:.4g}){why}")
        self._decision(step)

    def _report_signals(self, run, step: int, metrics: dict) -> None:
        """The grokking pruner's inputs (pruners.Signals) as the trial's user attr, read by its ``prune``."""
        signals = Signals.at(step, run.config.max_steps, metrics, run.detector.events, self._previous_weight_norm,
                             collapse_signal(run.config.loss, self._collapse), self._rising_since)
        self._previous_weight_norm = metrics["weight_norm"]
        self.trial.set_user_attr(SIGNALS_ATTR, dataclasses.asdict(signals))

    def decision_tags(self) -> dict[str, str]:
        """The grokking pruner's decisions on this trial (each change of rule) as a run tag; {} for other pruners."""
        return {PRUNER_DECISIONS_TAG: json.dumps(self._decisions)[:5000]} if self._decisions else {}

    def _decision(self, step: int) -> "Decision | None":
        """The grokking pruner's decision on this trial at ``step``, recorded in its user attrs when its rule
        changed (every decision of another pruner: None)."""
        decisions = getattr(self.trial.study.pruner, "decisions", None)
        decision = decisions.pop(self.trial.number, None) if isinstance(decisions, dict) else None
        if decision is not None and (not self._decisions or self._decisions[-1]["rule"] != decision.rule):
            self._decisions.append(decision.record(step))
            self.trial.set_user_attr(DECISIONS_ATTR, self._decisions)
        return decision


def trial_config(spec: StudySpec, trial: optuna.Trial) -> Config:
    """The trial's config: the spec's task with the sampled parameters."""
    return spec.base_config().replace(**{p.name: p.suggest(trial) for p in spec.params})


def comprehension_delay(spec: StudySpec, config: Config) -> int:
    if spec.comprehension_delay is not None:
        return spec.comprehension_delay
    return learning_phases.default_comprehension_delay(config.max_steps)


def phase_of(spec: StudySpec, config: Config, result: TrainResult) -> str:
    return learning_phases.classify(result.events, comprehension_delay(spec, config))


def trial_value(trial: optuna.Trial, spec: StudySpec, config: Config, result: TrainResult,
                seconds_to_generalize: float | None):
    """The objective value of a finished training (the registered objective's score: see objectives.py); records
    what it measured as user attrs, its learning phase included."""
    gen = result.step_of("generalization")
    events = [{"event": e["event"], "step": e["step"]} for e in result.events]
    for key, value in (("generalized", gen is not None), ("generalization_step", gen), ("events", events),
                       ("memorization_step", result.step_of("memorization")), ("final_step", result.final_step),
                       ("train_seconds", round(result.train_seconds, 3)),
                       ("grokking_delay", learning_phases.grokking_delay(result.events)),
                       (PHASE_ATTR, phase_of(spec, config, result))):
        trial.set_user_attr(key, value)
    return spec.target.score(Outcome(result, config, spec.penalty_factor, seconds_to_generalize))


def seed_configs(config: Config, seeds: int) -> Iterator[Config]:
    """The configs of a seeded trial: model and data seeds offset together, seed k = (seed + k, data_seed + k);
    made one at a time, as each seed starts (a trial trains them one after another)."""
    return (config.replace(seed=config.seed + k, data_seed=config.data_seed + k) for k in range(seeds))


class SurplusTrial(RuntimeError):
    """A trial asked while the finished and earlier running trials already make --n-trials (workers asked at the
    same moment): it trains nothing, opens no run, and ends FAIL with this reason; its worker stops."""


def skip_grid_duplicate(spec: StudySpec, trial: optuna.Trial) -> None:
    """A grid study's trial that holds no queued point, or one another live trial holds: it trains nothing, opens no
    run, and ends FAIL with the reason (``SurplusTrial``); with no point left, its worker stops."""
    if spec.sampler != "grid":
        return
    problem = grid_point_problem(spec, trial.study, trial)
    if problem is not None:
        trial.set_user_attr(FAIL_REASON_ATTR, problem)
        if problem == GRID_SURPLUS:
            trial.study.stop()
        raise SurplusTrial(problem)


class SeedFailed(RuntimeError):
    """One seed of a seeded trial failed: the trial fails (a median over fewer seeds is another estimate)."""


class Objective:
    """One trial trained one by one (``study.optimize``)."""

    def __init__(self, context: StudyContext):
        self.context = context

    def __call__(self, trial: optuna.Trial):
        try:
            return self.run(trial)
        except Exception as error:  # the reason, where every trial's is looked for (a run may not exist yet)
            if not isinstance(error, optuna.TrialPruned) and FAIL_REASON_ATTR not in trial.user_attrs:
                trial.set_user_attr(FAIL_REASON_ATTR, redact(f"{type(error).__name__}: {error}")[:500])
            raise

    def run(self, trial: optuna.Trial):
        context = self.context
        if context.n_trials is not None and is_surplus(trial.study, trial.number, context.n_trials):
            trial.set_user_attr(FAIL_REASON_ATTR, f"surplus: {context.n_trials} trials finished or running")
            trial.study.stop()
            raise SurplusTrial(f"surplus trial: {context.n_trials} trials already finished or running")
        skip_grid_duplicate(context.spec, trial)
        config = trial_config(context.spec, trial)
        if context.spec.seeds > 1:
            return self.seeded(trial, config)
        pruning = PruningCallback(trial, context.spec)
        with TrialRun.open(context, trial, config) as trial_run:
            trainer = Trainer(config, [MlflowTracker(trial_run.run, drawer=context.drawer), pruning], progress=context.progress,
                              threads=context.threads)
            try:
                with system_metrics(trial_run.run.run_id, context.client.tracking_uri, enabled=context.system_metrics):
                    result = trainer.train()
            except TrialPrunedStop as stop:
                trial_run.prune(pruning.pruned_at, str(stop), pruning.decision_tags())
                raise optuna.TrialPruned(str(stop)) from None
            except SystemExit as exc:  # SIGTERM: Optuna marks FAIL on KeyboardInterrupt, leaves RUNNING on SystemExit
                trial_run.fail(exc)
                raise KeyboardInterrupt() from exc
            value = trial_value(trial, context.spec, config, result, pruning.seconds_to_generalize)
            trial_run.complete(value, result, {PHASE_TAG: phase_of(context.spec, config, result),
                                               **pruning.decision_tags()})
        return value

    def train_seed(self, config: Config, run: TrackedRun, pruning: PruningCallback) -> TrainResult:
        """One seed's training, into its own run."""
        return Trainer(config, [MlflowTracker(run, drawer=self.context.drawer), pruning], progress=self.context.progress,
                       threads=self.context.threads).train()

    def seeded(self, trial: optuna.Trial, config: Config):
        """``[study] seeds = N``: the configuration trained with N seeds, one after another, each into a child run of
        the trial's run (its curves are its own run's; the trial's run holds the spread). The pruner sees the first
        seed only: pruned there, the trial is pruned and the other seeds are not trained. A seed that fails fails
        the trial (SeedFailed), its run FAILED; the seeds before it stay FINISHED."""
        context, spec = self.context, self.context.spec
        values, phases, results = [], [], []
        with TrialRun.open(context, trial, config) as trial_run:
            trial_run.run.set_tags({SEEDS_TAG: str(spec.seeds)})
            for index, seed_config in enumerate(seed_configs(config, spec.seeds)):
                pruning = PruningCallback(trial, spec, report=index == 0)
                child = TrackedRun.create_for_config(
                    context.client, seed_config, context.experiment,
                    run_name=f"{context.study_name} #{trial.number} seed {seed_config.seed}",
                    tags={STUDY_NAME_TAG: context.study_name, TRIAL_NUMBER_TAG: str(trial.number),
                          ROLE_TAG: TRIAL_SEED_ROLE, SEED_INDEX_TAG: str(index)},
                    parent_run_id=trial_run.run.run_id)
                try:
                    result = self.train_seed(seed_config, child, pruning)
                except TrialPrunedStop as stop:
                    child.end(KILLED)
                    trial_run.prune(pruning.pruned_at, str(stop))
                    raise optuna.TrialPruned(str(stop)) from None
                except SystemExit as exc:
                    child.end(KILLED)
                    trial_run.fail(exc)
                    raise KeyboardInterrupt() from exc
                except Exception as error:
                    child.end(status_for(error))
                    raise SeedFailed(f"seed {index} (seed={seed_config.seed}, data_seed={seed_config.data_seed}) "
                                     f"failed: {type(error).__name__}: {error}") from error
                phase = phase_of(spec, seed_config, result)
                child.set_tags({PHASE_TAG: phase})
                child.end(FINISHED, background=True)
                values.append(spec.target.score(Outcome(result, seed_config, spec.penalty_factor,
                                                        pruning.seconds_to_generalize)))
                phases.append(phase)
                results.append(result)
                trial.set_user_attr("seed_run_ids", [*trial.user_attrs.get("seed_run_ids", []), child.run_id])
            value = median_value(values)
            record_seeds(trial, trial_run.run, spec, values, phases, results)
            trial_run.complete(value, any(r.grokked for r in results), {PHASE_TAG: trial.user_attrs[PHASE_ATTR]})
        return value


def record_seeds(trial: optuna.Trial, run: TrackedRun, spec: StudySpec, values: list, phases: list[str],
                 results: list[TrainResult]) -> None:
    """A seeded trial's spread: user attrs (per seed, and median/min/max) and the same as metrics of its run."""
    first = [v[0] if isinstance(v, tuple) else v for v in values]
    gens = [r.step_of("generalization") for r in results]
    delays = [learning_phases.grokking_delay(r.events) for r in results]
    phase = max(set(phases), key=lambda p: (phases.count(p), -phases.index(p)))  # the commonest (first on ties)
    attrs = {"seed_values": first, "seed_generalization_steps": gens, "seed_grokking_delays": delays,
             "seed_events": [[{"event": e["event"], "step": e["step"]} for e in r.events] for r in results],
             "seed_phases": phases, "value_min": min(first), "value_max": max(first),
             "value_median": statistics.median(first), "seeds_generalized": sum(g is not None for g in gens),
             PHASE_ATTR: phase, "generalized": any(g is not None for g in gens),
             "final_step": max(r.final_step for r in results),
             "train_seconds": round(sum(r.train_seconds for r in results), 3)}
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    metrics = {"objective_median": attrs["value_median"], "objective_min": attrs["value_min"],
               "objective_max": attrs["value_max"], "seeds_generalized": attrs["seeds_generalized"]}
    for index, value in enumerate(first):
        metrics[f"objective_seed_{index}"] = value
    run.log_values(metrics, 0)
