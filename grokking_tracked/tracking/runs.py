"""The life cycle of every MLflow run we write: open (create or reopen), send, end. One place.

A plain run, a resumed run, a study trial, a lockstep member and a study's parent run are all a
``TrackedRun``: a context manager that creates the run (one synchronous request: the id is needed), sends
everything else through the run's durable ``Outbox`` (ordered, spooled to disk, retried through outages),
holds the run's lease while it is open, and always ends it with the status that matches how the block ended
(FINISHED; KILLED for Ctrl-C, SIGTERM or a deliberate stop; FAILED for an error). The final status is the last
entry of the outbox, so a run is never reported finished before its data is on the server.
"""

from __future__ import annotations

import logging
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from ..config import Config
from ..config import TrainingStopped
from .delivery.lease import LEASE_TAG, LeaseKeeper, lease_state, lease_value, this_host
from .artifacts import checked
from .delivery.outage import is_transient
from .delivery.outbox import BACKOFF_MAX_S, BACKOFF_START_S, TERMINATE_WAIT_SECONDS, Outbox, deliver_spool, terminate_within
from .provenance import context_tags, dataset_inputs, default_run_name
from .redact import redact, redact_values, without_userinfo
from .delivery.spool import SpoolDelivery, run_spool_dir, spool_root_for, spooled_entries, writer_dirs
from .artifacts import check_artifact_location
from .store import TrackingError, ensure_experiment, get_run
from ..messages import short_error

RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
PARENT_RUN_TAG = "mlflow.parentRunId"
TASK_TAG = "grokking_tracked.task"
PRESET_TAG = "grokking_tracked.preset"
ROLE_TAG = "grokking_tracked.role"  # "trial" or "study" for a study's runs
CONFIG_ARTIFACT = "config.json"
EVENTS_ARTIFACT = "events.json"
DELIVERY_WAIT_ENV = "GROKKING_TRACKED_DELIVERY_WAIT"
DELIVERY_WAIT_SECONDS = 120.0  # how long ending a run waits for the server to take what it still has to send
INTERRUPTED_WAIT_SECONDS = 10.0
PROGRESS_EVERY_SECONDS = 10.0


class TrackingUndelivered(TrackingError):
    """The server stayed away when a run ended: its data is safe in the spool, not yet on the server."""


def delivery_wait() -> float:
    """Seconds the end of a run waits for delivery: $GROKKING_TRACKED_DELIVERY_WAIT, else 120."""
    value = os.environ.get(DELIVERY_WAIT_ENV)
    try:
        return float(value) if value else DELIVERY_WAIT_SECONDS
    except ValueError:
        raise TrackingError(f"{DELIVERY_WAIT_ENV} must be a number of seconds, got {value!r}") from None


def _stderr_line(line: str) -> None:
    """The default echo: a log line (the CLI shows it on stderr as ``grokking-tracked: <line>``)."""
    logging.getLogger(__name__).warning(line)


MISSING_FILES_TAG = "grokking_tracked.missing.{path}"  # files a run lacks, and why (e.g. figures: interrupted)
_BACKGROUND: list[threading.Thread] = []  # runs finishing in the background (TrackedRun.end(background=True))




def status_for(error: BaseException | None) -> str:
    """FINISHED without an error; KILLED for interruptions (Ctrl-C, SIGTERM, a deliberate stop), else FAILED."""
    if error is None:
        return FINISHED
    if isinstance(error, (KeyboardInterrupt, SystemExit, TrainingStopped)):
        return KILLED
    return FAILED


def metrics_at(values: dict[str, float], step: int) -> list[Metric]:
    """MLflow metrics of one step, timestamped now (None values are skipped)."""
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for key, value in values.items() if value is not None]


def config_params(config: Config) -> list[Param]:
    return [Param(key, redact(str(value))) for key, value in config.to_dict().items()]


