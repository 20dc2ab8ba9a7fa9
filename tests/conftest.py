"""Shared fixtures: a real MLflow tracking server and real PostgreSQL databases on loopback.

The server takes ~25 s to start here, so one is started per test session. Where a service is absent
on a developer laptop the tests that need it skip with a reason; under CI=true they fail instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import torch

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# A suite started in the background by a shell without job control (`cmd &`, nohup) inherits SIGINT ignored, and
# so would every process it spawns: Python then installs no KeyboardInterrupt handler and the Ctrl-C tests' signal
# is dropped. Restore Python's own handler so the spawned commands start with SIGINT at its default, as from a
# terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
PG_DSN = dict(host=os.environ.get("PGHOST", "127.0.0.1"), port=int(os.environ.get("PGPORT", "5432")),
              user=os.environ.get("PGUSER", "postgres"))


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def private_spool(tmp_path_factory):
    """Spools of runs against test servers stay in the test session's temp dir, not in ~/.cache."""
    previous = os.environ.get("GROKKING_TRACKED_SPOOL")
    os.environ["GROKKING_TRACKED_SPOOL"] = str(tmp_path_factory.mktemp("spool"))
    yield
    if previous is None:
        os.environ.pop("GROKKING_TRACKED_SPOOL", None)
    else:
        os.environ["GROKKING_TRACKED_SPOOL"] = previous


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test on one torch thread, as the trainer uses on the CPU (two threads of tiny ops on 2 shared
    cores wait on each other and run many times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_mlflow_server(root: Path, attempt: int):
    """One try: a server on a port that was free a moment ago. Another process may take the port in between
    (mlflow server cannot be handed a bound socket): returns None when that happened, so the caller retries."""
    port = free_port()
    log_path = root / f"server-{attempt}.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            log.close()
            text = log_path.read_text()
            if "address already in use" in text.lower() or "errno 98" in text.lower():
                return None
            unavailable(f"mlflow server exited early: {text[-500:]}")
        try:
            if requests.get(f"{uri}/health", timeout=2).ok and _serves_our_store(uri, root):
                return process, uri, log
        except requests.RequestException:
            pass
        time.sleep(0.5)
    process.kill()
    log.close()
    unavailable("mlflow server did not answer /health within 180 s")


def _serves_our_store(uri: str, root: Path) -> bool:
    """Whoever answers on the port writes into our database (not a server of another session that took it)."""
    import sqlite3

    name = f"conftest-probe-{uuid.uuid4().hex[:8]}"
    response = requests.post(f"{uri}/api/2.0/mlflow/experiments/create", json={"name": name}, timeout=10)
    if not response.ok or not (root / "mlflow.db").exists():
        return False
    with sqlite3.connect(root / "mlflow.db") as connection:
        found = connection.execute("select count(*) from experiments where name = ?", (name,)).fetchone()[0]
    if found:
        requests.post(f"{uri}/api/2.0/mlflow/experiments/delete",
                      json={"experiment_id": response.json()["experiment_id"]}, timeout=10)
    return bool(found)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """URI of a real `mlflow server` (SQLite backend, proxied artifacts) in a temp dir."""
    root = tmp_path_factory.mktemp("mlflow-server")
    for attempt in range(3):
        started = _start_mlflow_server(root, attempt)
        if started is not None:
            break
    else:
        unavailable("mlflow server: every port tried was taken before the server could bind it")
    process, uri, log = started
    yield uri
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(autouse=True)
def process_environment():
    """What a test changes process-wide is undone after it: the environment (the CLI's ``configure_process`` sets
    ``MLFLOW_HTTP_*`` for its process; a test calling ``main()`` in-process must not pass them on) and the
    SIGTERM handler ``main()`` installs."""
    import signal

    environment = dict(os.environ)
    sigterm = signal.getsignal(signal.SIGTERM)
    yield
    if dict(os.environ) != environment:
        os.environ.clear()
        os.environ.update(environment)
    signal.signal(signal.SIGTERM, sigterm)


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database per test, dropped afterwards, as the README spells the URL:
    ``postgresql://user@host:port/db`` (SQLAlchemy's default driver for it, psycopg 3)."""
    import psycopg

    try:
        admin = psycopg.connect(dbname="postgres", connect_timeout=3, autocommit=True, **PG_DSN)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL not reachable at {PG_DSN['host']}:{PG_DSN['port']}: {str(exc).strip()}")
    name = f"gt_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://{PG_DSN['user']}@{PG_DSN['host']}:{PG_DSN['port']}/{name}"
    with admin.cursor() as cursor:
        cursor.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.close()


@pytest.fixture
def local_store(tmp_path) -> str:
    """A private embedded store (SQLite + local artifacts) for tests that need no server."""
    return f"sqlite:///{tmp_path}/mlflow.db"


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
            ) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # only what the test says
    # one torch thread, as the in-process tests (one_torch_thread): a lone `run` would take every core, and two
    # threads of tiny ops on shared cores wait on each other; a test that wants the default passes it as ""
    full_env.update({"PYTHONUNBUFFERED": "1", "GROKKING_TORCH_THREADS": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "grokking_tracked", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
