"""Optuna adapter: a hyperparameter study whose trials are MLflow runs.

A study spec (TOML in ``studies/``) names the task, the search space, the objective, the per-trial budget,
the sampler and the pruner. Each trial is one ``run_experiment`` call: a child MLflow run of the study's
parent run, tagged with its trial number and final Optuna state. Optuna's own machinery does the rest:
RDB storage (SQLite or PostgreSQL) shared by workers on one or several machines, ``load_if_exists`` to
resume, ``MaxTrialsCallback`` to stop at N finished trials, heartbeats plus
``RetryHeartbeatStaleTrialCallback`` to fail and retry a killed worker's trial, ``optuna.visualization.matplotlib``
for the figures, optuna-dashboard for browsing.

Hand-written on purpose: the MLflow side. optuna-integration's ``MLflowCallback`` logs a trial after it
ends, as a run with no parent (optuna issue #5148) and in state FINISHED even when it was pruned or failed
(optuna PR #3524). Here the trial *is* the training run, created before training starts (so metrics stream
live), nested under one parent run per study, and ended FINISHED / KILLED (pruned) / FAILED with the tag
``optuna.trial_state``.

Objective values (minimised):
  ``steps``   -- the trial run's generalization_step; a trial that does not generalize within its budget
                 gets ``penalty_factor * max_steps`` (default 2 x budget: worse than any generalizing trial).
  ``seconds`` -- wall seconds of the training loop until generalization; not generalized: ``penalty_factor`` x
                 the seconds the whole budget took.
  ``steps_vs_train_frac`` -- two objectives (steps as above, train_frac): a Pareto front. No pruning (Optuna
                 does not prune multi-objective trials).
"""

from __future__ import annotations

import math
import os
import socket
import time
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .config import PRESETS, Config, ConfigError, UserError, preset
from .train import Callback, TrainingStopped

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
OBJECTIVES = ("steps", "seconds", "steps_vs_train_frac")
PRUNE_METRICS = ("test_loss", "test_error")  # test_error = 1 - test_acc (minimised like the objective)
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler", "cmaes": "CmaEsSampler",
            "qmc": "QMCSampler", "gp": "GPSampler", "nsga2": "NSGAIISampler", "bruteforce": "BruteForceSampler"}
PRUNERS = {"median": "MedianPruner", "percentile": "PercentilePruner", "hyperband": "HyperbandPruner",
           "successive_halving": "SuccessiveHalvingPruner", "threshold": "ThresholdPruner",
           "patient": "PatientPruner", "none": "NopPruner"}
ROLE_TAG = "grokking_tracked.role"
MAX_CONSECUTIVE_FAILURES = 3


class StudyError(UserError):
    """A user-facing study problem (bad spec, unreachable storage); its message is one line."""


class TrialPrunedStop(TrainingStopped):
    """Raised from the pruning callback: training stops, the run ends KILLED, the trial becomes PRUNED."""


# ---------------------------------------------------------------------------------------------- spec
@dataclass
class Param:
    name: str
    type: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    values: list | None = None  # the grid (grid sampler)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, self.choices)

    def grid(self) -> list:
        if self.values is not None:
            return list(self.values)
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is not None:
            n = int(round((self.high - self.low) / self.step))
            return [self.low + i * self.step for i in range(n + 1)]
        raise StudyError(f"the grid sampler needs `values` (or `step`) for search parameter {self.name!r}")


@dataclass
class StudySpec:
    path: str
    name: str
    experiment: str = "grokking-studies"
    n_trials: int = 10
    preset: str = "default"
    overrides: dict = field(default_factory=dict)
    params: list[Param] = field(default_factory=list)
    objective: str = "steps"
    penalty_factor: float = 2.0
    sampler: str = "tpe"
    sampler_args: dict = field(default_factory=dict)
    pruner: str = "median"
    pruner_args: dict = field(default_factory=dict)
    prune_metric: str = "test_loss"
    report_every: int = 50
    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retry: int = 2
    compare_preset: str = "seed"
    lockstep: int = 1  # trials trained together in one LockstepTrainer; 1 = one at a time
    text: str = ""

    @property
    def directions(self) -> list[str]:
        return ["minimize", "minimize"] if self.objective == "steps_vs_train_frac" else ["minimize"]

    def base_config(self) -> Config:
        return preset(self.preset, **self.overrides)

    def penalty(self, config: Config) -> float:
        return self.penalty_factor * config.max_steps