def deliver_leftovers(client: MlflowClient, timeout: float, echo: Callable[[str], None] | None = None,
                      report: SpoolDelivery | None = None) -> SpoolDelivery:
    """``grokking-tracked sync``: deliver every spool that dead writers left for this tracking store (runs that
    ended while the server was away, processes that were killed); returns the ``SpoolDelivery`` report (``report``:
    added to, so another thread can read how far it got).

    A run whose artifact location the server names where we must not write (``artifacts.check_artifact_location``)
    gets nothing delivered: its spool stays, it is ended FAILED unless a live process still writes it, and the
    refusal is the report's first failure. A run the server does not answer for (away, stalling) until ``timeout``
    keeps its spool, counted pending."""
    client = checked(client)
    root = spool_root_for(client.tracking_uri)
    report = SpoolDelivery() if report is None else report
    if not root.is_dir():
        return report
    timeout_at = time.monotonic() + timeout
    for run_id in dict.fromkeys(run_id for _, run_id in writer_dirs(root)):
        run_dir = run_spool_dir(root, run_id)
        if not _answers_for(client, run_id, timeout_at):  # away until the deadline: the spool waits for it
            report.pending += spooled_entries(run_dir)
            continue
        try:
            client.artifact_repository(run_id)
        except TrackingError as refusal:
            report.failed.append(str(refusal))
            _fail_unless_written(client, root, run_id)
            continue
        deliver_spool(client, run_dir, timeout=max(0.0, timeout_at - time.monotonic()), echo=echo or _stderr_line,
                      report=report)
    return report


def _answers_for(client: MlflowClient, run_id: str, deadline: float) -> bool:
    """Whether the server answers a look-up of ``run_id`` before ``deadline`` (monotonic), retried with back-off
    while it is away. Its answer may be a refusal ("no such run"): the caller's next look-up words that. An outage
    is never reported as "no such run"."""
    backoff = BACKOFF_START_S
    while time.monotonic() < deadline:
        try:
            client.get_run(run_id)
            return True
        except Exception as error:  # noqa: BLE001 - classified: only an outage is retried
            if not is_transient(error):
                return True
        time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
        backoff = min(backoff * 2, BACKOFF_MAX_S)
    return False


class SyncTimedOut(TrackingError):
    """``sync`` ran out of its ``--timeout``: what is not delivered stays in the spool."""


SYNC_GRACE_SECONDS = 2.0  # after --timeout: for a delivery cut at its deadline to close and count what it did


def sync(tracking_uri: str | None, timeout: float, echo: Callable[[str], None] | None = None) -> SpoolDelivery:
    """``grokking-tracked sync`` bounded as a whole: connecting, every run look-up and every delivery happen in a
    worker thread given ``timeout`` seconds (and a short grace to count what it did); past that ``SyncTimedOut``
    says so, with what was delivered by then, and the process exits (the spool stays consistent: entries are
    renamed in and deleted only once delivered, and re-sending is safe)."""
    from .store import connect, resolve_tracking_uri

    report, outcome = SpoolDelivery(), []

    def work() -> None:
        try:
            outcome.append(deliver_leftovers(connect(tracking_uri), timeout, echo=echo, report=report))
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            outcome.append(error)

    worker = threading.Thread(target=work, name="sync", daemon=True)
    worker.start()
    worker.join(timeout + SYNC_GRACE_SECONDS)
    if not outcome:
        uri = resolve_tracking_uri(tracking_uri)
        raise SyncTimedOut(f"sync timed out after {timeout:g} s (the tracking server at {without_userinfo(uri)} did "
                           f"not answer in time); {report.delivered_so_far()} operations delivered, the rest stays "
                           f"in {spool_root_for(uri)}: run `grokking-tracked sync` again")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _fail_unless_written(client: MlflowClient, root: Path, run_id: str) -> None:
    """End a RUNNING run FAILED if no live process writes it (its spool's writers are all dead): its data will
    not reach this server."""
    from .delivery.spool import Busy, lock_writer_dir

    for writer, _ in writer_dirs(run_spool_dir(root, run_id)):
        try:
            os.close(lock_writer_dir(writer))
        except Busy:
            return
    try:
        if client.get_run(run_id).info.status == RUNNING:
            client.set_terminated(run_id, FAILED)
    except Exception:  # noqa: BLE001 - a run the server does not know: nothing to end
        pass


