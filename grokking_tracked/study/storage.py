"""The Optuna storage of a study: open it (SQLite by default, PostgreSQL for many machines), load or create the
study, and let Optuna's heartbeats fail and retry the trials of a worker that died."""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..tracking.redact import redact
from ..tracking.store import EMBEDDED_STORE_DIR, local_store_dir
from .spec import StudyError, StudySpec, make_pruner, make_sampler

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
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
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
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StudyError(f"cannot open the Optuna storage {redact(url)}: {message}") from None
    raise AssertionError("unreachable")


def _lost_schema_race(error: BaseException) -> bool:
    """A concurrent creator of the same tables got there first (duplicate type/table/key, or 'already exists')."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    text = str(error).lower()
    return isinstance(error, (IntegrityError, ProgrammingError, OperationalError)) and (
        "duplicate" in text or "already exists" in text or "unique constraint" in text)


def load_study(spec: StudySpec, storage, study_name: str, salt: str | None = None) -> optuna.Study:
    """Load the study, or create it; ``salt``: see ``make_sampler``."""
    return create_or_load_study(spec, storage, study_name, salt)[0]


def create_or_load_study(spec: StudySpec, storage, study_name: str,
                         salt: str | None = None) -> tuple[optuna.Study, bool]:
    """(the study, whether this call created it). Exactly one of several simultaneous callers creates it."""
    options = dict(study_name=study_name, storage=storage, pruner=make_pruner(spec), directions=spec.directions)
    try:
        try:
            return optuna.create_study(sampler=make_sampler(spec, salt), **options), True
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.create_study(sampler=make_sampler(spec, salt), load_if_exists=True, **options), False
    except ValueError as exc:  # e.g. the stored study has other directions
        raise StudyError(f"study {study_name!r}: {str(exc).splitlines()[0]}") from None


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
