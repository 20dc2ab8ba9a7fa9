"""Running a study: the parent run, one or many worker processes, and what each worker does.

Every worker loads the study from the shared storage and runs trials until N have finished; several invocations
of the same command (other terminals, other machines on PostgreSQL) join the same study and the same parent run.
A worker's entry (``worker_main``) is the only place here that changes process-wide state (signals, threads,
Optuna's verbosity), as the CLI is for the main process.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..tracking.redact import password_of, redact, remember
from ..tracking.runs import KILLED, ROLE_TAG, TrackedRun
from ..tracking.drawer import FigureDrawer
from ..train import THREADS_ENV, available_cores, check_runnable
from ..tracking.store import (LOCAL_UI, connect, is_remote, quote_filter_value, resolve_tracking_uri,
                                      runs_view_url, ui_base)
from .dashboard import DashboardNotes, annotate_study, run_page_url
from .lockstep import check_lockstep_spec, optimize_lockstep
from .report import finalize
from .spec import StudyError, StudySpec, load_spec
from .storage import (count_finished, create_or_load_study, default_storage, grid_queue_empty, load_study,
                      open_storage, room_for_trials, sweep_stale_trials)
from .trial import (FAIL_REASON_ATTR, STUDY_NAME_TAG, WORKER_ATTR, Objective, StudyContext,
                    close_stale_trial_run)
from ..messages import configure_logging, first_line

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # a study user attr: the study's parent run, found again by every worker
STUDY_ROLE = "study"
SPEC_ARTIFACT = "study_spec.toml"
MAX_CONSECUTIVE_FAILURES = 3
UNTRAINED_PREFIXES = ("surplus", "duplicate")  # fail reasons of trials that trained nothing by design
PARENT_WAIT_SECONDS = 60.0  # a joining invocation waits this long for the creator's parent run
PARENT_POLL_SECONDS = 0.5
BACKGROUND_WAIT_SECONDS = 300.0  # bounded: a worker stopping on Ctrl-C must not hang on a server that is away


@dataclass
class StudySettings:
    """What a worker needs to join a study; picklable, so spawned worker processes get it as is."""

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
    visible_device: str | None = None  # CUDA_VISIBLE_DEVICES of a worker that owns one GPU
    system_metrics: bool = False  # MLflow's system-metrics sampler on every trial's run
    sampler_salt: str | None = None  # this worker's identity for its sampler's seed (see make_sampler)


class FailureGuard:
    """Stops a worker after several consecutive FAILed trials (e.g. the tracking server went away) instead of
    failing forever: MaxTrialsCallback only counts finished trials."""

    def __init__(self):
        self.consecutive = 0
        self.tripped = False

    def __call__(self, study: optuna.Study, trial) -> None:
        if untrained(trial):  # a surplus or duplicate trial: no failure of training
            return
        self.consecutive = self.consecutive + 1 if trial.state == TrialState.FAIL else 0
        if self.consecutive >= MAX_CONSECUTIVE_FAILURES:
            self.tripped = True
            study.stop()


class StopAtNTrials:
    """Optuna's ``MaxTrialsCallback`` counts finished trials only, so two workers that each start a trial at N - 1
    finish N + 1. This callback also counts the trials running elsewhere: while they would make up N it waits for
    them (``room_for_trials``), then stops the worker once N have finished, or lets it go on if one failed."""

    def __init__(self, n_trials: int, deadline: float | None, grid: bool = False):
        self.n_trials, self.deadline, self.grid = n_trials, deadline, grid

    def __call__(self, study: optuna.Study, trial) -> None:
        if (self.grid and grid_queue_empty(study)) or room_for_trials(study, self.n_trials, self.deadline) == 0:
            study.stop()


def untrained(trial) -> bool:
    """A trial that trained nothing by design: surplus to --n-trials, or a grid point held by another trial."""
    return str(trial.user_attrs.get(FAIL_REASON_ATTR, "")).startswith(UNTRAINED_PREFIXES)


@contextlib.contextmanager
def one_line_trial_failures():
    """While trials run here: Optuna's "Trial N failed ... because of the following error" warning without its
    traceback (a failed trial's reason is on its run and in its user attrs; a traceback on the terminal reads as
    a crash of the command), and without the "failed with value None" line after it. Restored afterwards."""

    def one_line(record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return not record.getMessage().endswith("failed with value None.")

    logger = logging.getLogger("optuna.study._optimize")
    logger.addFilter(one_line)
    try:
        yield
    finally:
        logger.removeFilter(one_line)


class TrialLine:
    """One line per finished trial (number, value or state, MLflow run), instead of Optuna's log lines."""

    def __init__(self, echo):
        self.echo = echo

    def __call__(self, study: optuna.Study, trial) -> None:
        outcome = (f"value {', '.join(f'{v:g}' for v in trial.values)}" if trial.state == TrialState.COMPLETE
                   else trial.state.name)
        if trial.state == TrialState.FAIL and trial.user_attrs.get(FAIL_REASON_ATTR):  # why, in one line
            outcome += f": {first_line(trial.user_attrs[FAIL_REASON_ATTR], 200)}"
        run_id = trial.user_attrs.get("mlflow_run_id", "-")
        self.echo(f"trial {trial.number}: {outcome} (MLflow run {run_id})")


