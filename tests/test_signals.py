"""Ctrl-C and SIGTERM end work cleanly: real `grokking_tracked` subprocesses, real signals, synchronised on what
the stores show (a run's logged steps, a trial's state), never on a delay. A run so interrupted ends KILLED in
MLflow -- not RUNNING (as if the process had crashed) and not FINISHED (as if training had completed) -- and a
study's interrupted trials are not left RUNNING in Optuna's storage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

# Training that cannot end by itself while the test looks: no stop on generalisation, a huge budget.
ENDLESS = ["--p", "23", "--d-model", "32", "--d-mlp", "64", "--eval-every", "10", "--checkpoint-every", "0",
           "--max-steps", "1000000", "--no-stop-on-grok"]


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONUNBUFFERED": "1", "GROKKING_TORCH_THREADS": "1"}


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """In a session of its own, as a command started from a terminal: Ctrl-C is SIGINT to that process group."""
    return subprocess.Popen([sys.executable, "-m", "grokking_tracked", *args], cwd=cwd, env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def deliver(process: subprocess.Popen, signum: int) -> None:
    if signum == signal.SIGINT:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
    else:
        process.send_signal(signum)  # `kill PID`, a scheduler's or container's stop


def wait_until(condition, process: subprocess.Popen, what: str, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, f"the process ended before {what}: {process.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.2)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return process.returncode, stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_ends_a_training_run_killed(tmp_path, signum):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    process = start(["run", *ENDLESS, "--no-progress", "--tracking-uri", store], tmp_path)
    try:
        line = ""
        while "started MLflow run" not in line:
            line = process.stderr.readline()
            assert line or process.poll() is None, "the run ended before announcing its id"
        run_id = line.split()[-1]
        client = MlflowClient(store)
        wait_until(lambda: len(client.get_metric_history(run_id, "accuracy/test")) >= 3, process, "evaluations logged")
        assert client.get_run(run_id).info.status == "RUNNING"
        deliver(process, signum)
    finally:
        code, stderr = finish(process)
    assert code == 128 + signum, stderr
    assert "Traceback" not in stderr, stderr
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    logged = [m.step for m in client.get_metric_history(run_id, "accuracy/test")]
    assert logged == list(range(0, logged[-1] + 1, 10)) and logged[-1] < 1_000_000  # what it measured stays


SPEC = """
[study]
name = "interrupted"
experiment = "signals"
n_trials = 4

[task]
p = 23
d_model = 32
d_mlp = 64
max_steps = 1000000
eval_every = 10
checkpoint_every = 0
stop_on_grok = false

[search]
lr = { type = "float", low = 3e-3, high = 3e-2, log = true }

[sampler]
name = "random"
seed = 1

[pruner]
name = "none"
"""


@pytest.mark.slow
def test_ctrl_c_ends_a_studys_workers_trials_killed_and_none_left_running(tmp_path):
    """Two spawned workers training one trial each; Ctrl-C (SIGINT to the process group). Every trial that was
    running ends FAIL in Optuna, its MLflow run KILLED; the parent run is closed KILLED as well."""
    spec = tmp_path / "interrupted.toml"
    spec.write_text(SPEC)
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    process = start(["study", str(spec), "--workers", "2", "--no-progress"], tmp_path)

    def running_trials():
        try:
            study = optuna.load_study(study_name="interrupted", storage=storage)
        except Exception:  # noqa: BLE001 - the storage or the study does not exist yet
            return []
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if "mlflow_run_id" in t.user_attrs]

    try:
        # the store's tables exist once trials run: a client opened earlier would race the command to create them
        wait_until(lambda: len(running_trials()) == 2, process, "two trials running")
        client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
        wait_until(lambda: len(running_trials()) == 2 and all(
            client.get_metric_history(t.user_attrs["mlflow_run_id"], "accuracy/test") for t in running_trials()),
            process, "two trials training")
        interrupted = running_trials()
        assert len({t.user_attrs["worker"] for t in interrupted}) == 2  # two workers training at once
        assert interrupted[0].params != interrupted[1].params  # a seeded sampler, yet not the same draws
        deliver(process, signal.SIGINT)
    finally:
        code, stderr = finish(process)
    assert code == 130, stderr  # the parent's Ctrl-C exit

    trials = optuna.load_study(study_name="interrupted", storage=storage).get_trials()
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    assert {t.number: t.state for t in trials if t.number in {i.number for i in interrupted}} == {
        i.number: TrialState.FAIL for i in interrupted}
    for trial in interrupted:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED"
        assert run.data.tags["optuna.trial_state"] == "FAIL"
    parent = client.get_run(optuna.load_study(study_name="interrupted", storage=storage)
                            .user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "KILLED"
    runs = client.search_runs([client.get_experiment_by_name("signals").experiment_id])
    assert all(r.info.status != "RUNNING" for r in runs)
