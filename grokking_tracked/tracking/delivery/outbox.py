"""One ordered, durable outbox per writer of one MLflow run.

Every operation a run sends (metric batches, params, tags, small artifacts, files, the final status) is
first written to a local spool directory, then delivered IN ORDER by one background thread with a real
``MlflowClient``; a delivered entry is deleted. So the training loop never waits on the network, a server
outage of any length costs disk (not memory), and a process killed with SIGKILL leaves its spool (laid
out as spool.py describes) for ``deliver_spool`` (``grokking-tracked sync`` / ``--resume``).

Exactly once. A request that timed out client-side may still have landed, so everything is re-sent
safely: timestamps are fixed at enqueue time, and MLflow's SQL store de-duplicates metrics on their
primary key (run, key, timestamp, step, value, is_nan: ``SqlAlchemyStore._log_metrics_once`` catches the
IntegrityError and inserts only the missing rows; tested against a real server in tests/test_outbox.py).
Params of the same value, tags, artifact uploads (PUT) and status updates are idempotent.

Errors (classified in outage.py). What an outage looks like (no connection, reset, timeout, HTTP
502-599/408/429, any HTTP error that is not MLflow's own JSON answer: a proxy's 404/401/403 page, a locked
SQLite store) is retried forever with back-off capped at ``max_backoff``: the queue waits, training goes
on, and the caller's ``wait(timeout)`` bounds how long it waits. MLflow's own refusal (a 4xx such as
INVALID_PARAMETER_VALUE) or a local error (a missing payload, a value out of range) sets the entry aside at
once. A 500 is either the server's store being away or a request it can never take (a poison entry): the
outbox asks the server for the run; if that works, the entry counts one refusal, and after
``POISON_TRIES`` it is set aside. Set aside = moved to ``failed/`` with the error, one line echoed, the
entries behind it still flow, and ``wait()`` returns False from then on (``failures`` says why).

Poison entries. Every entry is checked whole when read (valid JSON, the shape we write, a payload inside its own
``<seq>.files/``) before any field is used. One that is not (truncated by a dying disk, ``null``, a list, an
object missing fields) ends the merged group before it and is then set aside alone -- its bytes and reason in
``failed/``, never re-sent -- so no intact neighbour is touched and delivery never stops at it. ``delivered`` and
``set_aside`` count entries, so ``sync``'s numbers are true. A spool that refuses writes (read-only, full) raises
``SpoolUnusable`` in the writer; delivery that stops on it says so once and leaves the rest in place.

No FINISHED without its data: a FINISHED status that comes after set-aside entries is sent as FAILED and
itself kept (held) in ``failed/``. An adopted spool (``deliver_spool``: ``sync``, ``--resume``) first puts
back the set-aside entries whose cause may have passed (everything but MLflow's INVALID_PARAMETER_VALUE
and local errors), in their original order; once all of them arrive, the held status makes the run
FINISHED -- if the run is still as we left it (FAILED at our end time; a resumed run is not overwritten).

Durable against process death, not an OS crash: entries are not fsync()ed (that costs ms each).
"""

from __future__ import annotations

import logging
import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag

from .outage import OUTAGE, REFUSED, SUSPECT, classify, from_mlflow, short_reason
from .spool import (ENTRY_NAME, SpoolDelivery, SpoolUnusable, Busy, lock_writer_dir, new_writer_dir, run_spool_dir,
                    spool_root_for, write_atomically, writer_dirs)
from ...messages import short_error

__all__ = ["Outbox", "OutboxClosed", "SpoolDelivery", "deliver_spool", "spool_root_for", "run_spool_dir"]

BACKOFF_START_S, BACKOFF_MAX_S = 0.5, 30.0
POISON_TRIES = 4  # 500s to one entry, while the server answers for the run, before the entry is set aside
FINAL_ERROR_CODES = ("INVALID_PARAMETER_VALUE",)  # MLflow's refusals that no later attempt can pass
# log_batch limits of the MLflow REST API (mlflow.utils.validation): consecutive small batches are sent
# as one request when catching up after an outage (1,000 metrics = ~140 evaluations of 7 metrics).
_MAX_METRICS, _MAX_PARAMS_TAGS = 1000, 100
_SHOWN_FAILURES = 3  # a deleted run refuses every entry: a few lines, not thousands
SENT, HELD, DROPPED = "sent", "held", "dropped"  # what became of a status entry
DATASET_FIELDS = ("name", "digest", "source_type", "source", "schema", "profile")