_SECTIONS = {"study", "task", "objective", "search", "sampler", "pruner"}
_STUDY_KEYS = {"name", "experiment", "n_trials", "heartbeat_interval", "grace_period", "max_retry", "compare_preset",
               "lockstep"}
_OBJECTIVE_KEYS = {"target", "penalty_factor"}
_PARAM_KEYS = {"type", "low", "high", "log", "step", "choices", "values"}


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a spec; every problem is a one-line StudyError naming the file."""
    path = Path(path)
    where = path.name
    try:
        text = path.read_text()
    except OSError as exc:
        raise StudyError(f"cannot read study spec {path}: {exc.strerror or exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{where}: malformed TOML: {exc}") from None

    def fail(message: str):
        raise StudyError(f"{where}: {message}")

    def table(name: str) -> dict:
        value = raw.get(name, {})
        if not isinstance(value, dict):
            fail(f"[{name}] must be a table")
        return dict(value)

    unknown = sorted(set(raw) - _SECTIONS)
    if unknown:
        fail(f"unknown section(s) {', '.join(unknown)}; expected {', '.join(sorted(_SECTIONS))}")
    study, task, objective = table("study"), table("task"), table("objective")
    search, sampler, pruner = table("search"), table("sampler"), table("pruner")
    for name, keys, allowed in (("study", study, _STUDY_KEYS), ("objective", objective, _OBJECTIVE_KEYS)):
        extra = sorted(set(keys) - allowed)
        if extra:
            fail(f"unknown field(s) in [{name}]: {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")

    spec = StudySpec(path=str(path), name=str(study.get("name", path.stem)), text=text)
    spec.experiment = str(study.get("experiment", spec.experiment))
    for key in ("n_trials", "heartbeat_interval", "grace_period", "max_retry", "lockstep"):
        if key in study:
            if not isinstance(study[key], int) or study[key] < (0 if key == "max_retry" else 1):
                fail(f"[study] {key} must be a positive integer, got {study[key]!r}")
            setattr(spec, key, study[key])
    spec.compare_preset = str(study.get("compare_preset", spec.compare_preset))

    spec.preset = str(task.pop("preset", "default"))
    if spec.preset not in PRESETS:
        fail(f"unknown preset {spec.preset!r}; choose one of {', '.join(PRESETS)}")
    fields = set(Config.field_names())
    unknown = sorted(set(task) - fields)
    if unknown:
        fail(f"unknown config field(s) in [task]: {', '.join(unknown)}")
    spec.overrides = task
    try:
        base = spec.base_config()
    except ConfigError as exc:
        fail(f"[task]: {exc}")

    spec.objective = str(objective.get("target", "steps"))
    if spec.objective not in OBJECTIVES:
        fail(f"unknown objective target {spec.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    spec.penalty_factor = objective.get("penalty_factor", spec.penalty_factor)
    if not isinstance(spec.penalty_factor, (int, float)) or spec.penalty_factor < 1:
        fail(f"[objective] penalty_factor must be a number >= 1, got {spec.penalty_factor!r}")

    if not search:
        fail("[search] is empty: name at least one config field to search")
    unknown = sorted(set(search) - fields)
    if unknown:
        fail(f"unknown config field(s) in [search]: {', '.join(unknown)}")
    for name, body in search.items():
        spec.params.append(_parse_param(name, body, base, fail))

    spec.sampler = str(sampler.pop("name", "tpe")).lower()
    if spec.sampler not in SAMPLERS:
        fail(f"unknown sampler {spec.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    spec.sampler_args = sampler
    spec.pruner = str(pruner.pop("name", "median")).lower()
    if spec.pruner not in PRUNERS:
        fail(f"unknown pruner {spec.pruner!r}; choose one of {', '.join(PRUNERS)}")
    spec.prune_metric = str(pruner.pop("metric", "test_loss"))
    if spec.prune_metric not in PRUNE_METRICS:
        fail(f"unknown pruner metric {spec.prune_metric!r}; choose one of {', '.join(PRUNE_METRICS)}")
    spec.report_every = pruner.pop("report_every", 50)
    if not isinstance(spec.report_every, int) or spec.report_every < 1:
        fail(f"[pruner] report_every must be a positive integer, got {spec.report_every!r}")
    spec.pruner_args = pruner
    if spec.objective == "steps_vs_train_frac":
        if spec.pruner != "none":
            fail("multi-objective studies cannot prune (Optuna does not support it): set [pruner] name = \"none\"")
        if "train_frac" not in search:
            fail("objective steps_vs_train_frac needs train_frac in [search]")
    # Build once so unknown sampler/pruner arguments fail now, not in a worker.
    make_sampler(spec)
    make_pruner(spec)
    return spec


def _parse_param(name: str, body: Any, base: Config, fail) -> Param:
    if not isinstance(body, dict):
        fail(f"[search] {name} must be a table such as {{ type = \"float\", low = 0.1, high = 1.0 }}")
    extra = sorted(set(body) - _PARAM_KEYS)
    if extra:
        fail(f"unknown key(s) for search parameter {name}: {', '.join(extra)}; allowed: {', '.join(sorted(_PARAM_KEYS))}")
    kind = body.get("type", "categorical" if "choices" in body else "float")
    if kind not in ("float", "int", "categorical"):
        fail(f"search parameter {name}: unknown type {kind!r}; choose float, int or categorical")
    param = Param(name, kind, log=bool(body.get("log", False)), step=body.get("step"), values=body.get("values"))
    if kind == "categorical":
        param.choices = body.get("choices")
        if not isinstance(param.choices, list) or not param.choices:
            fail(f"search parameter {name}: categorical needs a non-empty `choices` list")
        corners = param.choices
    else:
        low, high = body.get("low"), body.get("high")
        if param.values is not None:
            if not isinstance(param.values, list) or not param.values:
                fail(f"search parameter {name}: `values` must be a non-empty list")
            low = min(param.values) if low is None else low
            high = max(param.values) if high is None else high
        if not isinstance(low, (int, float)) or not isinstance(high, (int, float)):
            fail(f"search parameter {name}: needs numeric `low` and `high`")
        if not low < high:
            fail(f"search parameter {name}: empty or inverted range (low {low} must be < high {high})")
        if param.log and low <= 0:
            fail(f"search parameter {name}: a log range needs low > 0, got {low}")
        if param.log and param.step is not None:
            fail(f"search parameter {name}: `step` and `log` cannot be combined")
        if param.values is not None and any(not low <= v <= high for v in param.values):
            fail(f"search parameter {name}: `values` must lie within [{low}, {high}]")
        param.low, param.high = low, high
        corners = [low, high]
    for value in corners:
        try:
            base.replace(**{name: value})
        except ConfigError as exc:
            fail(f"search parameter {name}: value {value!r} is not a valid config: {exc}")
    return param


# ---------------------------------------------------------------------------------------------- optuna objects
def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    cls = getattr(optuna.samplers, SAMPLERS[spec.sampler])
    args = dict(spec.sampler_args)
    if spec.sampler == "grid":
        args.setdefault("search_space", {p.name: p.grid() for p in spec.params})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**args)
    except (TypeError, ValueError) as exc:
        raise StudyError(f"{Path(spec.path).name}: sampler {spec.sampler}: {str(exc).splitlines()[0]}") from None
    except ImportError as exc:
        raise StudyError(f"sampler {spec.sampler} needs a package that is not installed: "
                         f"{str(exc).splitlines()[0]}") from None


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    args = dict(spec.pruner_args)
    try:
        if spec.pruner == "patient":  # wraps another pruner: [pruner] wrapped = "median", patience = 3
            wrapped = str(args.pop("wrapped", "median"))
            if wrapped not in PRUNERS or wrapped == "patient":
                raise ValueError(f"unknown wrapped pruner {wrapped!r}")
            inner = getattr(optuna.pruners, PRUNERS[wrapped])()
            return optuna.pruners.PatientPruner(inner, **args)
        return getattr(optuna.pruners, PRUNERS[spec.pruner])(**args)
    except (TypeError, ValueError) as exc:
        raise StudyError(f"{Path(spec.path).name}: pruner {spec.pruner}: {str(exc).splitlines()[0]}") from None


def redact(url: str) -> str:
    """The storage URL with any password replaced by ***."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def default_storage() -> str:
    store = Path("mlruns").resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store}/optuna.db"


