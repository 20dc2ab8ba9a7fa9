"""Local faults are bounded (issue 20): a spool that cannot be created or written is one line and a non-zero exit,
never a hang (a dangling link where the spool lives made `run` spin at 100 % CPU forever), and no run is created.
Real subprocesses with a timeout: a hang fails the test instead of hanging the suite."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TIMEOUT_S = 120  # the CLI's imports take ~10-20 s on a loaded machine; the old hang never ended
TINY_RUN = ["--p", "11", "--d-model", "16", "--d-mlp", "32", "--max-steps", "20", "--no-progress"]


def grokking_tracked(args: list[str], cwd: Path, **environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **environment}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "grokking_tracked", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def count_runs(database: Path) -> int:
    if not database.exists():
        return 0
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("select name from sqlite_master where type = 'table'")}
        return connection.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("grokking-tracked: error:") and "Traceback" not in result.stderr
    return lines[0]


def test_a_dangling_link_where_the_spool_lives_is_one_line_and_no_run(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / ".spool").symlink_to(tmp_path / "gone")  # the spool of a local store lives beside its database
    result = grokking_tracked(["run", *TINY_RUN, "--tracking-uri", f"sqlite:///{store}/mlflow.db"], tmp_path)
    line = one_error_line(result)
    assert "cannot create the spool" in line and "dangling link" in line, line
    assert count_runs(store / "mlflow.db") == 0


def test_a_writer_directory_under_a_dangling_link_is_refused_not_retried_forever(tmp_path):
    """The loop in spool.new_writer_dir that spun forever (it retried FileExistsError) now gives up at once."""
    (tmp_path / "run").symlink_to(tmp_path / "gone")
    code = textwrap.dedent(f"""
        from pathlib import Path
        from grokking_tracked.tracking.delivery.spool import SpoolUnusable, new_writer_dir
        try:
            new_writer_dir(Path({str(tmp_path / 'run')!r}) , "abc", "sqlite:///x.db")
        except SpoolUnusable as error:
            print("refused:", error)
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("refused: cannot create the spool"), result.stdout + result.stderr


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs, filled up (root only: skipped where mount is not allowed)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root) to simulate a full disk")
    try:
        filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: full
            pass
        finally:
            os.close(filler)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_under_the_spool_is_one_line_and_no_run(tmp_path, full_disk, mlflow_server):
    from mlflow import MlflowClient

    experiment = f"full-disk-{tmp_path.name}"
    result = grokking_tracked(["run", *TINY_RUN, "--experiment", experiment, "--tracking-uri", mlflow_server],
                              tmp_path, GROKKING_TRACKED_SPOOL=str(full_disk))
    line = one_error_line(result)
    assert "cannot" in line and "No space left on device" in line, line
    assert MlflowClient(mlflow_server).get_experiment_by_name(experiment) is None  # nothing created
