"""Issue 27: the spool cannot lose an intact entry, no run is stranded RUNNING by a failure path, `sync --timeout`
bounds the whole command, and the spool keeps no credentials.

Real components: MLflow's SQLite store, real `grokking-tracked` processes, a read-only bind mount and a full tmpfs
(tests run as root: chmod would not stop root; skipped where mount is not allowed), a loopback HTTP server that
answers /health and never the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import free_port, run_cli
from grokking_tracked.tracking.outbox import Outbox
from grokking_tracked.tracking.spool import ENTRY_NAME, new_writer_dir, spool_root_for

KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm", "grad_norm", "lr")


def entries(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if ENTRY_NAME.match(p.name)) if directory.is_dir() else []


def leftover_spool(run_id: str, spool_root: Path, steps: list[int], status: str | None = None) -> Path:
    """A dead writer's spool: one 7-metric batch per step (then ``status``), queued while nothing listened."""
    away = MlflowClient(f"http://127.0.0.1:{free_port()}")  # nothing listens there: every request is refused
    outbox = Outbox(away, run_id, spool_root=spool_root, echo=lambda line: None)
    for step in steps:
        outbox.log_metrics({key: step + i / 10 for i, key in enumerate(KEYS)}, step, timestamp_ms=1_000 + step)
    if status:
        outbox.set_status(status)
    assert outbox.wait(0.2) is False
    outbox.close()
    assert len(entries(outbox.spool_dir)) == len(steps) + bool(status)
    return outbox.spool_dir


def summary(result: subprocess.CompletedProcess) -> tuple[int, int, int]:
    """(delivered, pending, set aside) from sync's summary line."""
    [line] = [l for l in result.stdout.splitlines() if l.startswith("delivered ")]
    words = line.replace(";", "").replace(",", "").split()
    return int(words[1]), int(words[3]), int(words[5])