class StaleTrialCallback:
    """Heartbeat-stale trial (its worker died): end its MLflow child run FAILED, then let Optuna retry it."""

    def __init__(self, tracking_uri: str, experiment: str, max_retry: int):
        self.tracking_uri, self.experiment, self.max_retry = tracking_uri, experiment, max_retry

    def __call__(self, study: optuna.Study, trial) -> None:
        try:
            close_trial_runs(self.tracking_uri, self.experiment, study.study_name, trial,
                             reason="heartbeat stale: its worker stopped")
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=self.max_retry)(study, trial)


def close_trial_runs(tracking_uri: str, experiment: str, study_name: str, trial, reason: str) -> list[str]:
    """End every still-RUNNING MLflow run of this trial FAILED (found by user attr and by tags)."""
    from .tracking import connect

    client = connect(tracking_uri)
    run_ids = set()
    if trial.user_attrs.get("mlflow_run_id"):
        run_ids.add(trial.user_attrs["mlflow_run_id"])
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:  # the run may exist before on_run_started recorded its id
        found = client.search_runs([exp.experiment_id],
                                   f"tags.`optuna.study_name` = '{study_name}' and "
                                   f"tags.`optuna.trial_number` = '{trial.number}'")
        run_ids.update(r.info.run_id for r in found)
    closed = []
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except Exception:
            continue
        if run.info.status == "RUNNING" and run.data.tags.get("optuna.trial_number") == str(trial.number):
            client.set_tag(run_id, "optuna.trial_state", "FAIL")
            client.set_tag(run_id, "optuna.fail_reason", reason)
            client.set_terminated(run_id, status="FAILED")
            closed.append(run_id)
    return closed