def check_reopenable(client: MlflowClient, run_id: str, force: bool = False, leased: bool = True,
                     echo: Callable[[str], None] | None = None):
    """Before anyone continues a run (or reads its history to do so): deliver what a killed writer of it left in
    the local spool, so the server's history is complete; then refuse, in one line, a run whose lease is live
    (a process elsewhere is writing it), unless ``force``. Returns the run. The run's artifact location is
    checked first: nothing of it is delivered, read or written if the server names a forbidden one."""
    client = checked(client)
    client.artifact_repository(run_id)
    spool = run_spool_dir(spool_root_for(client.tracking_uri), run_id)
    if spool.is_dir():
        delivery = deliver_spool(client, spool, timeout=delivery_wait(), echo=echo or _stderr_line)
        if leased and delivery.busy and not force:
            try:
                writer = json.loads((delivery.busy[0] / "writer.json").read_text())
                holder = f"pid {writer['pid']} on {writer['host']}"
            except (OSError, ValueError, KeyError):
                holder = "a live process on this host"
            raise TrackingError(f"run {run_id} is still being written: {holder} holds its spool "
                                f"{delivery.busy[0]} (--force overrides)")
        if leased and delivery.pending:
            raise TrackingUndelivered(f"run {run_id} still has {delivery.pending} undelivered operations in "
                                      f"{spool}; run `grokking-tracked sync` when the server is back")
    run = get_run(client, run_id)
    if leased and not force:
        state = lease_state(run.data.tags.get(LEASE_TAG), this_host(), time.time())
        if state.live:
            raise TrackingError(f"run {run_id} is still being written: {state.reason} (--force overrides)")
    return run


