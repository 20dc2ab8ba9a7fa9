"""A study spec: the TOML file in ``studies/`` that names the task, the search space, the objective, the budget,
the sampler and the pruner; and the Optuna sampler and pruner it asks for.

Objectives (minimised) are registered in ``objectives.py``: ``steps``, ``seconds``, ``delay``,
``steps_vs_train_frac``; see there.
"""

from __future__ import annotations

import itertools
import math
import tomllib
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from ..config import PRESETS, Config, ConfigError, UserError, name_problem, preset
from . import objectives
from ..messages import first_line, short_error

PRUNE_METRICS = ("test_loss", "test_error")  # test_error = 1 - test_acc (minimised like the objective)
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler", "cmaes": "CmaEsSampler",
            "qmc": "QMCSampler", "gp": "GPSampler", "nsga2": "NSGAIISampler", "bruteforce": "BruteForceSampler"}
PRUNERS = {"median": "MedianPruner", "percentile": "PercentilePruner", "hyperband": "HyperbandPruner",
           "successive_halving": "SuccessiveHalvingPruner", "threshold": "ThresholdPruner",
           "patient": "PatientPruner", "none": "NopPruner", "grokking": "GrokkingPruner"}  # grokking: pruners.py


class StudyError(UserError):
    """A user-facing study problem (bad spec, unreachable storage); its message is one line."""


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

    def grid_size(self) -> int | None:
        """Points of this parameter's grid, counted without making it (None: no grid: a float without step)."""
        if self.values is not None:
            return len(self.values)
        if self.type == "categorical":
            return len(self.choices)
        if self.type == "int":
            return len(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        return None if self.step is None else int(round((self.high - self.low) / self.step)) + 1

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
    compare_preset: str | None = None  # the baseline of best_vs_baseline.png (default: the study's preset)
    lockstep: int = 1  # trials trained together in one LockstepTrainer; 1 = one at a time
    seeds: int = 1  # each trial trains its config with this many seeds (seed, data_seed); its value is the median
    comprehension_delay: int | None = None  # [phases]: see learning_phases.py (default: max_steps // 10)
    text: str = ""

    @property
    def target(self) -> objectives.StudyObjective:
        return objectives.get(self.objective)

    @property
    def directions(self) -> list[str]:
        return self.target.directions

    def base_config(self) -> Config:
        return preset(self.preset, **self.overrides)

    def penalty(self, config: Config) -> float:
        return self.penalty_factor * config.max_steps


_SECTIONS = {"study", "task", "objective", "search", "sampler", "pruner", "phases"}
_STUDY_KEYS = {"name", "experiment", "n_trials", "heartbeat_interval", "grace_period", "max_retry", "compare_preset",
               "lockstep", "seeds"}
_PHASES_KEYS = {"comprehension_delay"}
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
    search, sampler, pruner, phases = table("search"), table("sampler"), table("pruner"), table("phases")
    for name, keys, allowed in (("study", study, _STUDY_KEYS), ("objective", objective, _OBJECTIVE_KEYS),
                                ("phases", phases, _PHASES_KEYS)):
        extra = sorted(set(keys) - allowed)
        if extra:
            fail(f"unknown field(s) in [{name}]: {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")

    spec = StudySpec(path=str(path), name=study.get("name", path.stem), text=text)
    spec.experiment = study.get("experiment", spec.experiment)
    for key in ("name", "experiment"):
        if problem := name_problem(getattr(spec, key)):
            fail(f"[study] {key} {problem}")
    if "'" in spec.name and '"' in spec.name:  # MLflow's filter strings cannot quote such a name
        fail(f"[study] name {spec.name!r} contains both quote characters; MLflow cannot search for it")
    for key in ("n_trials", "heartbeat_interval", "grace_period", "max_retry", "lockstep", "seeds"):
        if key in study:
            if not is_integer(study[key]) or study[key] < (0 if key in ("max_retry", "n_trials") else 1):
                fail(f"[study] {key} must be a {'non-negative' if key in ('max_retry', 'n_trials') else 'positive'} "
                     f"integer, got {study[key]!r}")
            setattr(spec, key, study[key])
    if spec.lockstep > MAX_LOCKSTEP:
        fail(f"[study] lockstep must be at most {MAX_LOCKSTEP} trials trained together, got {spec.lockstep}")
    if spec.seeds > MAX_SEEDS:
        fail(f"[study] seeds must be at most {MAX_SEEDS} trainings per trial, got {spec.seeds}")
    if spec.grace_period <= spec.heartbeat_interval:
        fail(f"[study] grace_period ({spec.grace_period} s) must exceed heartbeat_interval "
             f"({spec.heartbeat_interval} s), or live trials would be declared dead")
    spec.compare_preset = study.get("compare_preset")
    if spec.compare_preset is not None and spec.compare_preset not in PRESETS:
        fail(f"[study] compare_preset: unknown preset {spec.compare_preset!r}; choose one of {', '.join(PRESETS)}")

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
    if spec.objective not in objectives.names():
        fail(f"unknown objective target {spec.objective!r}; choose one of {', '.join(objectives.names())}")
    spec.penalty_factor = objective.get("penalty_factor", spec.penalty_factor)
    if not is_number(spec.penalty_factor) or spec.penalty_factor < 1:
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
    if "search_space" in sampler:  # the grid sampler's own grid: checked as [search] values are (and unique)
        _merge_grid(spec, sampler.pop("search_space"), base, fail)
    spec.sampler_args = sampler
    spec.pruner = str(pruner.pop("name", "median")).lower()
    if spec.pruner not in PRUNERS:
        fail(f"unknown pruner {spec.pruner!r}; choose one of {', '.join(PRUNERS)}")
    spec.prune_metric = str(pruner.pop("metric", "test_loss"))
    if spec.prune_metric not in PRUNE_METRICS:
        fail(f"unknown pruner metric {spec.prune_metric!r}; choose one of {', '.join(PRUNE_METRICS)}")
    spec.report_every = pruner.pop("report_every", 50)
    if not is_integer(spec.report_every) or spec.report_every < 1:
        fail(f"[pruner] report_every must be a positive integer, got {spec.report_every!r}")
    spec.pruner_args = pruner
    target = spec.target
    if not target.can_prune and spec.pruner != "none":
        fail(f"objective {target.name} cannot prune (Optuna does not prune multi-objective trials): "
             "set [pruner] name = \"none\"")
    for needed in target.needs_search:
        if needed not in search:
            fail(f"objective {target.name} needs {needed} in [search]")
    if spec.seeds > 1 and {"seed", "data_seed"} & set(search):
        fail("[study] seeds trains every trial with its own seeds: do not also search seed or data_seed")
    if spec.seeds > 1:  # seed k trains (seed + k, data_seed + k): the last one must still be a valid config
        last = {"seed": base.seed + spec.seeds - 1, "data_seed": base.data_seed + spec.seeds - 1}
        try:
            base.replace(**last)
        except ConfigError as exc:
            fail(f"[study] seeds = {spec.seeds} trains seeds up to seed={last['seed']}, data_seed={last['data_seed']}: "
                 f"{exc}")
    if "comprehension_delay" in phases:
        spec.comprehension_delay = phases["comprehension_delay"]
        if not is_integer(spec.comprehension_delay) or spec.comprehension_delay < 0:
            fail(f"[phases] comprehension_delay must be a non-negative integer (steps), got {spec.comprehension_delay!r}")
    if spec.sampler != "grid":
        with_values = [p.name for p in spec.params if p.values is not None]
        if with_values:
            fail(f"search parameter {with_values[0]}: `values` is the grid sampler's; with sampler {spec.sampler!r} "
                 "use low/high (and step) or choices")
    if spec.sampler in ("grid", "bruteforce"):  # samplers that enumerate the space: it must be finite and small
        sizes = [size for p in spec.params if (size := p.grid_size()) is not None]
        if math.prod(sizes) > MAX_GRID:
            fail(f"the {spec.sampler} sampler's space has {math.prod(sizes):,} points "
                 f"({' x '.join(map(str, sizes))}); at most {MAX_GRID:,}: coarsen `step` or list `values`")
    if spec.sampler == "grid":
        for param in spec.params:
            points = param.grid()
            if len(set(points)) != len(points):  # the grid would train the same point twice
                repeated = next(v for v in points if points.count(v) > 1)
                fail(f"search parameter {param.name}: the grid repeats the value {repeated!r}; list each value once")
    _check_corners(spec.params, base, fail)
    _dry_run(spec, fail)
    return spec


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


MAX_CORNERS = 4096
MAX_GRID = 100_000  # points of an enumerated search space (each one a trial): beyond it, a typo in `step`
MAX_LOCKSTEP = 64  # trials trained together in one process (study/lockstep.py); beyond it, a typo
MAX_SEEDS = 100  # trainings of one trial ([study] seeds), one after another; beyond it, a typo


def _merge_grid(spec: StudySpec, grid: Any, base: Config, fail) -> None:
    """``[sampler] search_space = { lr = [...] }``: the grid sampler's own grid replaces the [search] one, so its
    values are checked here as ``values`` in [search] are (numbers of the right kind, valid configs, unique);
    unchecked, a grid of invalid values failed every trial and the study still exited 0."""
    if spec.sampler != "grid":
        fail(f"[sampler] search_space is the grid sampler's; with sampler {spec.sampler!r} use [search]")
    if not isinstance(grid, dict):
        fail("[sampler] search_space must be a table of lists, such as { lr = [1e-3, 1e-2] }")
    names = [p.name for p in spec.params]
    if sorted(grid) != sorted(names):
        fail(f"[sampler] search_space must name exactly the [search] parameters ({', '.join(names)}), "
             f"got {', '.join(sorted(grid)) or 'none'}")
    for index, param in enumerate(spec.params):
        key = "choices" if param.type == "categorical" else "values"
        spec.params[index] = _parse_param(param.name, {"type": param.type, key: grid[param.name], "log": param.log}, base,
                                          lambda message: fail(f"[sampler] search_space: {message}"))


def _check_corners(params: list[Param], base: Config, fail) -> None:
    """Every combination of the search space's extremes must be a valid config: a space that reaches invalid
    configs would fail trials at run time (e.g. lr x weight_decay >= 1 at the top corner). A grid of listed values:
    every point (the first MAX_CORNERS)."""
    corners = [p.choices if p.type == "categorical" else [p.low, p.high] for p in params]
    if all(p.values is not None or p.type == "categorical" for p in params):  # a grid: its points, not its corners
        corners = [p.grid() for p in params]
    combinations = list(itertools.islice(itertools.product(*corners), MAX_CORNERS))
    for combination in combinations:
        values = {p.name: value for p, value in zip(params, combination)}
        try:
            base.replace(**values)
        except ConfigError as exc:
            where = ", ".join(f"{k}={v!r}" for k, v in values.items())
            fail(f"the search space reaches invalid configs ({where}): {exc}")


def _dry_run(spec: StudySpec, fail) -> None:
    """Build the sampler and pruner and ask, suggest, report and prune once on an in-memory study: wrong
    sampler or pruner arguments fail now, in one line, not in every trial of a worker."""
    sampler, pruner = make_sampler(spec), make_pruner(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.logging.disable_default_handler()
            try:
                study = optuna.create_study(sampler=sampler, pruner=pruner, directions=spec.directions)
                trial = study.ask()
                for param in spec.params:
                    param.suggest(trial)
                if len(spec.directions) == 1:
                    trial.report(1.0, spec.report_every)
                    trial.should_prune()
            finally:
                optuna.logging.enable_default_handler()
    except Exception as exc:  # noqa: BLE001 - whatever the arguments break, one line
        fail(f"sampler {spec.sampler!r} / pruner {spec.pruner!r} arguments do not work: "
             f"{type(exc).__name__}: {first_line(exc)}")


def _parse_param(name: str, body: Any, base: Config, fail) -> Param:
    if not isinstance(body, dict):
        fail(f"[search] {name} must be a table such as {{ type = \"float\", low = 0.1, high = 1.0 }}")
    extra = sorted(set(body) - _PARAM_KEYS)
    if extra:
        fail(f"unknown key(s) for search parameter {name}: {', '.join(extra)}; allowed: {', '.join(sorted(_PARAM_KEYS))}")
    kind = body.get("type", "categorical" if "choices" in body else "float")
    if kind not in ("float", "int", "categorical"):
        fail(f"search parameter {name}: unknown type {kind!r}; choose float, int or categorical")
    if not isinstance(body.get("log", False), bool):
        fail(f"search parameter {name}: `log` must be true or false, got {body['log']!r}")
    if "step" in body and (not is_number(body["step"]) or body["step"] <= 0):
        fail(f"search parameter {name}: `step` must be a positive number, got {body['step']!r}")
    param = Param(name, kind, log=body.get("log", False), step=body.get("step"), values=body.get("values"))
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
        if not is_number(low) or not is_number(high):
            fail(f"search parameter {name}: needs numeric `low` and `high`")
        if param.values is not None and not all(is_number(v) for v in param.values):
            fail(f"search parameter {name}: `values` must be numbers")
        if param.values is not None and kind == "int" and not all(is_integer(v) for v in param.values):
            fail(f"search parameter {name}: an int parameter's `values` must be integers")
        if kind == "int" and not (is_integer(low) and is_integer(high)):
            fail(f"search parameter {name}: an int range needs integer `low` and `high`, got {low!r}, {high!r}")
        if not (low < high or (param.values is not None and low == high)):  # a grid may hold one value
            fail(f"search parameter {name}: empty or inverted range (low {low} must be < high {high})")
        if param.log and low <= 0:
            fail(f"search parameter {name}: a log range needs low > 0, got {low}")
        if param.log and param.step is not None:
            fail(f"search parameter {name}: `step` and `log` cannot be combined")
        if param.values is not None and any(not low <= v <= high for v in param.values):
            fail(f"search parameter {name}: `values` must lie within [{low}, {high}]")
        param.low, param.high = low, high
        corners = [low, high] if param.values is None else [low, high, *param.values]  # every grid value
    for value in corners:
        try:
            base.replace(**{name: value})
        except ConfigError as exc:
            fail(f"search parameter {name}: value {value!r} is not a valid config: {exc}")
    return param


# ---------------------------------------------------------------------------------------------- optuna objects
def make_sampler(spec: StudySpec, salt: str | None = None) -> optuna.samplers.BaseSampler:
    """The spec's sampler. ``salt``: this worker's identity, mixed into the spec's seed. Every process that
    builds a sampler from the same seed draws the same sequence, so parallel workers would train the same
    trials (seen: a 2-worker TPE study ran its 5 random start-up trials twice each). Only the first worker of
    the invocation that created the study keeps the spec's seed (a one-worker study stays reproducible)."""
    cls = getattr(optuna.samplers, SAMPLERS[spec.sampler])
    args = dict(spec.sampler_args)
    if salt is not None and args.get("seed") is not None:
        args["seed"] = zlib.crc32(f"{args['seed']}:{salt}".encode())
    if spec.sampler == "grid":
        args.setdefault("search_space", {p.name: p.grid() for p in spec.params})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**args)
    except (TypeError, ValueError) as exc:
        raise StudyError(f"{Path(spec.path).name}: sampler {spec.sampler}: {short_error(exc)}") from None
    except ImportError as exc:
        raise StudyError(f"sampler {spec.sampler} needs a package that is not installed: "
                         f"{short_error(exc)}") from None


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    args = dict(spec.pruner_args)
    try:
        if spec.pruner == "patient":  # wraps another pruner: [pruner] wrapped = "median", patience = 3
            wrapped = str(args.pop("wrapped", "median"))
            if wrapped not in PRUNERS or wrapped in ("patient", "grokking"):
                raise ValueError(f"unknown wrapped pruner {wrapped!r}")
            inner = getattr(optuna.pruners, PRUNERS[wrapped])()
            return optuna.pruners.PatientPruner(inner, **args)
        if spec.pruner == "grokking":
            from .pruners import GrokkingPruner

            return GrokkingPruner(**args)
        return getattr(optuna.pruners, PRUNERS[spec.pruner])(**args)
    except (TypeError, ValueError) as exc:
        raise StudyError(f"{Path(spec.path).name}: pruner {spec.pruner}: {short_error(exc)}") from None