def open_storage(url: str, spec: StudySpec, tracking_uri: str, experiment: str, heartbeat: bool = True):
    from optuna.storages import RDBStorage

    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = dict(heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period,
                      heartbeat_stale_trial_callback=StaleTrialCallback(tracking_uri, experiment, spec.max_retry))
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, **kwargs)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StudyError(f"cannot open the Optuna storage {redact(url)}: {message}") from None


def load_study(spec: StudySpec, storage, study_name: str) -> optuna.Study:
    try:
        return optuna.create_study(study_name=study_name, storage=storage, sampler=make_sampler(spec),
                                   pruner=make_pruner(spec), directions=spec.directions, load_if_exists=True)
    except ValueError as exc:  # e.g. the stored study has other directions
        raise StudyError(f"study {study_name!r}: {str(exc).splitlines()[0]}") from None


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


# ---------------------------------------------------------------------------------------------- objective
class TrialCallback(Callback):
    """Reports the pruning metric to Optuna and stops training when the pruner says so; also times
    generalization for the ``seconds`` objective."""

    def __init__(self, trial: optuna.Trial, spec: StudySpec):
        self.trial, self.spec = trial, spec
        self.started = 0.0
        self.seconds_to_generalize: float | None = None
        self.pruned_at: int | None = None

    def on_train_start(self, trainer) -> None:
        self.started = time.perf_counter()

    def on_eval(self, trainer, step: int, metrics: dict, events: list[dict]) -> None:
        if any(e["event"] == "generalization" for e in events) and self.seconds_to_generalize is None:
            self.seconds_to_generalize = time.perf_counter() - self.started
        if self.spec.pruner == "none" or step == 0 or step % self.spec.report_every:
            return
        if trainer.detector.step_of("generalization") is not None:
            return  # already generalized: never prune a success during its stop margin
        value = metrics["test_loss"] if self.spec.prune_metric == "test_loss" else 1.0 - metrics["test_acc"]
        if not math.isfinite(value):
            value = float("inf")
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.pruned_at = step
            raise TrialPrunedStop(f"pruned at step {step} ({self.spec.prune_metric} {value:.4g})")


def trial_config(spec: StudySpec, trial: optuna.Trial) -> Config:
    """The trial's config: the spec's task with the sampled parameters."""
    return spec.base_config().replace(**{p.name: p.suggest(trial) for p in spec.params})


def trial_run_tags(trial: optuna.Trial, study_name: str) -> dict[str, str]:
    """Tags of a trial's MLflow child run (also what ``close_trial_runs`` searches by)."""
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    tags = {"optuna.study_name": study_name, "optuna.trial_number": str(trial.number),
            "optuna.trial_state": "RUNNING", ROLE_TAG: "trial"}
    frozen = trial.study._storage.get_trial(trial._trial_id)  # Trial has no system_attrs in Optuna 5
    retried = frozen.system_attrs.get("failed_trial")  # set by RetryHeartbeatStaleTrialCallback
    if retried is not None:
        tags["optuna.retried_trial_number"] = str(retried)
    return tags