def optimize(settings: StudySettings, client=None, echo=print, drawer: FigureDrawer | None = None) -> None:
    """One worker: run trials of the shared study until ``settings.n_trials`` have finished.

    ``drawer``: the caller's figure process; the caller then waits for the trials' background work (figures, final
    statuses) and closes it (``finish_background``). By default the worker has its own and does that itself."""
    spec = load_spec(settings.spec_path)
    own_drawer = drawer is None
    drawer = drawer or FigureDrawer()
    drawer.start()  # its imports overlap with opening the stores and the first trial
    guard = FailureGuard()
    try:
        client = client or connect(settings.tracking_uri)
        storage = open_storage(settings.storage, spec, on_stale_trial=lambda study, trial: close_stale_trial_run(
            client, trial, "heartbeat stale: its worker stopped"))
        study = load_study(spec, storage, settings.study_name, salt=settings.sampler_salt)
        sweep_stale_trials(study)
        deadline = time.monotonic() + settings.timeout if settings.timeout else None
        if room_for_trials(study, settings.n_trials, deadline) == 0:
            return
        context = StudyContext(spec, settings.study_name, settings.experiment, settings.parent_run_id, client,
                               progress=settings.progress, threads=settings.threads, drawer=drawer,
                               notes=DashboardNotes(settings.storage, settings.study_name, side=drawer),
                               system_metrics=settings.system_metrics, n_trials=settings.n_trials)
        grid = spec.sampler == "grid"
        if grid and grid_queue_empty(study):
            return  # every grid point is running or done
        with one_line_trial_failures():
            if settings.lockstep > 1:
                optimize_lockstep(study, context, settings.lockstep, settings.n_trials, settings.timeout)
                return
            study.optimize(Objective(context), timeout=settings.timeout, catch=(Exception,),
                           callbacks=[guard, TrialLine(echo), StopAtNTrials(settings.n_trials, deadline, grid)])
    finally:  # the last trials' figures and final status, still on their way; the figure process in every case
        if own_drawer:
            finish_background(drawer)
    if guard.tripped:
        failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        reason = failed[-1].user_attrs.get("fail_reason") or failed[-1].system_attrs.get("fail_reason", "") \
            if failed else ""
        raise StudyError(f"{MAX_CONSECUTIVE_FAILURES} trials in a row failed; stopping "
                         f"({first_line(reason) or 'see the FAILED runs in MLflow'})")