@pytest.fixture
def no_retries(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


# ------------------------------------------------------------------------------------------ poison entries
def test_poison_entries_in_a_merged_group_are_set_aside_alone_and_every_intact_one_is_delivered(tmp_path, no_retries):
    """A truncated entry, `null`, a list and an object missing fields, each between intact batches of one merged
    group: sync delivers every intact batch (every metric value counted on the store), sets aside exactly the four
    with their reasons and bytes, holds the FINISHED behind them (the run ends FAILED), and its counts are true, the
    second time too."""
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    store = MlflowClient(uri)
    run_id = store.create_run(store.create_experiment("poison")).info.run_id
    steps = list(range(10, 130, 10))  # 12 batches, then the status: one merged group of 84 metrics
    writer = leftover_spool(run_id, spool_root_for(uri), steps, status="FINISHED")
    files = entries(writer)
    truncated = files[3].read_bytes()[:40]
    poison = {3: truncated, 6: b"null", 8: b'{"op": "batch", "metrics": [["x", 1.0]]}', 10: b"[1, 2]"}
    for index, raw in poison.items():
        files[index].write_bytes(raw)
    intact = [step for i, step in enumerate(steps) if i not in poison]
    (tmp_path / "store" / ".spool" / "junk").mkdir()
    (tmp_path / "store" / ".spool" / "junk" / "writer.json").write_text("null")  # not a writer: skipped

    first = run_cli("sync", "--timeout", "60", "--tracking-uri", uri, cwd=tmp_path)
    assert first.returncode != 0 and "Traceback" not in first.stderr, first.stderr
    assert summary(first) == (len(intact), 0, len(poison) + 1), first.stdout  # (+1: the held FINISHED)
    for key in KEYS:
        assert sorted(m.step for m in store.get_metric_history(run_id, key)) == intact, key
    assert sum(len(store.get_metric_history(run_id, key)) for key in KEYS) == len(KEYS) * len(intact)
    assert store.get_run(run_id).info.status == "FAILED"  # never FINISHED without all its data
    shown = [l for l in first.stderr.splitlines() if "is unreadable" in l and not l.startswith("grokking-tracked:")]
    assert len(shown) == 3 and "0000000003.json" in shown[0] and "not valid JSON" in shown[0], first.stderr
    assert "0000000006.json" in shown[1] and "JSON null, not an operation" in shown[1], first.stderr
    assert first.stderr.splitlines()[-1].startswith("grokking-tracked: error: spool entry 0000000003.json")

    failed = {int(p.name[:10]): json.loads(p.read_text()) for p in (writer / "failed").glob("*.json")}
    assert sorted(failed) == [*sorted(poison), len(steps)]
    for index, raw in poison.items():  # each alone, with its reason and its bytes, never to be re-sent
        assert failed[index]["op"] == "unreadable" and failed[index]["may_pass"] is False
        assert failed[index]["raw"].encode() == raw and failed[index]["error"]
    assert "missing or wrong-typed" in failed[8]["error"] and "JSON list" in failed[10]["error"]
    assert failed[len(steps)]["op"] == "status" and failed[len(steps)]["held"] is True
    assert not entries(writer)

    second = run_cli("sync", "--timeout", "60", "--tracking-uri", uri, cwd=tmp_path)
    assert second.returncode != 0 and "Traceback" not in second.stderr, second.stderr
    assert summary(second) == (0, 0, len(poison) + 1), second.stdout
    assert f"{len(poison)} operations were set aside: ended FAILED, not FINISHED" in second.stderr, second.stderr
    assert sum(len(store.get_metric_history(run_id, key)) for key in KEYS) == len(KEYS) * len(intact)
    assert store.get_run(run_id).info.status == "FAILED"


# ------------------------------------------------------------------------------------------ no run left RUNNING
@pytest.fixture
def spool_mount(tmp_path):
    """``store/.spool``, which the test can make read-only (``lock``: a read-only bind mount of it stacked on it, so
    open files need not be closed first) or, when mounted as a 1 MiB tmpfs (``tmpfs``), full (``fill``)."""
    spool = tmp_path / "store" / ".spool"
    spool.mkdir(parents=True)
    mounted: list[str] = []

    def mount(*args: str) -> None:
        result = subprocess.run(["mount", *args], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount here (needs root): {result.stderr.strip()}")
        mounted.append(str(spool))

    class Mount:
        path = spool

        @staticmethod
        def tmpfs() -> None:
            mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(spool))

        @staticmethod
        def lock() -> None:  # read-only from now on, for root too
            mount("--bind", "-o", "ro", str(spool), str(spool))

        @staticmethod
        def fill() -> None:
            descriptor = os.open(spool / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                for size in (1 << 16, 1 << 12, 1):
                    try:
                        while True:
                            os.write(descriptor, b"\0" * size)
                    except OSError:  # ENOSPC at this size: on with smaller writes, until not one byte is left
                        pass
            finally:
                os.close(descriptor)

    yield Mount
    for path in reversed(mounted):
        subprocess.run(["umount", path], check=True)


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_a_spool_that_refuses_writes_while_a_run_ends_leaves_the_run_failed(tmp_path, spool_mount, fault):
    from grokking_tracked.tracking import TrackedRun
    from grokking_tracked.tracking.spool import SpoolUnusable
    from grokking_tracked.tracking.store import connect

    if fault == "full":
        spool_mount.tmpfs()
    client = connect(f"sqlite:///{tmp_path}/store/mlflow.db")
    run = TrackedRun.create(client, "ending", params=[])
    run.log_values({"train_loss": 1.0}, step=10)
    assert run.deliver(60)
    spool_mount.lock() if fault == "read-only" else spool_mount.fill()
    started = time.monotonic()
    with pytest.raises(SpoolUnusable, match="cannot write to the spool") as error:
        run.end("FINISHED")  # ending queues the lease's release first: that write is refused
    assert ("Read-only file system" if fault == "read-only" else "No space left on device") in str(error.value)
    assert time.monotonic() - started < 30
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FAILED" and stored.info.end_time is not None
    assert [m.step for m in client.get_metric_history(run.run_id, "train_loss")] == [10]


def test_a_spool_made_read_only_mid_run_ends_the_run_failed_in_one_line(tmp_path, spool_mount):
    """`grokking-tracked run`, its spool made read-only while it trains: one line, non-zero exit, run FAILED."""
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    process = subprocess.Popen(
        [sys.executable, "-m", "grokking_tracked", "run", "--p", "11", "--d-model", "16", "--d-mlp", "32",
         "--max-steps", "1000000", "--eval-every", "10", "--no-stop-on-grok", "--no-progress", "--experiment", "ro",
         "--tracking-uri", uri], cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1", "GROKKING_TORCH_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        before = []  # (the CLI prints nothing else first; read on until the line, so a notice cannot break it)
        while "started MLflow run" not in (line := process.stderr.readline()):
            assert line, "".join(before) + process.stderr.read()
            before.append(line)
        run_id = line.split()[-1]
        client = MlflowClient(uri)
        deadline = time.monotonic() + 120
        while not client.get_metric_history(run_id, "loss/train"):  # training and delivering
            assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
            time.sleep(0.2)
        spool_mount.lock()
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 1 and len(lines) == 1, stderr
    assert lines[0].startswith("grokking-tracked: error:") and "Read-only file system" in lines[0], lines
    assert client.get_run(run_id).info.status == "FAILED"


# ------------------------------------------------------------------------------------------ sync --timeout
class _StallingApi(BaseHTTPRequestHandler):
    """/health answers; every API request is read and never answered (until the test ends)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/health"):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")
            return
        self.server.first_api_request = self.server.first_api_request or time.monotonic()
        if getattr(self.server, "unavailable", False):  # answer at once: 503, as a proxy whose backend is down
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.release.wait()

    do_POST = do_GET


def test_sync_timeout_bounds_run_look_ups_on_a_server_that_answers_health_but_stalls_the_api(
        tmp_path, monkeypatch, no_retries):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StallingApi)
    server.daemon_threads, server.first_api_request, server.release = True, None, threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    spool = tmp_path / "spool"
    monkeypatch.setenv("GROKKING_TRACKED_SPOOL", str(spool))
    writer = leftover_spool("a" * 32, spool_root_for(uri), [10, 20])
    # the user's MLflow client settings: the CLI's own (30 s a request, 2 retries), as a user would have them
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["GROKKING_TRACKED_SPOOL"] = str(spool)
    try:
        result = subprocess.run([sys.executable, "-m", "grokking_tracked", "sync", "--timeout", "5",
                                 "--tracking-uri", uri], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=150)
        ended = time.monotonic()
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
    assert server.first_api_request is not None  # it reached the run look-ups
    assert ended - server.first_api_request < 5 + 15, ended - server.first_api_request  # (MLflow alone: >= 90 s)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "sync timed out after 5 s" in lines[0] and "0 operations delivered" in lines[0], lines
    assert "no MLflow run" not in result.stderr
    assert len(entries(writer)) == 2  # nothing lost


# ------------------------------------------------------------------------------------------ no secret in the spool
PASSWORD = "pa'ss\"w:rd"


@pytest.mark.parametrize("uri", [
    f"http://alice:{PASSWORD}@mlflow.lab:5000/",
    "http://alice:pa%27ss%40w%2Frd@mlflow.lab:5000",
    "https://alice:pa'ss@w/rd@mlflow.lab/prefix?token=pa'ss@w/rd",
    f"postgresql://alice:{PASSWORD}@db.lab:5432/mlflow?password={PASSWORD}",
])
def test_no_credential_in_any_byte_or_name_the_spool_writes(tmp_path, monkeypatch, uri):
    monkeypatch.setenv("GROKKING_TRACKED_SPOOL", str(tmp_path / "spool"))
    root = spool_root_for(uri)
    writer, lock = new_writer_dir(root / "run", "r" * 32, uri)
    os.close(lock)
    record = json.loads((writer / "writer.json").read_text())
    assert record["run_id"] == "r" * 32 and record["server"].split("://")[0] in ("http", "https", "postgresql")
    for secret in ("pa'ss", "pa%27ss", "w:rd", "w/rd", "alice"):
        for path in (tmp_path / "spool").rglob("*"):
            assert secret not in str(path.relative_to(tmp_path))
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), (path, secret)


def test_a_database_stores_spool_is_named_without_its_password(tmp_path, monkeypatch):
    """The spool's folder name hashes the store's URI without its password: the same database under a changed
    password keeps its spool, and no byte of the name derives from the password."""
    monkeypatch.setenv("GROKKING_TRACKED_SPOOL", str(tmp_path))
    one = spool_root_for("postgresql://alice:first@db.lab:5432/mlflow?password=first")
    assert one == spool_root_for("postgresql://alice:second@db.lab:5432/mlflow")
    assert one != spool_root_for("postgresql://alice:first@db.lab:5432/other")


def test_sync_retries_a_run_look_up_while_the_server_is_away_and_never_calls_the_run_missing(
        tmp_path, monkeypatch, no_retries):
    """/health answers, the API answers 503: each run look-up is retried until --timeout, then the spool is counted
    pending (the server is away), not "no MLflow run"."""
    from grokking_tracked.tracking.runs import sync

    server = ThreadingHTTPServer(("127.0.0.1", 0), _StallingApi)
    server.daemon_threads, server.first_api_request, server.release = True, None, threading.Event()
    server.unavailable = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("GROKKING_TRACKED_SPOOL", str(tmp_path / "spool"))
    writer = leftover_spool("b" * 32, spool_root_for(uri), [10, 20, 30])
    try:
        started = time.monotonic()
        report = sync(uri, 3, echo=lambda line: None)
        took = time.monotonic() - started
    finally:
        server.shutdown()
        server.server_close()
    assert report.pending == 3 and report.delivered == 0 and not report.failed, report
    assert 3 <= took < 3 + 10, took
    assert len(entries(writer)) == 3