def tag_trial_run(client, run_id: str | None, state: str, **tags: str) -> None:
    """Record the trial's final Optuna state (and extra tags) on its MLflow run."""
    from mlflow.entities import RunTag

    if run_id is None:
        return
    client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in
                                   {"optuna.trial_state": state, **tags}.items()])  # one request, not one per tag


def trial_value(trial: optuna.Trial, spec: StudySpec, config: Config, result, seconds_to_generalize: float | None):
    """The objective value of a finished training (penalty if it did not generalize); records user attrs."""
    gen = result.step_of("generalization")
    trial.set_user_attr("generalized", gen is not None)
    trial.set_user_attr("generalization_step", gen)
    trial.set_user_attr("memorization_step", result.step_of("memorization"))
    trial.set_user_attr("final_step", result.final_step)
    trial.set_user_attr("train_seconds", round(result.train_seconds, 3))
    steps = float(gen) if gen is not None else spec.penalty(config)
    if spec.objective == "seconds":
        return seconds_to_generalize if gen is not None else spec.penalty_factor * result.train_seconds
    if spec.objective == "steps_vs_train_frac":
        return (steps, config.train_frac)
    return steps


def complete_tags(value, result) -> dict[str, str]:
    return {"optuna.value": str(value), "optuna.generalized": str(result.grokked).lower()}


class Objective:
    def __init__(self, spec: StudySpec, study_name: str, tracking_uri: str, experiment: str, parent_run_id: str,
                 progress: bool = True):
        self.spec, self.study_name = spec, study_name
        self.tracking_uri, self.experiment, self.parent_run_id = tracking_uri, experiment, parent_run_id
        self.progress = progress

    def _close(self, run_id: str | None, state: str, **tags: str) -> None:
        if run_id is None:
            return
        from .tracking import connect

        tag_trial_run(connect(self.tracking_uri), run_id, state, **tags)

    def __call__(self, trial: optuna.Trial):
        from .tracking import run_experiment

        config = trial_config(self.spec, trial)
        tags = trial_run_tags(trial, self.study_name)
        callback = TrialCallback(trial, self.spec)
        started: dict[str, str] = {}

        def on_run_started(run_id: str) -> None:
            started["run_id"] = run_id
            trial.set_user_attr("mlflow_run_id", run_id)

        try:
            outcome = run_experiment(config, self.tracking_uri, experiment=self.experiment,
                                     run_name=f"{self.study_name}-trial-{trial.number}",
                                     parent_run_id=self.parent_run_id, tags=tags, callbacks=[callback],
                                     progress=self.progress, on_run_started=on_run_started)
        except TrialPrunedStop as exc:
            self._close(started.get("run_id"), "PRUNED", **{"optuna.pruned_step": str(callback.pruned_at)})
            raise optuna.TrialPruned(str(exc)) from None
        except (KeyboardInterrupt, SystemExit) as exc:
            self._close(started.get("run_id"), "FAIL")
            # Optuna marks a trial FAIL on KeyboardInterrupt but would leave it RUNNING on SystemExit (SIGTERM).
            raise KeyboardInterrupt() from exc
        except BaseException:
            self._close(started.get("run_id"), "FAIL")
            raise
        value = trial_value(trial, self.spec, config, outcome.result, callback.seconds_to_generalize)
        self._close(outcome.run_id, "COMPLETE", **complete_tags(value, outcome.result))
        return value


class _FailureGuard:
    """Stops a worker after several consecutive FAILed trials (e.g. the tracking server went away) instead of
    failing forever: MaxTrialsCallback only counts finished trials."""

    def __init__(self):
        self.consecutive = 0
        self.tripped = False

    def __call__(self, study: optuna.Study, trial) -> None:
        self.consecutive = self.consecutive + 1 if trial.state == TrialState.FAIL else 0
        if self.consecutive >= MAX_CONSECUTIVE_FAILURES:
            self.tripped = True
            study.stop()


# ---------------------------------------------------------------------------------------------- running
@dataclass
class StudySettings:
    spec_path: str
    n_trials: int
    storage: str
    study_name: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    timeout: float | None = None
    progress: bool = True
    threads: int | None = None
    lockstep: int = 1