def finish_background(drawer: FigureDrawer) -> None:
    """Wait (bounded) for the runs' work still on its way -- figures being drawn, final statuses -- and close the
    figure process."""
    try:
        TrackedRun.wait_for_background(timeout=BACKGROUND_WAIT_SECONDS)
    finally:
        drawer.close()


def worker_main(settings: StudySettings) -> None:
    """Entry of a spawned worker process: its process-wide settings, then ``optimize``."""

    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl-C reaches the whole process group; the parent answers it by terminating us (SIGTERM). Reacting to
    # both, a worker was interrupted while still failing its trial, leaving it RUNNING.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if settings.visible_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = settings.visible_device  # before the first CUDA call
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for uri in (settings.storage, settings.tracking_uri):  # as cli.main does: a library's message may quote them
        remember(password_of(uri))
    configure_logging(redact)
    try:
        optimize(settings, echo=lambda line: print(line, flush=True))
    except (StudyError, KeyboardInterrupt, SystemExit) as exc:
        if str(exc):
            print(f"grokking-tracked worker {os.getpid()}: {redact(str(exc))}", flush=True)
        raise SystemExit(1)
    finally:
        gc.freeze()  # as cli.skip_final_collection: the exit's collections would walk every live object (1-3 s)


def resolve_workers(workers: int | str, spec: StudySpec, lockstep: int) -> tuple[int, list[str | None]]:
    """``auto``: one single-threaded worker per CPU core, or one per GPU (a lockstep study: one per device).
    Returns the count and each worker's CUDA_VISIBLE_DEVICES (None: unchanged)."""
    import torch

    device = spec.base_config().device
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") and torch.cuda.is_available() else 0
    if workers == "auto":
        count = gpus or (1 if lockstep > 1 else available_cores())  # a lockstep stack owns its device
    else:
        count = int(workers)
        if count < 1:
            raise StudyError(f"--workers must be >= 1 or 'auto', got {workers}")
    visible = [str(i % gpus) for i in range(count)] if gpus > 1 else [None] * count
    return count, visible


def open_parent_run(client, experiment: str, study: optuna.Study, spec: StudySpec, storage_url: str,
                    created: bool = True, wait_seconds: float = PARENT_WAIT_SECONDS) -> TrackedRun:
    """One MLflow parent run per study, found again on every later invocation (also from other machines).

    Only the invocation that created the study creates the parent run. One that joins a study without a parent
    run yet waits (polling the study's user attr, which the creator sets right after creating the run) up to
    ``wait_seconds``, then creates it itself (the creator died): simultaneous invocations made one parent each."""
    run_id = _find_parent_run(client, experiment, study)
    deadline = time.monotonic() + (0.0 if created else wait_seconds)
    while run_id is None and time.monotonic() < deadline:
        time.sleep(PARENT_POLL_SECONDS)
        run_id = _find_parent_run(client, experiment, study)
    if run_id:
        return TrackedRun.reopen(client, run_id, leased=False)  # every invocation joining the study writes it
    tags = {STUDY_NAME_TAG: study.study_name, ROLE_TAG: STUDY_ROLE, "optuna.storage": redact(storage_url),
            "optuna.sampler": spec.sampler, "optuna.pruner": spec.pruner, "optuna.objective": spec.objective,
            "grokking_tracked.spec": spec.path, "grokking_tracked.preset": spec.preset}
    parent = TrackedRun.create(client, experiment, run_name=f"study-{study.study_name}", tags=tags,
                               artifacts={SPEC_ARTIFACT: spec.text}, leased=False)
    study.set_user_attr(PARENT_RUN_ATTR, parent.run_id)
    return parent


def _find_parent_run(client, experiment: str, study: optuna.Study) -> str | None:
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id:
        try:
            client.get_run(run_id)
            return run_id
        except Exception:  # noqa: BLE001 - deleted or from another server: look it up by tags instead
            pass
    experiment_obj = client.get_experiment_by_name(experiment)
    found = client.search_runs(
        [experiment_obj.experiment_id], f"tags.`{STUDY_NAME_TAG}` = {quote_filter_value(study.study_name)} and "
                                        f"tags.`{ROLE_TAG}` = '{STUDY_ROLE}'",
        order_by=["attributes.start_time ASC"], max_results=1) if experiment_obj else []
    return found[0].info.run_id if found else None