def _default_echo(line: str) -> None:
    """A log line (the CLI shows it on stderr as ``grokking-tracked: <line>``)."""
    logging.getLogger(__name__).warning(line)


class OutboxClosed(RuntimeError):
    """An operation was enqueued after ``close()``."""


TERMINATE_WAIT_SECONDS = 5.0


def terminate_within(client, run_id: str, status: str, end_time_ms: int | None = None,
                     seconds: float = TERMINATE_WAIT_SECONDS, tags: Mapping[str, str] | None = None) -> bool:
    """Set a terminal status directly (past the outbox), waiting at most ``seconds``: the server may be away too,
    and MLflow's own retries would take minutes. True if the server took it in time. ``tags``: set first, so a
    status never reaches the server without the tags that describe it (a trial's state)."""
    done = threading.Event()

    def terminate() -> None:
        try:
            if tags:
                client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])
            client.set_terminated(run_id, status, end_time_ms)
            done.set()
        except Exception:  # noqa: BLE001 - unreachable: the caller's error is the one to report
            pass

    thread = threading.Thread(target=terminate, name=f"terminate-{run_id[:8]}", daemon=True)
    thread.start()
    thread.join(seconds)
    return done.is_set()


def deliver_spool(client, directory: str | Path, timeout: float = 60.0, echo: Callable[[str], None] | None = None,
                  max_backoff: float = 30.0, report: SpoolDelivery | None = None) -> SpoolDelivery:
    """Deliver what dead writers left under ``directory`` (a spool root, or one run's directory):
    each writer in creation order, entry by entry in order, retrying outages up to ``timeout`` seconds in
    all. A run's later writers wait for its earlier ones; spools of live processes are skipped.
    Entries set aside earlier are tried again first (see the module docstring); what is still refused
    stays in ``<writer>/failed/`` and is listed in ``failed``. ``report``: add to this one (read while it runs:
    ``delivered_so_far``)."""
    report = SpoolDelivery() if report is None else report
    deadline, blocked = time.monotonic() + timeout, set()
    for writer, run_id in writer_dirs(Path(directory)):
        if run_id in blocked:
            report.pending += _entries(writer)
            continue
        try:
            outbox = Outbox(client, run_id, echo=echo, max_backoff=max_backoff, _adopt=writer)
        except Busy:
            report.busy.append(writer)
            blocked.add(run_id)
            continue
        except OSError as error:  # read-only or full: nothing of this writer can be handed over safely
            report.pending += _entries(writer)
            report.failed.append(f"cannot use the spool {writer}: {error.strerror or error}")
            blocked.add(run_id)
            continue
        report.live = outbox
        try:
            outbox.wait(max(0.0, deadline - time.monotonic()))
        finally:  # (a request in flight may still land while closing: counted after it)
            outbox.close(timeout=min(10.0, max(1.0, deadline - time.monotonic())))
            delivered, report.live = outbox.delivered, None
            report.delivered += delivered
        failures, set_aside_now = outbox.failures, outbox.set_aside
        left, kept = _entries(writer), _entries(writer / "failed")
        report.pending += left
        report.set_aside += kept
        report.failed += failures
        if kept > set_aside_now:
            report.failed.append(f"{kept - set_aside_now} operations of run {run_id} refused earlier are kept in "
                                 f"{writer / 'failed'}")
        if left:
            blocked.add(run_id)
    return report


def _entries(writer: Path) -> int:
    return sum(1 for p in writer.iterdir() if ENTRY_NAME.match(p.name)) if writer.is_dir() else 0


def _describe(entry: dict) -> str:
    if entry["op"] == "batch":
        return f"a batch of {len(entry['metrics'])} metrics, {len(entry['params'])} params, {len(entry['tags'])} tags"
    if entry["op"] == "artifact":
        return f"artifact {'/'.join(filter(None, [entry['dir'], Path(entry['file']).name]))}"
    if entry["op"] == "status":
        return f"status {entry['status']}{' (held)' if entry.get('held') else ''}"
    if entry["op"] == "inputs":
        return f"{len(entry['datasets'])} dataset inputs"
    if entry["op"] == "model":
        return f"logged model {entry['name']}"
    return "an unreadable entry"