def optimize(settings: StudySettings) -> None:
    """One worker: load the study from the shared storage and run trials until N have finished."""
    if settings.threads:
        os.environ["GROKKING_TORCH_THREADS"] = str(settings.threads)
        import torch

        torch.set_num_threads(settings.threads)
    spec = load_spec(settings.spec_path)
    storage = open_storage(settings.storage, spec, settings.tracking_uri, settings.experiment)
    study = load_study(spec, storage, settings.study_name)
    _sweep_stale(study)
    if count_finished(study) >= settings.n_trials:
        return
    if settings.lockstep > 1:
        from .study_lockstep import optimize_lockstep

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optimize_lockstep(settings, spec, study, settings.lockstep)
        return
    objective = Objective(spec, settings.study_name, settings.tracking_uri, settings.experiment,
                          settings.parent_run_id, progress=settings.progress)
    guard = _FailureGuard()
    optuna.logging.set_verbosity(optuna.logging.WARNING if not settings.progress else optuna.logging.INFO)
    study.optimize(objective, timeout=settings.timeout, catch=(Exception,),
                   callbacks=[optuna.study.MaxTrialsCallback(settings.n_trials, states=FINISHED_STATES), guard])
    if guard.tripped:
        failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        reason = failed[-1].system_attrs.get("fail_reason", "") if failed else ""
        raise StudyError(f"{MAX_CONSECUTIVE_FAILURES} trials in a row failed; stopping "
                         f"({reason.splitlines()[0] if reason else 'see the FAILED runs in MLflow'})")


def _sweep_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _worker_main(settings: StudySettings) -> None:
    import signal

    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        optimize(settings)
    except (StudyError, KeyboardInterrupt, SystemExit) as exc:
        if str(exc):
            print(f"grokking-tracked worker {os.getpid()}: {exc}", flush=True)
        raise SystemExit(1)


def ensure_parent_run(client, experiment_id: str, study: optuna.Study, spec: StudySpec, storage_url: str) -> str:
    """One MLflow parent run per study, found again on every later invocation (also from other machines)."""
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id:
        try:
            client.get_run(run_id)
        except Exception:
            run_id = None
    if not run_id:
        found = client.search_runs([experiment_id], f"tags.`optuna.study_name` = '{study.study_name}' and "
                                                    f"tags.`{ROLE_TAG}` = 'study'",
                                   order_by=["attributes.start_time ASC"], max_results=1)
        run_id = found[0].info.run_id if found else None
    if not run_id:
        tags = {"optuna.study_name": study.study_name, ROLE_TAG: "study", "optuna.storage": redact(storage_url),
                "optuna.sampler": spec.sampler, "optuna.pruner": spec.pruner, "optuna.objective": spec.objective,
                "grokking_tracked.spec": spec.path, "grokking_tracked.preset": spec.preset}
        run_id = client.create_run(experiment_id, run_name=f"study-{study.study_name}", tags=tags).info.run_id
        client.log_text(run_id, spec.text, "study_spec.toml")
        study.set_user_attr("mlflow_parent_run_id", run_id)
    client.update_run(run_id, status="RUNNING")
    return run_id


def run_study(spec_path: str, n_trials: int | None = None, timeout: float | None = None, storage: str | None = None,
              study_name: str | None = None, workers: int = 1, tracking_uri: str | None = None,
              experiment: str | None = None, progress: bool = True, lockstep: int | None = None,
              echo=print) -> dict:
    """Run (or resume, or join) a study; returns a summary dict."""
    spec = load_spec(spec_path)
    if workers < 1:
        raise StudyError(f"--workers must be >= 1, got {workers}")
    lockstep = spec.lockstep if lockstep is None else lockstep
    if lockstep < 1:
        raise StudyError(f"--lockstep must be >= 1 (trials trained together; 1 = one at a time), got {lockstep}")
    if lockstep > 1:
        from .study_lockstep import check_lockstep_spec

        check_lockstep_spec(spec)
    from .tracking import connect, ensure_experiment, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(tracking_uri)
    experiment = experiment or spec.experiment
    study_name = study_name or spec.name
    n_trials = n_trials or spec.n_trials
    storage = storage or default_storage()
    if workers > 1 and storage.startswith("sqlite"):
        echo(f"warning: {workers} workers on SQLite storage may hit 'database is locked'; "
             "use --storage postgresql://... for parallel studies")
    rdb = open_storage(storage, spec, tracking_uri, experiment)  # both fail fast, before anything is created
    client = connect(tracking_uri)
    experiment_id = ensure_experiment(client, experiment)
    study = load_study(spec, rdb, study_name)
    parent = ensure_parent_run(client, experiment_id, study, spec, storage)
    echo(f"study {study_name!r}: storage {redact(storage)}, MLflow parent run {parent} "
         f"in experiment {experiment!r}; {count_finished(study)}/{n_trials} trials finished")
    settings = StudySettings(str(Path(spec_path).resolve()), n_trials, storage, study_name, tracking_uri,
                             experiment, parent, timeout, progress=progress and workers == 1, lockstep=lockstep)
    try:
        if workers == 1:
            optimize(settings)
        else:
            _run_workers(settings, workers, echo)
    except BaseException as exc:
        client.set_terminated(parent, status="KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit))
                              else "FAILED")
        raise
    summary = finalize(study, spec, client, parent, rdb.grace_period or 0, rdb.heartbeat_interval or 0)
    client.set_terminated(parent, status="FINISHED")
    return summary