class TrackedRun:
    """One MLflow run from open to end. Use ``TrackedRun.create``/``TrackedRun.reopen`` in a ``with`` block.

    ``echo``: where one-line notices go (the outbox's outage lines, the wait at the end); stderr by default.
    ``leased``: hold the run's lease (a study's parent run is written by every worker at once: not leased)."""

    def __init__(self, client: MlflowClient, run_id: str, echo: Callable[[str], None] | None = None,
                 leased: bool = True, experiment_id: str | None = None):
        self.client, self.run_id, self.experiment_id = checked(client), run_id, experiment_id
        self.echo = echo or _stderr_line
        self.outbox = Outbox(client, run_id, echo=self.echo)
        self.lease = LeaseKeeper(self.outbox.set_tags) if leased else None
        if self.lease is not None:
            self.lease.start()
        self.status: str | None = None
        self.appends = False  # opened by ``append``: an ended run gets more data, its status is left alone
        self._terminated = False  # a status was set directly (past the outbox)
        self._closing_tags: dict[str, str] = {}  # the tags given to ``end``: set with a status set directly
        self._interrupted_tags: dict[str, str] | None = None  # instead of those, when an interrupt ends the run
        self._later: list[tuple[Future, str]] = []

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, client: MlflowClient, experiment: str, *, run_name: str | None = None,
               tags: dict[str, str] | None = None, params: Iterable[Param] = (),
               artifacts: dict[str, Any] | None = None, parent_run_id: str | None = None,
               echo: Callable[[str], None] | None = None, leased: bool = True) -> "TrackedRun":
        """A new RUNNING run: one request creates it with its tags and lease; its params and opening JSON/text
        artifacts follow through the outbox. If queueing them fails, the run ends FAILED (KILLED on Ctrl-C).

        The artifact location is checked in create_run's answer and again in the server's ``get_run`` (the one
        MLflow's transfers would use): the checked repository is the only one this run's writes ever use. A
        refused location ends the new run FAILED. Every tag and param value is redacted (``redact``)."""
        client = checked(client)
        tags = redact_values({**context_tags(), **(tags or {}),
                              **({LEASE_TAG: lease_value(time.time())} if leased else {})})
        if parent_run_id:
            tags[PARENT_RUN_TAG] = parent_run_id
        experiment_id = ensure_experiment(client, experiment)
        run = client.create_run(experiment_id, run_name=run_name and redact(run_name), tags=tags)
        try:
            check_artifact_location(client.tracking_uri, run.info.artifact_uri, run.info.run_id)
            client.artifact_repository(run.info.run_id)
            tracked = cls(client, run.info.run_id, echo, leased, experiment_id)  # its spool may be unusable
        except BaseException as error:  # nothing queued yet: end the new run directly, never leave it RUNNING
            client.set_terminated(run.info.run_id, status_for(error))
            raise
        try:
            params = list(params)
            if params:
                tracked.outbox.log_batch(params=redact_values({p.key: p.value for p in params}))
            for name, value in (artifacts or {}).items():
                if isinstance(value, str):
                    tracked.log_text(value, name)
                else:
                    tracked.log_dict(value, name)
        except BaseException as error:
            tracked.end(status_for(error))
            raise
        return tracked

    @classmethod
    def create_for_config(cls, client: MlflowClient, config: Config, experiment: str, *, run_name: str | None = None,
                          tags: dict[str, str] | None = None, parent_run_id: str | None = None,
                          echo: Callable[[str], None] | None = None) -> "TrackedRun":
        """A training run: the config as params and ``config.json``, an empty ``events.json``, the split as
        dataset inputs; named after its task and hyperparameters unless ``run_name`` says otherwise."""
        from ..data import make_dataset
        from ..groups import CONFIG_GROUP_TAG, config_group

        # the config without its seeds: the runs view's "Group by" this tag aggregates a configuration's seeds
        tags = {TASK_TAG: f"{config.operation} mod {config.p}", CONFIG_GROUP_TAG: config_group(config), **(tags or {})}
        run = cls.create(client, experiment, run_name=run_name or default_run_name(config, tags.get(PRESET_TAG)),
                         tags=tags, params=config_params(config),
                         artifacts={CONFIG_ARTIFACT: config.to_dict(), EVENTS_ARTIFACT: []},
                         parent_run_id=parent_run_id, echo=echo)
        try:
            run.outbox.log_inputs(dataset_inputs(config, make_dataset(config)))
        except BaseException as error:
            run.end(status_for(error))
            raise
        return run

    @classmethod
    def reopen(cls, client: MlflowClient, run_id: str, force: bool = False,
               echo: Callable[[str], None] | None = None, leased: bool = True) -> "TrackedRun":
        """An existing run continued (``--resume``, a study's parent on a later invocation): RUNNING again,
        after ``check_reopenable`` and, for a leased run, taking its lease."""
        client = checked(client)
        run = check_reopenable(client, run_id, force=force, leased=leased, echo=echo)
        if leased:
            client.set_tag(run_id, LEASE_TAG, lease_value(time.time()))  # taken now, not after a queue
        tracked = cls(client, run_id, echo, leased, run.info.experiment_id)
        tracked.outbox.set_status(RUNNING)
        return tracked

    @classmethod
    def append(cls, client: MlflowClient, run_id: str, echo: Callable[[str], None] | None = None) -> "TrackedRun":
        """More data for an existing run whose status stays as it is (``analyze``'s results, ``compare --log-to``):
        the same checked, spooled, ordered path as any write; ending it only delivers. Not leased: it adds new
        files and tags, it does not continue the run."""
        client = checked(client)
        client.artifact_repository(run_id)  # refused before anything is queued
        tracked = cls(client, run_id, echo, leased=False)
        tracked.appends = True
        return tracked

    # ------------------------------------------------------------------ sending
    def log_metrics(self, metrics: list[Metric]) -> None:
        self.outbox.log_batch(metrics=metrics)

    def log_values(self, values: dict[str, float], step: int) -> None:
        self.log_metrics(metrics_at(values, step))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.outbox.set_tags(redact_values(tags))

    def log_params(self, params: dict[str, Any]) -> None:
        self.outbox.log_batch(params=redact_values(params))

    def log_dict(self, value: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(value, indent=2), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.outbox.log_text(redact(text), artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        from ..figures import save_figure

        directory, _, name = artifact_file.rpartition("/")
        self.log_file(save_figure(figure, self.staging_path(name)), directory or None, move=True)

    def log_file(self, path: Path, artifact_path: str | None = None, move: bool = False) -> None:
        """Upload a file; ``move``: it was written into ``staging_path()`` and is handed over, else a copy is
        staged now (the caller may change or delete the file)."""
        if not move:
            staged = self.staging_path(Path(path).name)
            shutil.copyfile(path, staged)
            path, move = staged, True
        self.outbox.log_file(path, artifact_path, move=move)

    def log_directory(self, local: Path, artifact_path: str) -> None:
        """Every file under ``local`` as ``artifact_path/<its relative path>`` (copied now)."""
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                relative = path.parent.relative_to(local).as_posix()
                self.log_file(path, artifact_path if relative == "." else f"{artifact_path}/{relative}")

    def log_image(self, image, key: str, step: int) -> None:
        """An image with a step (the UI's step slider), in MLflow's own layout: MLflow's ``log_image`` writes it,
        its uploads and tag land in this run's outbox."""
        _OutboxWriter(self).log_image(self.run_id, image, key=key, step=step, synchronous=True)

    def deliver(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is on the server; True iff all of it was taken."""
        return self.outbox.wait(delivery_wait() if timeout is None else timeout)

    def staging_path(self, name: str) -> Path:
        """Where to write a file (a checkpoint, a figure) that ``log_file(..., move=True)`` will send."""
        return self.outbox.staging_path(name)

    def log_model(self, weights: dict, config: Config, step: int, reasons: list[str],
                  metrics: Iterable[Metric] = ()) -> None:
        """A model's weights (its state dict) as an MLflow LoggedModel of this run at ``step`` (tracking/models.py),
        through the outbox."""
        from .models import model_name, write_model_dir

        if self.experiment_id is None:
            self.experiment_id = get_run(self.client, self.run_id).info.experiment_id
        name = model_name(reasons, step)
        directory = write_model_dir(self.staging_path(name), weights, config)
        self.outbox.log_model(directory, name, self.experiment_id, step, reasons, metrics)

    def log_files_later(self, files: Future, artifact_path: str) -> None:
        """Files still being made elsewhere (figures drawn by a figure process): ``files`` resolves to their paths,
        which the run sends (moved in) before its final status."""
        self._later.append((files, artifact_path))

    # ------------------------------------------------------------------ ending
    def end(self, status: str, background: bool = False, tags: dict[str, str] | None = None,
            tags_if_interrupted: dict[str, str] | None = None) -> None:
        """Release the lease, queue the final status after everything else, and wait (a bounded time, with a
        progress line) until the server has it all; once only.

        If the server stays away, the data stays in the spool and ``TrackingUndelivered`` names it and the
        command that delivers it later -- unless the block already ended by an error, which is not hidden:
        the notice is printed instead. Ctrl-C while waiting stops waiting at once and marks the run KILLED.

        ``background`` (a study trial): return once everything sent so far is delivered, and let a thread wait for
        the files still being made, send them and the status (``wait_for_background`` joins those threads).
        ``tags``: queued before the status, and set with it if the status has to be set directly (an interrupt
        while delivering), so the run never ends without them; ``tags_if_interrupted`` replace them when an
        interrupt ends the run KILLED instead (a trial about to complete is failed by Optuna then)."""
        if self.status is not None:
            return
        self.status = status
        if tags:
            self._closing_tags = redact_values(tags)
            self.outbox.set_tags(self._closing_tags)
        if tags_if_interrupted is not None:
            self._interrupted_tags = redact_values(tags_if_interrupted)
        try:
            if self.lease is not None:
                self.lease.stop(release=True)
            if background and self._later and status == FINISHED:
                if self._deliver(status, final=False):
                    thread = threading.Thread(target=self._finish_quietly, args=(status,), daemon=True,
                                              name=f"finish-{self.run_id[:8]}")
                    _BACKGROUND.append(thread)
                    thread.start()
                    return
            self._finish(status)
        except TrackingUndelivered:
            raise  # its data is safe in the spool: RUNNING until `sync` delivers it (the README's promise)
        except BaseException as error:  # the spool refused a write (read-only, full disk), or a bug: the run
            self._end_directly(status, error)  # must not stay RUNNING with nothing left to end it
            raise

    def _end_directly(self, status: str, error: BaseException) -> None:
        """End the run on the server now, past its outbox (which could not take the status), and release the spool:
        what it holds stays there for ``sync``."""
        if not self.appends and not self._terminated:
            self._terminate_promptly(status_for(error) if status == FINISHED else status)
        self.outbox.close(timeout=1.0)

    def _finish(self, status: str) -> None:
        for files, artifact_path in self._later:
            try:
                for path in files.result():
                    self.log_file(path, artifact_path, move=True)
            except BaseException as error:  # noqa: BLE001 - a figure is a view of the data, not the data (and an
                # interrupted figure process re-raises its KeyboardInterrupt here, in a background thread)
                if not isinstance(error, Exception) and threading.current_thread() is threading.main_thread():
                    raise  # the user's own Ctrl-C
                self.echo(f"could not make {artifact_path}/ of run {self.run_id}: {short_error(error)}")
                self.set_tags({MISSING_FILES_TAG.format(path=artifact_path): short_error(error)[:250]})
        self._later.clear()
        if not self.appends:
            self.outbox.set_status(status)
        self._deliver(status, final=True)

    def _finish_quietly(self, status: str) -> None:
        try:
            self._finish(status)
        except Exception as error:  # noqa: BLE001 - nobody to raise to in a background thread: say it
            if not isinstance(error, TrackingUndelivered):  # (its data waits in the spool: RUNNING until sync)
                self._end_directly(status, error)
            self.echo(str(error))

    def _deliver(self, status: str, final: bool) -> bool:
        """Wait for what is queued; ``final``: the outbox is closed afterwards. True if all was delivered."""
        last_line = [0.0]

        def progress(pending: int, waited: float) -> None:
            if waited - last_line[0] >= PROGRESS_EVERY_SECONDS:
                last_line[0] = waited
                self.echo(f"waiting for the tracking server: {pending} operations of run {self.run_id} pending "
                          f"({waited:.0f} s)")

        # An interrupted or failed run waits briefly: Ctrl-C must end a run promptly even with the server away.
        budget = delivery_wait() if status == FINISHED else min(INTERRUPTED_WAIT_SECONDS, delivery_wait())
        try:
            delivered = self.outbox.wait(budget, progress)
        except BaseException:  # Ctrl-C (a second one, too) or SIGTERM while waiting: stop now, run KILLED
            self.outbox.close(timeout=1.0)
            self._terminate_promptly("KILLED", tags=self._interrupted_tags)
            self.echo(f"interrupted while delivering run {self.run_id}; what is left is in "
                      f"{self.outbox.spool_dir} (`grokking-tracked sync` delivers it)")
            raise
        if not final:  # the caller queues the rest and waits again
            return delivered
        pending, failures, stopped = self.outbox.pending, self.outbox.failures, self.outbox.stopped
        spool = self.outbox.spool_dir
        self.outbox.close()
        if delivered:
            return True
        if pending and stopped:  # not the server: delivery itself stopped (the spool refused a write, a bug)
            message = f"{failures[-1]}; `grokking-tracked sync` delivers it once that is fixed"
        elif pending:
            message = (f"the tracking server did not take run {self.run_id}'s last {pending} operations within "
                       f"{budget:.0f} s; they are safe in {spool}: run `grokking-tracked sync` "
                       f"(or `grokking-tracked run --resume {self.run_id}`) when it is back")
        else:
            message = f"run {self.run_id} did not deliver all its data: {failures[0]}"  # (refused, or the spool)
        if status == FINISHED:
            raise TrackingUndelivered(message)
        if not self.appends:
            self._terminate_promptly(status)
        self.echo(message)
        return False

    @staticmethod
    def wait_for_background(timeout: float | None = None) -> None:
        """Join the threads finishing runs in the background (a study worker calls this before it exits)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while _BACKGROUND:
            thread = _BACKGROUND.pop(0)
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _terminate_promptly(self, status: str, seconds: float = TERMINATE_WAIT_SECONDS,
                            tags: dict[str, str] | None = None) -> None:
        """Set a terminal status directly, with the closing tags (or ``tags``), giving up after ``seconds`` (the
        server may be why we stop)."""
        self._terminated = True
        terminate_within(self.client, self.run_id, status, seconds=seconds,
                         tags=self._closing_tags if tags is None else tags)

    def __enter__(self) -> "TrackedRun":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        self.end(status_for(error))
        return False


class _OutboxWriter(MlflowClient):
    """MLflow's own helpers (``log_image``: its file names, compression and tag) writing into a run's outbox: the
    two client methods they write through enqueue instead of sending."""

    def __init__(self, run: TrackedRun):
        super().__init__(run.client.tracking_uri)
        self.run = run

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        assert run_id == self.run.run_id
        self.run.log_file(Path(local_path), artifact_path)  # a copy: MLflow deletes its temporary file

    def set_tag(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> None:
        assert run_id == self.run.run_id
        self.run.set_tags({key: str(value)})