class Unreadable(ValueError):
    """A spool entry that cannot be delivered as it is: not JSON (truncated), or JSON of the wrong shape.
    ``raw``: its bytes, kept with it when it is set aside."""

    def __init__(self, reason: str, raw: bytes = b""):
        super().__init__(reason)
        self.raw = raw


_STATUSES = frozenset(RunStatus.to_string(status) for status in RunStatus.all_status())


def _pairs(value, second=str) -> bool:
    return isinstance(value, list) and all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], second) for p in value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _metric_rows(value, width: int) -> bool:  # [key, value, timestamp(, step)]
    return isinstance(value, list) and all(
        isinstance(m, list) and len(m) == width and isinstance(m[0], str) and _number(m[1])
        and all(_integer(x) for x in m[2:]) for m in value)


def _payload(entry: dict, seq: int) -> bool:  # only this entry's own <seq>.files/NAME: never a path elsewhere
    file = entry.get("file")
    prefix = f"{seq:010d}.files/"
    return isinstance(file, str) and file.startswith(prefix) and file[len(prefix):] not in ("", ".", "..") \
        and "/" not in file[len(prefix):]


def _shape_problem(entry, seq: int) -> str | None:
    """Why ``entry`` (parsed JSON of spool entry ``seq``) cannot be delivered, None if it has the shape we write.
    Checked before anything reads a field, so a wrong-shaped entry is set aside alone instead of stopping delivery."""
    if not isinstance(entry, dict):
        kind = {type(None): "null", list: "list", str: "string", bool: "boolean"}.get(type(entry), "number")
        return f"JSON {kind}, not an operation"
    op = entry.get("op")
    if op == "batch":
        ok = _metric_rows(entry.get("metrics"), 4) and _pairs(entry.get("params")) and _pairs(entry.get("tags"))
    elif op == "artifact":
        ok = (entry.get("dir") is None or isinstance(entry.get("dir"), str)) and _payload(entry, seq)
    elif op == "status":
        ok = entry.get("status") in _STATUSES and (entry.get("end_time") is None or _integer(entry.get("end_time")))
    elif op == "inputs":
        datasets = entry.get("datasets")
        ok = isinstance(datasets, list) and all(
            isinstance(d, dict) and isinstance(d.get("dataset"), dict) and set(d["dataset"]) == set(DATASET_FIELDS)
            and all(v is None or isinstance(v, str) for v in d["dataset"].values()) and _pairs(d.get("tags"))
            for d in datasets)
    elif op == "model":
        ok = (isinstance(entry.get("name"), str) and isinstance(entry.get("experiment_id"), str)
              and _integer(entry.get("step")) and isinstance(entry.get("reasons"), list)
              and all(isinstance(r, str) for r in entry["reasons"]) and _metric_rows(entry.get("metrics"), 3)
              and _payload(entry, seq))
    else:
        return f"unknown operation {str(op)[:40]!r}"
    return None if ok else f"a {op} entry with missing or wrong-typed fields"


def read_entry(path: Path, seq: int) -> dict:
    """The operation in spool entry file ``path`` (number ``seq``); ``Unreadable`` with the reason if it is not one
    (FileNotFoundError if it is gone)."""
    raw = path.read_bytes()
    try:
        entry = json.loads(raw)
    except ValueError as error:  # truncated, or not text at all
        raise Unreadable(f"not valid JSON ({error})", raw) from None
    if problem := _shape_problem(entry, seq):
        raise Unreadable(problem, raw)
    return entry