def _run_workers(settings: StudySettings, workers: int, echo) -> None:
    import multiprocessing

    settings.threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_main, args=(settings,), name=f"study-worker-{i}")
                 for i in range(workers)]
    for process in processes:
        process.start()
    echo(f"{workers} workers started (pids {', '.join(str(p.pid) for p in processes)}), "
         f"{settings.threads} torch thread(s) each")
    try:
        for process in processes:
            process.join()
    except BaseException:
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: the worker's run ends KILLED, its trial FAIL
        for process in processes:
            process.join(30)
        raise
    failed = [p for p in processes if p.exitcode not in (0, None)]
    if len(failed) == workers:
        raise StudyError(f"all {workers} workers failed (exit codes {', '.join(str(p.exitcode) for p in failed)})")


# ---------------------------------------------------------------------------------------------- report
def finalize(study: optuna.Study, spec: StudySpec, client, parent_run_id: str, grace: int, interval: int) -> dict:
    """Sweep stale trials, then log figures, best trial and counts on the parent run."""
    deadline = time.monotonic() + (grace + 2 * interval if interval else 0)
    while True:
        _sweep_stale(study)
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) or time.monotonic() >= deadline:
            break
        time.sleep(1)
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING,
                            TrialState.WAITING)}
    step = counts["complete"] + counts["pruned"]
    client.log_batch(parent_run_id, metrics=_metrics({f"n_{k}": v for k, v in counts.items()}, step))
    summary: dict[str, Any] = {"counts": counts, "parent_run_id": parent_run_id}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete and len(spec.directions) == 1:
        best = study.best_trial
        summary.update(best_value=best.value, best_params=best.params, best_trial=best.number)
        numeric = {f"best_{k}": v for k, v in best.params.items() if isinstance(v, (int, float))}
        client.log_batch(parent_run_id, metrics=_metrics({"best_value": best.value, "best_trial_number": best.number,
                                                          **numeric}, step))
        client.set_tag(parent_run_id, "optuna.best_trial_number", str(best.number))
        client.set_tag(parent_run_id, "optuna.best_params", str(best.params))
        if best.user_attrs.get("mlflow_run_id"):
            client.set_tag(parent_run_id, "optuna.best_run_id", best.user_attrs["mlflow_run_id"])
    _log_figures(study, spec, client, parent_run_id, complete)
    try:
        client.log_text(parent_run_id, study.trials_dataframe().to_csv(index=False), "trials.csv")
    except Exception:
        pass
    return summary


def _metrics(values: dict, step: int):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]