def run_study(spec_path: str, n_trials: int | None = None, timeout: float | None = None, storage: str | None = None,
              study_name: str | None = None, workers: int | str = "auto", tracking_uri: str | None = None,
              experiment: str | None = None, progress: bool = True, lockstep: int | None = None,
              system_metrics: bool = False, echo=print) -> dict:
    """Run (or resume, or join) a study; returns a summary dict."""
    spec = load_spec(spec_path)
    if n_trials is not None and n_trials < 0:
        raise StudyError(f"--n-trials must be >= 0, got {n_trials}")
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        raise StudyError(f"--timeout must be a positive number of seconds, got {timeout}")
    check_runnable(spec.base_config())  # the device exists and the task fits in memory
    lockstep = spec.lockstep if lockstep is None else lockstep
    if lockstep < 1:
        raise StudyError(f"--lockstep must be >= 1 (trials trained together; 1 = one at a time), got {lockstep}")
    if lockstep > 1:
        if spec.seeds > 1:
            raise StudyError("[study] seeds trains a trial's seeds one after another: not with --lockstep")
        check_lockstep_spec(spec)
        if system_metrics:
            raise StudyError("--system-metrics samples one process per run: not with --lockstep (K runs, one process)")
    n_workers, visible = resolve_workers(workers, spec, lockstep)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    experiment = experiment or spec.experiment
    study_name = study_name or spec.name
    n_trials = spec.n_trials if n_trials is None else n_trials
    storage = storage or default_storage(tracking_uri)
    # the invocation's figure process: the study's dashboard note, and with one worker that worker's trials'
    # figures and notes; it starts now, so its imports overlap opening the stores
    drawer = FigureDrawer()
    drawer.start()
    try:
        client = connect(tracking_uri)  # both fail fast, before anything is created
        rdb = open_storage(storage, spec, on_stale_trial=lambda study, trial: close_stale_trial_run(
            client, trial, "heartbeat stale: its worker stopped"))
        study, created = create_or_load_study(spec, rdb, study_name)
        # the first worker of the invocation that created the study keeps the spec's seed; every other worker
        # (other indices, other invocations, later resumptions) draws its own sequence
        invocation = f"{socket.gethostname()}:{os.getpid()}"
        salts = [None if created and index == 0 else f"{invocation}:{index}" for index in range(n_workers)]
        with open_parent_run(client, experiment, study, spec, storage, created=created) as parent:
            annotate_study(study, spec, parent.run_id, run_page_url(tracking_uri, parent.experiment_id, parent.run_id),
                           runs_view_url(client, parent.experiment_id, ui_base(tracking_uri)),
                           notes=DashboardNotes(storage, study_name, side=drawer))
            echo(f"study {study_name!r}: storage {redact(storage)}, MLflow parent run {parent.run_id} "
                 f"in experiment {experiment!r}; {count_finished(study)}/{n_trials} trials finished")
            settings = StudySettings(str(Path(spec_path).resolve()), n_trials, storage, study_name, tracking_uri,
                                     experiment, parent.run_id, timeout, progress=progress and n_workers == 1,
                                     lockstep=lockstep, system_metrics=system_metrics)
            before = {t.number: t.state for t in study.get_trials(deepcopy=False)}
            if n_trials > count_finished(study):
                run_workers(settings, n_workers, visible, echo, salts, client, drawer, study)
            # the parent run's figures are drawn here while the last trials' are still drawn in the figure process
            summary = finalize(study, spec, parent, rdb.grace_period or 0, rdb.heartbeat_interval or 0)
            check_some_trial_trained(study, before)  # else the parent run ends FAILED and the command with 1
    finally:
        finish_background(drawer)
    summary["runs_url"] = runs_view_url(client, parent.experiment_id, None if is_remote(tracking_uri) else LOCAL_UI)
    return summary


