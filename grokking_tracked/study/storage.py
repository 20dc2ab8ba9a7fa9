"""The Optuna storage of a study: open it (SQLite by default, PostgreSQL for many machines), load or create the
study, and let Optuna's heartbeats fail and retry the trials of a worker that died."""

from __future__ import annotations

import contextlib
import itertools
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..tracking.redact import redact
from ..tracking.store import EMBEDDED_STORE_DIR, local_store_dir, sqlite_database
from .spec import StudyError, StudySpec, make_pruner, make_sampler
from ..messages import short_error

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
DEFAULT_STORAGE_FILE = "optuna.db"  # beside the embedded MLflow store's database
SCHEMA_RACE_ATTEMPTS = 5


def default_storage(tracking_uri: str) -> str:
    """SQLite beside the MLflow store's database (``./mlruns/optuna.db`` for the embedded store, and for a remote
    tracking server too); resolving creates nothing."""
    store_dir = local_store_dir(tracking_uri) or Path(EMBEDDED_STORE_DIR)
    return f"sqlite:///{store_dir.resolve() / DEFAULT_STORAGE_FILE}"


def open_storage(url: str, spec: StudySpec,
                 on_stale_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats: a trial whose worker stops beating for ``grace_period`` seconds is failed,
    ``on_stale_trial`` is told (to close its MLflow run), and Optuna retries it up to ``max_retry`` times."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retry)

    def stale(study: optuna.Study, trial: FrozenTrial) -> None:
        try:
            if on_stale_trial is not None:
                on_stale_trial(study, trial)
        finally:
            retry(study, trial)

    kwargs: dict[str, Any] = dict(heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period,
                                  heartbeat_stale_trial_callback=stale)
    if database := sqlite_database(url):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # workers wait for the lock, not fail
    for attempt in range(SCHEMA_RACE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, **kwargs)
        except Exception as exc:  # noqa: BLE001 - driver errors of every kind become one line
            if attempt + 1 < SCHEMA_RACE_ATTEMPTS and _lost_schema_race(exc):
                # Several invocations opening a fresh database at once all run Optuna's CREATE TABLEs; on
                # PostgreSQL the losers fail with a duplicate key in pg_type. Once the winner has committed, a
                # second attempt finds the tables and creates nothing (seen with 4 simultaneous `study` commands).
                time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
                continue
            message = short_error(exc)
            raise StudyError(f"cannot open the Optuna storage {redact(url)}: {message}") from None
    raise AssertionError("unreachable")


def _lost_schema_race(error: BaseException) -> bool:
    """A concurrent creator of the same tables got there first (duplicate type/table/key, or 'already exists')."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    text = str(error).lower()
    return isinstance(error, (IntegrityError, ProgrammingError, OperationalError)) and (
        "duplicate" in text or "already exists" in text or "unique constraint" in text)


def load_study(spec: StudySpec, storage, study_name: str, salt: str | None = None) -> optuna.Study:
    """Load the study, or create it (a worker: its invocation queued a grid's points); ``salt``: see
    ``make_sampler``."""
    return create_or_load_study(spec, storage, study_name, salt, queue=False)[0]


def create_or_load_study(spec: StudySpec, storage, study_name: str, salt: str | None = None,
                         queue: bool = True) -> tuple[optuna.Study, bool]:
    """(the study, whether this call created it). Exactly one of several simultaneous callers creates it.

    A stored study whose search space conflicts with the spec's is one StudyError (else every trial would fail in
    ``suggest``). A grid study's points are queued here (``enqueue_grid``), once per invocation (``queue``)."""
    options = dict(study_name=study_name, storage=storage, pruner=make_pruner(spec), directions=spec.directions)
    # a grid study trains only queued points (see enqueue_grid): its sampler is never asked for a value, and
    # GridSampler would assign (and warn about) a point to a trial that gets none
    sampler = (lambda: optuna.samplers.RandomSampler()) if spec.sampler == "grid" else \
        (lambda: make_sampler(spec, salt))
    try:
        try:
            study, created = optuna.create_study(sampler=sampler(), **options), True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.create_study(sampler=sampler(), load_if_exists=True, **options)
            created = False
    except ValueError as exc:  # e.g. the stored study has other directions
        raise StudyError(f"study {study_name!r}: {redact(short_error(exc))}") from None
    if not created:
        check_search_space(spec, study)
    if spec.sampler == "grid" and queue:
        enqueue_grid(spec, study)
    return study, created


def check_search_space(spec: StudySpec, study: optuna.Study) -> None:
    """The spec's parameters must be compatible with those the stored trials were sampled from (same kind:
    float, int or categorical with the same choices): Optuna refuses the others in ``suggest``, failing every
    trial. A changed range of the same kind is allowed (Optuna's dynamic search spaces)."""
    wanted = spec_distributions(spec)
    for trial in study.get_trials(deepcopy=False):
        for name, stored in trial.distributions.items():
            if name in wanted:
                try:
                    optuna.distributions.check_distribution_compatibility(stored, wanted[name])
                except ValueError as exc:
                    raise StudyError(
                        f"study {study.study_name!r} exists with another search space for {name} ({stored} in trial "
                        f"{trial.number}; the spec has {wanted[name]}): {short_error(exc)}; give the study "
                        f"another name (--study-name)") from None


def spec_distributions(spec: StudySpec) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distributions of the spec's parameters, as a trial of it would record them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(0)).ask()
        for param in spec.params:
            param.suggest(trial)
    return dict(trial.distributions)


# ---------------------------------------------------------------------------------------------- grid studies
# Optuna's GridSampler repeats points across workers by design (optuna #2039, #4627): a worker that asks while
# every point is running or done re-evaluates one, and two workers asking at once may pick the same point. A grid
# study instead queues each point as a WAITING trial (``enqueue_trial``, its point stored with it from its
# creation), which Optuna hands to exactly one worker (``_pop_waiting_trial_id``: WAITING -> RUNNING is a
# compare-and-set in the storage). ``grid_point_problem`` ends, untrained, a trial that is not a queued point or
# whose point another live trial holds already.
GRID_SURPLUS = "surplus: no grid point left (every point is queued, running or done)"


def grid_points(spec: StudySpec) -> list[dict]:
    names = [p.name for p in spec.params]
    return [dict(zip(names, values)) for values in itertools.product(*(p.grid() for p in spec.params))]


def point_of(trial: FrozenTrial, names: list[str]) -> tuple | None:
    """The grid point a trial holds from its creation (queued: ``fixed_params``; a retry: its params), or None."""
    fixed = {**trial.params, **trial.system_attrs.get("fixed_params", {})}
    if not all(name in fixed for name in names):
        return None
    return tuple(fixed[name] for name in names)


def enqueue_grid(spec: StudySpec, study: optuna.Study) -> int:
    """Queue every grid point that no trial holds or has finished (WAITING, RUNNING, COMPLETE, PRUNED): all of
    them when the study is new, the failed or new ones when it is resumed. Two invocations resuming at the same
    moment may queue a point twice; ``grid_point_problem`` lets only the first of the two train. Returns how
    many it queued."""
    names = [p.name for p in spec.params]
    live = {point_of(t, names) for t in study.get_trials(deepcopy=False, states=LIVE_STATES)}
    queued = 0
    for point in grid_points(spec):
        if tuple(point[name] for name in names) not in live:
            study.enqueue_trial(point)
            queued += 1
    return queued


LIVE_STATES = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)


