"""Where a spool lives, and leftover spools of several writers of one run delivered in their order.

No server needed: a leftover spool is made by an outbox whose server is a closed loopback port, then
delivered into a real local SQLite store.
"""

from __future__ import annotations

import threading
from pathlib import Path

from mlflow import MlflowClient

from conftest import free_port
from grokking_tracked.tracking.delivery.outbox import Outbox, deliver_spool, run_spool_dir
from grokking_tracked.tracking.delivery.spool import SPOOL_ENV, spool_root_for


def test_local_store_spools_beside_its_database(tmp_path, monkeypatch):
    assert spool_root_for(f"sqlite:///{tmp_path}/store/mlflow.db") == tmp_path / "store" / ".spool"
    monkeypatch.chdir(tmp_path)
    assert spool_root_for("sqlite:///mlruns/mlflow.db") == tmp_path / "mlruns" / ".spool"


def test_remote_server_spools_in_a_per_server_local_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(SPOOL_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "grokking-tracked" / "spool"
    assert spool_root_for("http://mlflow.lab:5000") == cache / "mlflow.lab_5000"
    assert spool_root_for("https://mlflow.lab") == cache / "mlflow.lab_443"
    monkeypatch.setenv(SPOOL_ENV, str(tmp_path / "mine"))
    assert spool_root_for("http://alice:s3cret@mlflow.lab:5000/") == tmp_path / "mine" / "mlflow.lab_5000"
    database = spool_root_for("postgresql://alice:s3cret@db.lab/mlflow")
    assert database.parent == tmp_path / "mine" and "s3cret" not in str(database)
    assert database != spool_root_for("postgresql://alice:s3cret@db.lab/other")


def test_leftover_spools_of_two_writers_of_one_run_are_delivered_oldest_first(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    store = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = store.create_run(store.create_experiment("spool")).info.run_id
    away = MlflowClient(f"http://127.0.0.1:{free_port()}")  # nothing listens: every request is refused
    spool_root, lines = tmp_path / "spool", []
    for who, step in (("first", 10), ("second", 20)):
        outbox = Outbox(away, run_id, spool_root=spool_root, echo=lines.append)
        outbox.set_tags({"writer": who})
        outbox.log_metrics({"train_loss": step / 100}, step)
        assert outbox.wait(timeout=0.5) is False
        outbox.close()
    assert len(lines) == 2 and all("connection refused" in line for line in lines)
    writers = sorted(p for p in run_spool_dir(spool_root, run_id).iterdir())
    assert len(writers) == 2

    report = deliver_spool(store, spool_root, timeout=30)
    assert report.complete and report.delivered == 4 and not report.busy
    assert store.get_run(run_id).data.tags["writer"] == "second"  # the later writer's value is the last
    assert [m.step for m in store.get_metric_history(run_id, "train_loss")] == [10, 20]
    assert not any(Path(p).exists() for p in writers)


def test_close_releases_a_caller_waiting_without_a_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    away = MlflowClient(f"http://127.0.0.1:{free_port()}")
    outbox = Outbox(away, "0" * 32, spool_root=tmp_path, echo=lambda line: None)
    outbox.log_metrics({"train_loss": 1.0}, 10)
    result = []
    waiter = threading.Thread(target=lambda: result.append(outbox.wait()), daemon=True)  # no timeout
    waiter.start()
    outbox.close()  # e.g. on Ctrl-C: the run is over, what is pending stays in the spool
    waiter.join(30)
    assert result == [False] and outbox.pending == 1