class Outbox:
    """Durable, ordered delivery of one writer's operations on one MLflow run (see the module docstring).

    Enqueueing methods are thread-safe, write to the spool and return; they raise ``OutboxClosed`` after
    ``close()`` and ``OSError`` if the local disk is full (a local problem the caller must see)."""

    def __init__(self, client, run_id: str, spool_root: str | Path | None = None,
                 echo: Callable[[str], None] | None = None, max_backoff: float = BACKOFF_MAX_S,
                 _adopt: Path | None = None):
        self.client, self.run_id = client, run_id
        self._echo = echo or _default_echo
        self._max_backoff = max_backoff
        if _adopt is None:
            run_dir = run_spool_dir(spool_root or spool_root_for(client.tracking_uri), run_id)
            self._dir, self._lock_fd = new_writer_dir(run_dir, run_id, client.tracking_uri)
        else:  # a dead writer's spool, delivered by deliver_spool; Busy if its writer still lives
            self._dir, self._lock_fd = _adopt, lock_writer_dir(_adopt)
            self._requeue_set_aside()
        existing = sorted(int(m.group(1)) for p in self._dir.iterdir() if (m := ENTRY_NAME.match(p.name)))
        self._next_seq = existing[-1] + 1 if existing else 0
        self._done_seq = existing[0] if existing else 0  # entries below this are delivered or failed
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._closed = False
        self._failures: list[str] = []
        self._delivered = self._set_aside_count = 0  # entries delivered, and set aside, by this outbox
        self._down_since: float | None = None  # outage bookkeeping for the two stderr lines
        self._drain_until: int | None = None
        self._drained, self._back_after = 0, 0.0
        self._thread = threading.Thread(target=self._deliver_forever, name=f"outbox-{run_id[:8]}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ enqueueing
    @property
    def spool_dir(self) -> Path:
        return self._dir

    @property
    def pending(self) -> int:
        """Entries enqueued but neither delivered nor moved to failed/."""
        with self._cond:
            return self._next_seq - self._done_seq

    @property
    def delivered(self) -> int:
        """Entries this outbox delivered (a dropped stale status and set-aside entries are not counted)."""
        with self._cond:
            return self._delivered

    @property
    def set_aside(self) -> int:
        """Entries this outbox moved to failed/ (refused, unreadable, or a held status)."""
        with self._cond:
            return self._set_aside_count

    @property
    def stopped(self) -> bool:
        """Whether delivery stopped by itself (an error it reported in ``failures``), not by ``close()``."""
        return not self._thread.is_alive() and not self._closing.is_set()

    @property
    def failures(self) -> list[str]:
        """One line per entry the server refused for good (kept under ``spool_dir/failed``)."""
        with self._cond:
            return list(self._failures)

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        timestamp_ms = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        self.log_batch(metrics=[Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()])

    def log_batch(self, metrics: Iterable[Metric] = (), params: Mapping[str, object] | None = None,
                  tags: Mapping[str, str] | None = None) -> None:
        """Metrics keep the timestamps they carry (fixed now, so a re-sent batch is recognised)."""
        self._enqueue({"op": "batch", "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
                       "params": [[k, str(v)] for k, v in (params or {}).items()],
                       "tags": [[k, str(v)] for k, v in (tags or {}).items()]})

    def log_params(self, params: Mapping[str, object]) -> None:
        self.log_batch(params=params)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.log_batch(tags=tags)

    def log_text(self, text: str, artifact_file: str) -> None:
        directory, _, name = artifact_file.rpartition("/")
        def write(target: Path) -> None:
            target.parent.mkdir()
            target.write_text(text)

        self._enqueue({"op": "artifact", "dir": directory or None}, name, write)

    def log_dict(self, dictionary, artifact_file: str) -> None:
        self.log_text(json.dumps(dictionary, indent=2), artifact_file)

    def staging_path(self, name: str) -> Path:
        """A fresh path inside the spool's filesystem to write a big file to (``torch.save``), then hand
        over with ``log_file(path, dir, move=True)``: a rename, so snapshots never pile up in memory."""
        staging = self._dir / "staging"
        staging.mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(dir=staging)) / name

    def log_file(self, path: str | Path, artifact_dir: str | None = None, move: bool = False) -> None:
        """Upload ``path`` as ``artifact_dir/<its name>``; ``move=True`` takes the file (else a copy, made
        now: the caller may change the file afterwards)."""
        path = Path(path)

        def take(target: Path) -> None:
            if not move:
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(path, target)
            elif path.parent.parent == self._dir / "staging" and len(os.listdir(path.parent)) == 1:
                os.replace(path.parent, target.parent)  # one rename: ~0.4 ms per metadata operation here
            else:
                target.parent.mkdir(exist_ok=True)
                shutil.move(path, target)  # a rename on the same filesystem, else a copy

        self._enqueue({"op": "artifact", "dir": artifact_dir}, path.name, take)

    def log_inputs(self, datasets: Iterable[DatasetInput]) -> None:
        """Dataset inputs (the UI's Dataset column); logging the same dataset again is idempotent."""
        self._enqueue({"op": "inputs", "datasets": [
            {"dataset": {key: getattr(d.dataset, key) for key in DATASET_FIELDS},
             "tags": [[tag.key, tag.value] for tag in d.tags]} for d in datasets]})

    def log_model(self, directory: Path, name: str, experiment_id: str, step: int, reasons: list[str],
                  metrics: Iterable[Metric] = ()) -> None:
        """A LoggedModel (tracking/models.py) made of ``directory`` (written in ``staging_path()``, taken over),
        linked to this run at ``step``, carrying ``metrics`` (their timestamps kept: the run has them already)."""
        def take(target: Path) -> None:
            target.parent.mkdir()
            os.replace(directory, target)
            with contextlib.suppress(OSError):
                directory.parent.rmdir()  # its staging_path() directory, now empty

        self._enqueue({"op": "model", "name": name, "experiment_id": experiment_id, "step": step, "reasons": reasons,
                       "metrics": [[m.key, m.value, m.timestamp] for m in metrics]}, "model", take)

    def set_status(self, status: str, end_time_ms: int | None = None) -> None:
        """RUNNING (a resumed run) or a terminal status, whose end time is fixed now, not at delivery."""
        RunStatus.from_string(status)  # refuse a typo here, not in the delivery thread
        if RunStatus.is_terminated(RunStatus.from_string(status)) and end_time_ms is None:
            end_time_ms = int(time.time() * 1000)
        try:
            self._enqueue({"op": "status", "status": status, "end_time": end_time_ms})
        except OSError:  # the spool cannot take it (full disk): end the run directly, never leave it RUNNING
            if RunStatus.is_terminated(RunStatus.from_string(status)):
                terminate_within(self.client, self.run_id, "FAILED" if status == "FINISHED" else status, end_time_ms)
            raise

    def _enqueue(self, entry: dict, file_name: str | None = None, fill: Callable[[Path], object] | None = None,
                 ) -> None:
        """Write one entry; a payload is put in place by ``fill(path)`` before the entry exists."""
        with self._cond:  # one writer at a time keeps sequence numbers in call order
            if self._closing.is_set():
                raise OutboxClosed(f"outbox of run {self.run_id} is closed")
            seq = self._next_seq
            try:
                if fill is not None:
                    files = self._dir / f"{seq:010d}.files"
                    shutil.rmtree(files, ignore_errors=True)  # exists only if a process died right here
                    fill(files / file_name)
                    entry["file"] = f"{files.name}/{file_name}"
                write_atomically(self._dir / f"{seq:010d}.json", json.dumps(entry))
            except OSError as error:
                if not self._spool_error(error):
                    raise  # the caller's own file (a copy's source that is gone)
                raise SpoolUnusable(f"cannot write to the spool {self._dir}: {error.strerror or error}") from None
            self._next_seq = seq + 1
            self._cond.notify_all()

    def _spool_error(self, error: OSError) -> bool:
        """Whether ``error`` is the spool's filesystem refusing a write (read-only, full, no permission)."""
        if isinstance(error, SpoolUnusable) or error.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            return True
        return error.filename is None or str(error.filename).startswith(str(self._dir))

    # ------------------------------------------------------------------------------ waiting
    def wait(self, timeout: float | None = None, progress: Callable[[int, float], None] | None = None) -> bool:
        """Block until everything enqueued so far is handled, or ``timeout`` seconds; True iff all of it
        was delivered (False on timeout, or if an entry was refused for good: see ``failures``).
        ``progress(pending, seconds_waited)`` is called about once a second while entries are pending."""
        start = time.monotonic()
        with self._cond:
            target = self._next_seq
        while True:
            with self._cond:  # wake at least once a second for progress; never call back under the lock
                waited = time.monotonic() - start
                budget = 1.0 if timeout is None else min(1.0, timeout - waited)
                if self._done_seq < target and budget > 0:
                    self._cond.wait_for(lambda: self._done_seq >= target, budget)
                pending, done = self._next_seq - self._done_seq, self._done_seq >= target
                failed = bool(self._failures)
            if done or not self._thread.is_alive():  # (closed, or stopped by an error it reported)
                return done and not failed
            waited = time.monotonic() - start
            if timeout is not None and waited >= timeout:
                return False
            if progress is not None:
                progress(pending, waited)

    def close(self, timeout: float = 10.0) -> None:
        """Stop delivering (what is pending stays in the spool) and release the spool; a fully delivered
        spool without failures is removed. Waits up to ``timeout`` s for a request in flight."""
        if self._closed:
            return
        with self._cond:
            self._closing.set()
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._closed = True
            return  # a request still in flight: keep the lock; the process's exit releases it
        with self._cond:
            finished = self._done_seq == self._next_seq and not (self._dir / "failed").exists()
        if finished:
            shutil.rmtree(self._dir, ignore_errors=True)
            try:
                self._dir.parent.rmdir()  # the run's directory, if no other writer is left in it
            except OSError:
                pass
        self._closed = True
        os.close(self._lock_fd)

    # ------------------------------------------------------------------------------ delivery thread
    def _deliver_forever(self) -> None:
        try:
            self._deliver_loop()
        except Exception as exc:  # a bug or a full local disk: say so once instead of dying silently
            spool = isinstance(exc, OSError) and self._spool_error(exc)
            reason = f"cannot write to the spool: {exc.strerror or exc}" if spool else short_reason(exc)
            line = f"delivery of run {self.run_id} stopped ({reason}); the rest stays in {self._dir}"
            if not spool:  # (a spool that refuses writes is reported once, by whoever writes next or waits)
                self._echo(line)
            with self._cond:
                self._failures.append(line)

    def _deliver_loop(self) -> None:
        backoff = BACKOFF_START_S
        split_until = -1  # after a permanent error of a merged batch, retry its entries one by one
        refusals = (-1, 0)  # (entry, MLflow's own 500s to it while the server answered for the run)
        while True:
            with self._cond:
                while self._done_seq == self._next_seq and not self._closing.is_set():
                    self._cond.wait()
                if self._closing.is_set():
                    return
                first, end = self._done_seq, self._next_seq
            try:
                group = self._read_group(first, end, merge=first > split_until)
            except Unreadable as exc:  # the entry ``first`` itself (never a torn one: entries are renamed in)
                self._fail(first, {"op": "unreadable", "raw": exc.raw.decode("utf-8", "surrogateescape")}, exc)
                continue
            if not group:  # a vanished entry (only an external hand can do that): nothing to deliver
                self._finish(first + 1)
                continue
            sent = len(group)
            try:
                if group[0][1]["op"] == "status":
                    outcome = self._send_status(group[0][0], group[0][1])
                    if outcome == HELD:
                        continue  # held in failed/ (see the module docstring)
                    sent = int(outcome == SENT)
                else:
                    self._send([entry for _, entry in group])
            except Exception as exc:  # classified below: an outage is retried, a refusal is set aside
                kind = classify(exc)
                if kind == SUSPECT and len(group) > 1:
                    kind = REFUSED  # find the entry MLflow cannot take among the merged ones (below)
                elif kind == SUSPECT and self._server_answers():  # so the 500 is about this entry
                    seq = group[0][0]
                    refusals = (seq, refusals[1] + 1 if refusals[0] == seq else 1)
                    if refusals[1] >= POISON_TRIES:
                        self._fail(seq, group[0][1], exc, tries=refusals[1])
                        continue
                else:
                    kind = OUTAGE if kind == SUSPECT else kind
                if kind != REFUSED:
                    if kind == OUTAGE:
                        self._outage(exc)
                    if self._closing.wait(backoff):
                        return
                    backoff = min(backoff * 2, self._max_backoff)
                    continue
                if len(group) > 1:  # find the refused entry among the merged ones
                    split_until = group[-1][0]
                    continue
                self._fail(group[0][0], group[0][1], exc)
                continue
            backoff = BACKOFF_START_S
            for seq, _ in group:
                self._remove(seq)
            with self._cond:
                self._delivered += sent
            self._back_online(group[-1][0], len(group))
            self._finish(group[-1][0] + 1)

    def _read_group(self, first: int, end: int, merge: bool) -> list[tuple[int, dict]]:
        """The entry ``first`` and, if it is a batch, the batches right after it that fit in one request."""
        group: list[tuple[int, dict]] = []
        counts = {"metrics": 0, "params": 0, "tags": 0}
        param_keys: set[str] = set()
        for seq in range(first, end):
            try:
                entry = read_entry(self._dir / f"{seq:010d}.json", seq)
            except FileNotFoundError:
                break
            except Unreadable:
                if not group:
                    raise
                break  # the group ends before it: it comes next, alone (set aside with its own reason)
            if group and (entry["op"] != "batch" or group[0][1]["op"] != "batch"):
                break
            keys = {k for k, _ in entry.get("params", ())}
            if group and (keys & param_keys or any(
                    counts[k] + len(entry[k]) > (_MAX_METRICS if k == "metrics" else _MAX_PARAMS_TAGS)
                    for k in counts)):
                break  # a repeated param key in one request is refused by MLflow: send it on its own
            group.append((seq, entry))
            param_keys |= keys
            for k in counts:
                counts[k] += len(entry.get(k, ()))
            if not merge or entry["op"] != "batch":
                break
        return group

    def _server_answers(self) -> bool:
        """Whether the server answers a plain request for this run now (so a 500 is about the entry)."""
        try:
            self.client.get_run(self.run_id)
            return True
        except Exception:  # noqa: BLE001 - any failure means: not a healthy server right now
            return False

    def _set_aside(self) -> int:
        """How many data entries of this writer are in failed/ (held statuses are not data)."""
        failed = self._dir / "failed"
        if not failed.is_dir():
            return 0
        count = 0
        for path in failed.iterdir():
            if ENTRY_NAME.match(path.name):
                try:
                    entry = json.loads(path.read_text())
                    count += not (isinstance(entry, dict) and entry.get("op") == "status")
                except (OSError, ValueError):
                    count += 1
        return count

    def _send_status(self, seq: int, entry: dict) -> str:
        """Send a status entry: SENT, HELD (a FINISHED after set-aside entries, kept in failed/) or DROPPED (a held
        FINISHED of a run continued since)."""
        if entry["status"] == "FINISHED" and (missing := self._set_aside()):
            self.client.set_terminated(self.run_id, "FAILED", entry["end_time"])
            self._fail(seq, {**entry, "held": True}, RuntimeError(
                f"{missing} operations were set aside: ended FAILED, not FINISHED; `grokking-tracked sync` "
                f"retries those that may pass, and once all are in marks it FINISHED"), kept=True)
            return HELD
        if entry.get("held"):  # from an earlier attempt: only if nobody has continued the run since
            info = self.client.get_run(self.run_id).info
            if info.status != "FAILED" or info.end_time != entry["end_time"]:
                self._echo(f"run {self.run_id} was continued after it ended without all its data; "
                           f"its old FINISHED status is dropped")
                return DROPPED
        self._send([entry])
        return SENT

    def _requeue_set_aside(self) -> None:
        """Put back what an earlier attempt set aside whose cause may have passed (see the module docstring)."""
        failed = self._dir / "failed"
        if not failed.is_dir():
            return
        for path in sorted(failed.iterdir()):
            if not ENTRY_NAME.match(path.name):
                continue
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(entry, dict) or not entry.get("may_pass", True):
                continue  # (an unreadable entry is kept there as it was, with its reason)
            entry = {k: v for k, v in entry.items() if k not in ("may_pass", "error")}
            if _shape_problem(entry, int(path.name[:10])) is not None:
                continue
            files = failed / path.name.replace(".json", ".files")
            if files.exists():
                files.rename(self._dir / files.name)
            write_atomically(self._dir / path.name, json.dumps(entry))
            path.unlink()
        try:
            failed.rmdir()  # all put back: a delivered spool is then removed at close()
        except OSError:
            pass

    def _send(self, entries: list[dict]) -> None:
        entry = entries[0]
        if entry["op"] == "artifact":
            self.client.log_artifact(self.run_id, str(self._dir / entry["file"]), entry["dir"])
        elif entry["op"] == "inputs":
            self.client.log_inputs(self.run_id, datasets=[
                DatasetInput(Dataset(**d["dataset"]), [InputTag(k, v) for k, v in d["tags"]]) for d in entry["datasets"]])
        elif entry["op"] == "model":
            from ..models import deliver_model  # the one operation that needs the MLflow mapping: a LoggedModel

            deliver_model(self.client, self.run_id, entry, self._dir / entry["file"])
        elif entry["op"] == "status":
            if entry["end_time"] is None:
                self.client.update_run(self.run_id, status=entry["status"])
            else:
                self.client.set_terminated(self.run_id, entry["status"], entry["end_time"])
        else:
            tags: dict[str, str] = {}
            for e in entries:  # the last value of a tag wins, as if sent one by one
                tags.update(dict(e["tags"]))
            self.client.log_batch(
                self.run_id, metrics=[Metric(k, v, t, s) for e in entries for k, v, t, s in e["metrics"]],
                params=[Param(k, v) for e in entries for k, v in e["params"]],
                tags=[RunTag(k, v) for k, v in tags.items()])

    def _remove(self, seq: int) -> None:
        (self._dir / f"{seq:010d}.json").unlink(missing_ok=True)  # first: a kill now re-sends nothing
        shutil.rmtree(self._dir / f"{seq:010d}.files", ignore_errors=True)

    def _finish(self, end: int) -> None:  # entries below ``end`` are handled
        with self._cond:
            self._done_seq = max(self._done_seq, end)
            self._cond.notify_all()

    def _fail(self, seq: int, entry: dict, exc: BaseException, tries: int = 0, kept: bool = False) -> None:
        """Set an entry aside in failed/ with one line (``tries``: a poison entry; ``kept``: a held status)."""
        failed = self._dir / "failed"
        failed.mkdir(exist_ok=True)
        message = short_error(exc, 300)
        if kept:
            line = f"run {self.run_id}: {message}"
        elif entry.get("op") == "unreadable":  # a local fault: the server was never asked
            line = f"spool entry {seq:010d}.json of run {self.run_id} is unreadable ({message}); set aside in {failed}"
        elif isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
            # a local file we could not read: no server was asked (a requests error is an OSError, not these)
            line = (f"{_describe(entry)} of run {self.run_id} was not sent: its local copy cannot be read "
                    f"({message}); set aside in {failed}")
        else:
            why = f"after {tries} refusals while it answered other requests; " if tries else ""
            line = (f"the tracking server refused {_describe(entry)} of run {self.run_id} ({why}{message}); "
                    f"set aside in {failed}")
        # Whether a later attempt (sync) may succeed: not for MLflow's word that the value is invalid, nor
        # for a local error (a missing payload, a value the client cannot encode).
        final = (from_mlflow(exc) and getattr(exc, "error_code", None) in FINAL_ERROR_CODES) or (
            not kept and classify(exc) == REFUSED and not from_mlflow(exc)
            and getattr(getattr(exc, "response", None), "status_code", None) is None)
        files = self._dir / f"{seq:010d}.files"
        if files.exists():
            files.rename(failed / files.name)
        write_atomically(failed / f"{seq:010d}.json", json.dumps({**entry, "error": message, "may_pass": not final}))
        (self._dir / f"{seq:010d}.json").unlink(missing_ok=True)
        with self._cond:
            self._failures.append(line)
            self._set_aside_count += 1
            shown = len(self._failures)
        if shown <= _SHOWN_FAILURES:
            self._echo(line if shown < _SHOWN_FAILURES else f"{line}; further refusals are only kept there")
        self._finish(seq + 1)

    def _outage(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since, self._drained = time.monotonic(), 0
            self._echo(f"tracking server unreachable ({short_reason(exc)}); spooling to {self._dir}, retrying")
        self._drain_until = None  # back down while catching up: still the same outage, no new line

    def _back_online(self, last_seq: int, count: int) -> None:
        """After an outage, say so once the backlog present at reconnection is delivered."""
        if self._down_since is None:
            return
        if self._drain_until is None:
            self._drain_until = self._next_seq - 1
            self._back_after = time.monotonic() - self._down_since
        self._drained += count
        if last_seq >= self._drain_until:
            self._echo(f"tracking server reachable again after {self._back_after:.0f} s; "
                       f"delivered {self._drained} pending operations")
            self._down_since = self._drain_until = None