def grid_point_problem(spec: StudySpec, study: optuna.Study, trial: optuna.Trial) -> str | None:
    """Why this trial of a grid study must not train (None: it may): it holds no queued point (the queue was
    empty when it was asked), or an earlier trial that has not failed holds the same point. Race-free: every
    trial's point is in the storage from the trial's creation, and trials are numbered in creation order."""
    names = [p.name for p in spec.params]
    trials = study.get_trials(deepcopy=False)
    this = next(t for t in trials if t.number == trial.number)
    point = point_of(this, names)
    if point is None:
        return GRID_SURPLUS
    for other in trials:
        if other.number < trial.number and other.state in LIVE_STATES and point_of(other, names) == point:
            return f"duplicate: trial {other.number} holds the same grid point"
    return None


def grid_queue_empty(study: optuna.Study) -> bool:
    return not study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


ROOM_POLL_SECONDS = 1.0


def room_for_trials(study: optuna.Study, n_trials: int, deadline: float | None = None) -> int:
    """How many more trials this worker may start so that ``n_trials`` finish (COMPLETE or PRUNED) across workers
    and invocations: ``n_trials - finished - running``. While the trials running elsewhere would make up the rest,
    wait (polling the storage, sweeping stale trials) until they end: one that fails leaves room again; once
    ``n_trials`` have finished, 0. A FAILed trial does not count (it is retried or replaced). ``deadline``: a
    ``time.monotonic()`` after which the wait gives up (0)."""
    while True:
        finished = count_finished(study)
        if finished >= n_trials:
            return 0
        room = n_trials - finished - len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if room > 0:
            return room
        if deadline is not None and time.monotonic() >= deadline:
            return 0
        time.sleep(ROOM_POLL_SECONDS)
        sweep_stale_trials(study)


def is_surplus(study: optuna.Study, trial_number: int, n_trials: int) -> bool:
    """True if the trial just asked would exceed ``n_trials``: the finished trials and the running ones asked
    before it (lower numbers) make ``n_trials`` already. Workers that asked at the same moment agree on which
    trials are surplus, since the storage numbers trials in order."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, *FINISHED_STATES))  # one storage read
    counted = [t for t in trials if t.state != TrialState.RUNNING or t.number < trial_number]
    return len(counted) >= n_trials


def sweep_stale_trials(study: optuna.Study) -> None:
    """Fail (and so retry) the trials whose worker stopped beating, now."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def retried_trial_number(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """The number of the failed trial this one retries (RetryFailedTrialCallback's public helper)."""
    frozen = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.number == trial.number), None)
    if frozen is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryFailedTrialCallback.retried_trial_number(frozen)


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial):
    """Beat for a trial run through ask/tell, as ``study.optimize`` does for its own trials.

    Optuna has no public API for this: ``optuna.storages._heartbeat.get_heartbeat_thread`` is the function
    ``optimize`` itself uses (checked against Optuna 5.0.0). It is the only Optuna internal this package uses."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": this is its ask/tell twin
        warnings.simplefilter("ignore", UserWarning)
        with get_heartbeat_thread(trial._trial_id, study._storage):
            yield
