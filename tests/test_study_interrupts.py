"""An interrupt leaves a study consistent (issue 27 item 5): Ctrl-C (SIGINT to the process group) or SIGTERM to a
study with 2 workers, sent once the storage shows trials running and one finished. After it: no trial RUNNING in
Optuna and no run RUNNING in MLflow; every trial that was running is FAIL and its run KILLED; a trial that
finished keeps its figures or says it lacks them (tag ``grokking_tracked.missing.figures``); no traceback reaches
the terminal (the figure processes and Optuna's log included). Real subprocesses, synchronised on the stores."""

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

SPEC = """
[study]
name = "interrupted"
experiment = "interrupts"
n_trials = 40

[task]
p = 23
d_model = 32
d_mlp = 64
max_steps = 120
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


def start(tmp_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONUNBUFFERED="1", GROKKING_TORCH_THREADS="1")
    (tmp_path / "spec.toml").write_text(SPEC)
    return subprocess.Popen([sys.executable, "-m", "grokking_tracked", "study", "spec.toml", "--workers", "2",
                             "--no-progress"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # a terminal's foreground group of its own


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_two_worker_study_leaves_no_trial_running_and_no_traceback(tmp_path, signum):
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    process = start(tmp_path)

    def trials(*states):
        try:
            return optuna.load_study(study_name="interrupted", storage=storage).get_trials(states=states or None)
        except Exception:  # noqa: BLE001 - the storage or the study does not exist yet
            return []

    try:
        client = None
        deadline = time.time() + 600
        while True:  # two trials training (metrics logged) and at least one finished: then the signal
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.time() < deadline, "never two trials training after one finished"
            running = [t for t in trials(TrialState.RUNNING) if "mlflow_run_id" in t.user_attrs]
            if len(running) == 2 and trials(TrialState.COMPLETE):
                client = client or MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
                if all(client.get_metric_history(t.user_attrs["mlflow_run_id"], "accuracy/test") for t in running):
                    break
            time.sleep(0.2)
        if signum == signal.SIGINT:
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        else:
            process.send_signal(signal.SIGTERM)  # `kill PID`
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode in (130, 143), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-5000:]

    after = {t.number: t for t in trials()}
    assert not [n for n, t in after.items() if t.state == TrialState.RUNNING], stderr[-3000:]
    for trial in running:  # interrupted: FAIL, run KILLED (or it finished just before the signal reached it)
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert (after[trial.number].state, run.info.status) in {(TrialState.FAIL, "KILLED"),
                                                                 (TrialState.COMPLETE, "FINISHED")}
        if run.info.status == "KILLED":
            assert run.data.tags["optuna.trial_state"] == "FAIL"
    for trial in (t for t in after.values() if t.state == TrialState.COMPLETE):
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        figures = client.list_artifacts(run.info.run_id, "figures")
        assert figures or "grokking_tracked.missing.figures" in run.data.tags, trial.number
    runs = client.search_runs([client.get_experiment_by_name("interrupts").experiment_id])
    assert all(r.info.status != "RUNNING" for r in runs)


def test_the_trials_an_interrupt_left_running_in_this_invocations_workers_end_fail_and_killed(tmp_path):
    """The sweep after an interrupt (``fail_interrupted_trials``): a worker stopped between its training and Optuna's
    ``tell`` left its trial RUNNING and its run open. Only this invocation's workers' trials are ended."""
    from grokking_tracked.study.workers import fail_interrupted_trials

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("sweep")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="sweep")
    mine, other = study.ask(), study.ask()
    for trial, worker in ((mine, "host:1"), (other, "host:2")):  # RUNNING, each with its open run
        run = client.create_run(experiment, tags={"optuna.trial_number": str(trial.number)})
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
    fail_interrupted_trials(study, client, {"host:1", "host:3"})
    after = {t.number: t for t in study.get_trials()}
    assert after[mine.number].state == TrialState.FAIL and after[other.number].state == TrialState.RUNNING
    killed = client.get_run(mine.user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED" and killed.data.tags["optuna.trial_state"] == "FAIL"
    assert client.get_run(other.user_attrs["mlflow_run_id"]).info.status == "RUNNING"