def _log_figures(study, spec: StudySpec, client, parent_run_id: str, complete: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    def log(name: str, make) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = make()
        except Exception as exc:  # e.g. importances need >= 2 completed trials with varying params
            client.set_tag(parent_run_id, f"figure_skipped.{name}", str(exc).splitlines()[0][:250] or type(exc).__name__)
            return
        fig = result.figure if hasattr(result, "figure") else result.flat[0].figure if hasattr(result, "flat") else result
        fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # colorbar axes of contour plots
            fig.tight_layout()
        client.log_figure(parent_run_id, fig, f"figures/{name}.png")
        plt.close(fig)

    multi = len(spec.directions) > 1
    names = [p.name for p in spec.params]
    if not complete:
        client.set_tag(parent_run_id, "figure_skipped.all", "no completed trial yet")
        return
    if multi:
        log("pareto_front", lambda: ovm.plot_pareto_front(study, target_names=["steps to generalize", "train_frac"]))
    else:
        log("optimization_history", lambda: ovm.plot_optimization_history(study))
        if len(complete) >= 2:
            log("param_importances", lambda: ovm.plot_param_importances(study))
        else:
            client.set_tag(parent_run_id, "figure_skipped.param_importances", "needs >= 2 completed trials")
        log("slice", lambda: ovm.plot_slice(study))
        if len(names) >= 2 and len(complete) >= 2:
            log("contour", lambda: ovm.plot_contour(study, params=names[:3]))
        if spec.pruner != "none":
            log("intermediate_values", lambda: ovm.plot_intermediate_values(study))
    if "train_frac" in names:
        log("steps_vs_train_frac", lambda: _train_frac_curve(study, spec))
    if not multi:
        log("best_vs_seed_preset", lambda: _best_vs_preset(study, spec, client))


def _train_frac_curve(study, spec: StudySpec):
    """Steps to generalize vs train fraction (Power et al. 2022: steep growth as the fraction falls)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "train_frac" in t.params]
    gen = sorted((t.params["train_frac"], t.user_attrs.get("generalization_step")) for t in done
                 if t.user_attrs.get("generalized"))
    miss = sorted(t.params["train_frac"] for t in done if not t.user_attrs.get("generalized"))
    if gen:
        ax.plot([g[0] for g in gen], [g[1] for g in gen], "o-", label="generalized (test acc ≥ threshold)")
    if miss:
        budget = max(t.user_attrs.get("final_step") or 0 for t in done)
        ax.scatter(miss, [budget] * len(miss), marker="^", color="tab:red",
                   label=f"not within the budget ({budget} steps)")
    ax.set_yscale("log")
    ax.set_xlabel("training fraction")
    ax.set_ylabel("steps to generalize")
    ax.set_title(f"study {study.study_name}: steps to generalize vs training fraction")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _best_vs_preset(study, spec: StudySpec, client):
    """The best trial's learning curves beside the latest FINISHED run of the comparison preset (``seed``),
    both fetched from MLflow. No such run: the figure says so (training one here would cost minutes)."""
    import matplotlib.pyplot as plt

    from .tracking import fetch_history

    best = study.best_trial
    best_run = best.user_attrs.get("mlflow_run_id")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    curves = []
    if best_run:
        curves.append((f"best trial {best.number}", fetch_history(client, best_run)))
    experiments = [e.experiment_id for e in client.search_experiments()]
    seed_runs = client.search_runs(experiments, f"tags.`grokking_tracked.preset` = '{spec.compare_preset}' and "
                                                f"attributes.status = 'FINISHED'",
                                   order_by=["attributes.start_time DESC"], max_results=20) if experiments else []
    seed_runs = [r for r in seed_runs if r.data.tags.get(ROLE_TAG) != "study"]  # a study's parent is no run
    if seed_runs:
        curves.append((f"`{spec.compare_preset}` preset ({seed_runs[0].info.run_id[:8]})",
                       fetch_history(client, seed_runs[0].info.run_id)))
    for color, (label, history) in zip(("tab:blue", "tab:orange"), curves):
        history = [(s, m) for s, m in history if s > 0]  # log-scaled steps
        steps = [s for s, _ in history]
        for ax, key, style in ((axes[0], "test_acc", "-"), (axes[0], "train_acc", ":"),
                               (axes[1], "test_loss", "-"), (axes[1], "train_loss", ":")):
            ax.plot(steps, [m.get(key, float("nan")) for _, m in history], style, color=color,
                    label=f"{key}: {label}")
    axes[0].set_ylabel("accuracy")
    axes[1].set_ylabel("loss")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("step (log scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not seed_runs:
        fig.text(0.5, 0.01, f"no FINISHED run of the `{spec.compare_preset}` preset in this tracking store "
                            f"(train one: grokking-tracked run --preset {spec.compare_preset}); only the best trial shown",
                 ha="center", fontsize=8, color="tab:red")
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    fig.suptitle(f"study {study.study_name}: best trial {best.number} ({params}) vs `{spec.compare_preset}` preset",
                 fontsize=10)
    return fig


def serve_dashboard(spec_path: str | None, storage: str | None, port: int) -> None:
    """optuna-dashboard over the study storage, bound to 127.0.0.1."""
    import optuna_dashboard

    url = storage or default_storage()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rdb = optuna.storages.RDBStorage(url)
    except Exception as exc:
        raise StudyError(f"cannot open the Optuna storage {redact(url)}: {str(exc).splitlines()[0]}") from None
    print(f"optuna-dashboard on http://127.0.0.1:{port} over {redact(url)}", flush=True)
    optuna_dashboard.run_server(rdb, host="127.0.0.1", port=port)