def check_some_trial_trained(study: optuna.Study, before: dict) -> None:
    """A StudyError if every trial this invocation ended failed (none COMPLETE or PRUNED; surplus and duplicate
    trials aside): a study of only failing trials must not exit 0 (seen: 0 of 2 trials complete, exit 0)."""
    ended = [t for t in study.get_trials(deepcopy=False)
             if t.state.is_finished() and before.get(t.number) != t.state and not untrained(t)]
    failed = [t for t in ended if t.state == TrialState.FAIL]
    if failed and len(failed) == len(ended):
        last = failed[-1]
        reason = str(last.user_attrs.get(FAIL_REASON_ATTR) or last.system_attrs.get("fail_reason") or "")
        reason = first_line(reason) or "see the FAILED runs in MLflow"
        raise StudyError(f"every trial failed ({len(failed)} of {len(ended)}); trial {last.number}: {redact(reason)}")


def fail_interrupted_trials(study: optuna.Study, client, workers: set[str]) -> None:
    """After an interrupt: the trials still RUNNING in these worker processes (``host:pid``) end FAIL in Optuna
    and their runs KILLED. A worker stopped between its training and Optuna's ``tell``, or while Optuna
    handled its exception, left its trial RUNNING until its heartbeat went stale."""
    try:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get(WORKER_ATTR) in workers:
                close_stale_trial_run(client, trial, "interrupted (Ctrl-C or SIGTERM)", status=KILLED)
                study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    except Exception:  # noqa: BLE001 - the storage is away: the trials' heartbeats fail them later
        pass


def run_workers(settings: StudySettings, workers: int, visible: list[str | None], echo, salts: list[str | None],
                client, drawer: FigureDrawer, study: optuna.Study | None = None) -> None:
    """Worker 0 is this process, with its client and figure process: it has loaded torch, TransformerLens and
    mlflow and opened the stores already, which a spawned worker does again (~7 CPU s here). Workers 1.. are
    spawned processes; one that fails does not stop the others, nor does this one's ``StudyError``."""
    # a worker per core, one thread each; $GROKKING_TORCH_THREADS, when set, wins (Trainer's default: 1 thread)
    threads = None if os.environ.get(THREADS_ENV) else max(1, available_cores() // workers)
    # worker 0 trains on the default device, cuda:0 where there are GPUs: visible[0] is "0" or None
    here = replace(settings, threads=threads if workers > 1 else settings.threads, sampler_salt=salts[0])
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker_main, name=f"study-worker-{i}",
                                 args=(replace(settings, threads=threads, visible_device=visible[i],
                                               sampler_salt=salts[i]),))
                 for i in range(1, workers)]
    for process in processes:
        process.start()
    if processes:
        echo(f"{workers} workers started (this process, {os.getpid()}, and pids "
             f"{', '.join(str(p.pid) for p in processes)}), {threads or os.environ[THREADS_ENV]} torch thread(s) each")
    failure = None
    try:
        try:
            optimize(here, client=client, echo=echo, drawer=drawer)
        except StudyError as exc:
            if not processes:
                raise
            failure = exc
            echo(f"grokking-tracked worker {os.getpid()}: {exc}")
        for process in processes:
            process.join()
    except BaseException:
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: the worker's run ends KILLED, its trial FAIL
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join(5)
        if study is not None:
            host = socket.gethostname()
            fail_interrupted_trials(study, client, {f"{host}:{pid}" for pid in
                                                    (os.getpid(), *(p.pid for p in processes))})
        raise
    failed = [p for p in processes if p.exitcode not in (0, None)]
    if failure is not None and len(failed) == len(processes):
        raise StudyError(f"all {workers} workers failed (this one: {failure}; exit codes of the others: "
                         f"{', '.join(str(p.exitcode) for p in failed)})")
