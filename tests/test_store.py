"""A new local store is created by a separate process while the command imports torch (store.start_creating),
and the command's own connect() opens it complete: real processes, real MLflow migrations."""

from __future__ import annotations

import fcntl
import time

from grokking_tracked.tracking.store import connect, ensure_experiment, start_creating


def held_by_another_process(lock_path) -> bool:
    if not lock_path.exists():
        return False
    with open(lock_path) as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
        return False


def test_a_store_being_created_by_another_process_is_opened_complete(tmp_path):
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    creator = start_creating(uri)
    assert creator is not None
    lock = tmp_path / "store" / ".open.lock"
    deadline = time.monotonic() + 120
    while not held_by_another_process(lock):  # the creator is migrating the new database now
        assert creator.poll() is None, "the creating process ended before it took the store's lock"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client = connect(uri)  # opened in the middle of the creator's migrations
    assert [e.name for e in client.search_experiments()] == ["Default"]
    run = client.create_run(ensure_experiment(client, "grokking"))
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert creator.wait(timeout=120) == 0


def test_nothing_is_started_for_a_store_that_exists_or_a_server(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    connect(uri)
    assert start_creating(uri) is None
    assert start_creating("http://127.0.0.1:1") is None


def test_an_unreachable_server_is_reported_before_torch_loads(tmp_path):
    """`run` and `study` check the server before their heavy imports: the error comes in well under a second
    instead of after torch and TransformerLens have loaded."""
    import subprocess
    import sys
    from pathlib import Path

    spec = Path(__file__).resolve().parents[1] / "studies" / "fastest_grokking.toml"
    for command in (["run"], ["study", str(spec)]):
        script = ("import sys\nfrom grokking_tracked.cli import main\ntry:\n"
                  f"    main({command + ['--tracking-uri', 'http://127.0.0.1:1', '--no-progress']!r})\n"
                  "except SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)\n")
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.stdout.split() == ["1", "False"], (command, done.stdout, done.stderr)
        assert done.stderr.strip() == ("grokking-tracked: error: cannot reach the MLflow tracking server at "
                                       "http://127.0.0.1:1 (ConnectionError)")
