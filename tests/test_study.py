"""Optuna studies end to end: real Optuna storages (SQLite, PostgreSQL), real MLflow (embedded and server),
the real CLI in subprocesses. Tiny tasks (p = 23, d_model 32, budgets of 60-150 steps) keep this quick;
tests assert behaviour, never timings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from conftest import run_cli

optuna = pytest.importorskip("optuna")
from mlflow import MlflowClient  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

ENV = {"GROKKING_TORCH_THREADS": "1"}

TINY = """
[study]
name = "{name}"
experiment = "studies-test"
n_trials = 3
heartbeat_interval = 1
grace_period = 3
max_retry = 2

[task]
p = 23
d_model = 32
d_mlp = 64
max_steps = {max_steps}
eval_every = 10
checkpoint_every = 0
stop_margin = 0

[objective]
target = "steps"
penalty_factor = 2.0

[search]
lr = {{ type = "float", low = 3e-3, high = 3e-2, log = true }}
train_frac = {{ type = "float", low = 0.4, high = 0.8 }}

[sampler]
name = "random"
seed = 1

[pruner]
{pruner}
"""


def write_spec(directory: Path, name: str, max_steps: int = 60, pruner: str = 'name = "none"',
               filename: str | None = None) -> Path:
    path = directory / (filename or f"{name}.toml")
    path.write_text(TINY.format(name=name, max_steps=max_steps, pruner=pruner))
    return path


def study_runs(client: MlflowClient, experiment: str, study_name: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`optuna.study_name` = '{study_name}'")
    parents = [r for r in runs if r.data.tags.get("grokking_tracked.role") == "study"]
    children = [r for r in runs if r.data.tags.get("grokking_tracked.role") == "trial"]
    return parents, children


def test_study_end_to_end_resume_and_pruning(tmp_path):
    """3 trials into the embedded stores; the same command again resumes to 4 with the same parent run;
    a pruned trial ends KILLED in MLflow with tag PRUNED."""
    spec = write_spec(tmp_path, "tiny")
    done = run_cli("study", str(spec), "--workers", "1", "--no-progress", cwd=tmp_path, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "parent run id:" in done.stdout

    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    study = optuna.load_study(study_name="tiny", storage=storage)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    for t in trials:  # the objective, from what the run measured: first step at >= 99 %, else 2 x the budget
        general = [m.step for m in client.get_metric_history(t.user_attrs["mlflow_run_id"], "accuracy/test")
                   if m.value >= 0.99]
        assert t.value == (general[0] if general else 120.0)
    parents, children = study_runs(client, "studies-test", "tiny")
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.sampler"] == "random" and parent.data.tags["optuna.pruner"] == "none"
    assert parent.data.tags["optuna.storage"] == storage
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    by_run = {r.info.run_id: r for r in children}
    for t in trials:
        run = by_run[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.data.tags["optuna.trial_state"] == "COMPLETE"
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])
        assert float(run.data.params["train_frac"]) == pytest.approx(t.params["train_frac"])
        assert run.data.params["p"] == "23"
        assert "accuracy/test" in run.data.metrics
    figures = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"optimization_history.png", "param_importances.png", "slice.png", "contour.png",
            "steps_vs_train_frac.png", "best_vs_baseline.png"} <= figures
    assert parent.data.metrics["n_complete"] == 3

    # Same study, a pruner that prunes at the first report: resume to 4 finished trials.
    pruning = write_spec(tmp_path, "tiny", pruner='name = "threshold"\nreport_every = 20\nupper = 1e-9',
                         filename="tiny_pruning.toml")
    again = run_cli("study", str(pruning), "--n-trials", "4", "--workers", "1", "--no-progress", cwd=tmp_path, env=ENV)
    assert again.returncode == 0, again.stderr[-2000:]
    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    assert len(trials) == 4 and trials[3].state == TrialState.PRUNED
    parents, children = study_runs(client, "studies-test", "tiny")
    assert len(parents) == 1 and parents[0].info.run_id == parent.info.run_id  # reused
    assert parents[0].info.status == "FINISHED"
    pruned = client.get_run(trials[3].user_attrs["mlflow_run_id"])
    assert pruned.info.status == "KILLED"
    assert pruned.data.tags["optuna.trial_state"] == "PRUNED"
    assert pruned.data.tags["optuna.pruned_step"] == "20"
    assert len(children) == 4


@pytest.mark.parametrize("target", ["seconds", "steps_vs_train_frac"])
def test_seconds_and_pareto_objectives(tmp_path, target):
    """The other two objectives: seconds to generalize (penalty: penalty_factor x the seconds trained) and the
    Pareto front of steps to generalize vs train fraction (two directions, a Pareto-front figure)."""
    spec = write_spec(tmp_path, target)
    spec.write_text(spec.read_text().replace('target = "steps"', f'target = "{target}"').replace("n_trials = 3",
                                                                                              "n_trials = 2"))
    done = run_cli("study", str(spec), "--workers", "1", "--no-progress", cwd=tmp_path, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    study = optuna.load_study(study_name=target, storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (parent,), children = study_runs(client, "studies-test", target)
    figures = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "figures")}
    for t in trials:
        attrs = t.user_attrs
        if target == "seconds":
            assert len(study.directions) == 1
            if attrs["generalized"]:
                assert 0 < t.value <= attrs["train_seconds"] + 1e-3
            else:
                assert t.value == pytest.approx(2.0 * attrs["train_seconds"], abs=2e-3)
        else:
            assert len(study.directions) == 2
            steps = attrs["generalization_step"] if attrs["generalized"] else 2.0 * 60
            assert t.values == [steps, pytest.approx(t.params["train_frac"])]
        run = client.get_run(attrs["mlflow_run_id"])
        assert run.data.tags["optuna.trial_state"] == "COMPLETE"
        assert run.data.tags["optuna.value"] == str(t.value if target == "seconds" else tuple(t.values))
    if target == "seconds":
        assert parent.data.tags["optuna.best_trial_number"] == str(study.best_trial.number)
        assert {"optimization_history.png", "best_vs_baseline.png"} <= figures
    else:
        assert "optuna.best_trial_number" not in parent.data.tags  # no single best on a Pareto front
        assert {"pareto_front.png", "steps_vs_train_frac.png"} <= figures


def test_two_workers_on_postgres(tmp_path, postgres_url, mlflow_server):
    """--workers 2 on one PostgreSQL study and one MLflow server: N trials, none duplicated, each in MLflow once."""
    spec = write_spec(tmp_path, "pg_workers")
    done = run_cli("study", str(spec), "--n-trials", "3", "--workers", "2", "--storage", postgres_url,
                   "--tracking-uri", mlflow_server, cwd=tmp_path, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 workers started" in done.stderr
    trials = optuna.load_study(study_name="pg_workers", storage=postgres_url).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # N means N (StopAtNTrials, SurplusTrial): a trial asked beyond N at the same moment trains nothing, ends FAIL
    assert len(finished) == 3
    surplus = [t for t in trials if t.user_attrs.get("fail_reason", "").startswith("surplus")]
    assert all(t.state == TrialState.FAIL for t in surplus) and len(finished) + len(surplus) == len(trials)
    trials = finished
    # (Whether both workers got a trial depends on how fast each started; tests/test_signals.py shows two
    # workers training at once, synchronised on the storage.)
    for t in trials:  # the documented objective, read from what the trial's run logged: first step at >= 99 %
        general = [m.step for m in MlflowClient(mlflow_server).get_metric_history(t.user_attrs["mlflow_run_id"],
                                                                                  "accuracy/test") if m.value >= 0.99]
        assert t.value == (general[0] if general else 2.0 * 60)
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(set(run_ids)) == len(trials)

    client = MlflowClient(mlflow_server)
    parents, children = study_runs(client, "studies-test", "pg_workers")
    assert len(parents) == 1
    assert sorted(r.info.run_id for r in children) == sorted(run_ids)  # every trial exactly once
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == sorted(t.number for t in trials)
    assert all(r.info.status == "FINISHED" for r in children)
    assert "postgresql" in parents[0].data.tags["optuna.storage"]


def test_sigkilled_worker_trial_is_failed_retried_and_closed(tmp_path, postgres_url, mlflow_server):
    """Two CLI processes join one study (as two machines would); one is SIGKILLed mid-trial. Heartbeats fail
    its trial, it is retried, the study reaches its count, and no MLflow run is left RUNNING."""
    spec = write_spec(tmp_path, "killed", max_steps=300)
    args = [sys.executable, "-m", "grokking_tracked", "study", str(spec), "--n-trials", "2", "--no-progress",
            "--workers", "1",
            "--storage", postgres_url, "--tracking-uri", mlflow_server]
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **ENV}
    victim = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def victims_running_trial():
        try:
            study = optuna.load_study(study_name="killed", storage=postgres_url)
        except KeyError:  # not created yet
            return None
        return next((t for t in study.get_trials(states=(TrialState.RUNNING,)) if "mlflow_run_id" in t.user_attrs),
                    None)

    try:
        deadline = time.time() + 180
        running = None
        while running is None:  # freeze the victim, look at the storage, kill it only if it is mid-trial
            assert time.time() < deadline and victim.poll() is None, "the victim never started a trial"
            victim.send_signal(signal.SIGSTOP)
            running = victims_running_trial()
            if running is None:  # between trials (or not started): let it go on
                victim.send_signal(signal.SIGCONT)
                time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)  # mid-trial: its run is open, its trial RUNNING
        victim.wait(30)
    finally:
        if victim.poll() is None:
            victim.kill()
    # Nobody else runs trials: whatever is RUNNING now is the dead victim's (it may have finished one before).
    study = optuna.load_study(study_name="killed", storage=postgres_url)
    assert [t.number for t in study.get_trials(states=(TrialState.RUNNING,))] == [running.number]
    # Until its heartbeat is older than the grace period the trial is not stale (the storage's own judgement):
    # a survivor starting earlier would leave it RUNNING. Wait for that state, not for a guessed delay.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        judge = optuna.storages.RDBStorage(postgres_url, heartbeat_interval=1, grace_period=3)
    study_id = judge.get_study_id_from_name("killed")
    deadline = time.time() + 60
    while running._trial_id not in judge._get_stale_trial_ids(study_id):
        assert time.time() < deadline, "the killed worker's trial never became stale"
        time.sleep(0.2)
    survivor = run_cli(*args[3:], cwd=tmp_path, env=ENV)
    assert survivor.returncode == 0, survivor.stderr[-2000:]

    trials = optuna.load_study(study_name="killed", storage=postgres_url).get_trials()
    states = {t.number: t.state for t in trials}
    assert states[running.number] == TrialState.FAIL
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states.values()) >= 2
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == running.number]
    assert retried and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == running.params

    client = MlflowClient(mlflow_server)
    killed_run = client.get_run(running.user_attrs["mlflow_run_id"])
    assert killed_run.info.status == "FAILED"
    assert killed_run.data.tags["optuna.trial_state"] == "FAIL"
    parents, children = study_runs(client, "studies-test", "killed")
    assert all(r.info.status != "RUNNING" for r in parents + children)
    assert {r.data.tags["optuna.retried_trial_number"] for r in children
            if "optuna.retried_trial_number" in r.data.tags} == {str(running.number)}


@pytest.mark.parametrize("where", ["storage", "tracking"])
def test_unreachable_storage_or_server_is_one_clear_line(tmp_path, where):
    spec = write_spec(tmp_path, "unreachable")
    option = (["--storage", "postgresql://postgres:secret@127.0.0.1:1/nowhere"] if where == "storage"
              else ["--tracking-uri", "http://127.0.0.1:1"])
    done = run_cli("study", str(spec), *option, cwd=tmp_path, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert ("cannot open the Optuna storage" if where == "storage" else "cannot reach the MLflow") in lines[0]
    assert "secret" not in done.stderr


def test_dashboard_serves_the_study_storage_on_loopback(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(study_name="for_dashboard", storage=storage)
    spec = write_spec(tmp_path, "for_dashboard")
    from conftest import free_port
    import requests

    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **ENV}
    body = None
    for _ in range(3):  # the port was free a moment ago; if another process took it first, the dashboard exits
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "grokking_tracked", "study", str(spec), "--dashboard",
                                   "--storage", storage, "--port", str(port)], cwd=tmp_path, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 90
            while time.time() < deadline and body is None and server.poll() is None:
                try:
                    body = requests.get(f"http://127.0.0.1:{port}/api/studies", timeout=2).json()
                except requests.RequestException:
                    time.sleep(0.5)
        finally:
            server.terminate()
            _, stderr = server.communicate(timeout=20)
        if body is not None or "address already in use" not in stderr.lower():
            break
    assert body is not None, stderr[-2000:]
    assert [s["study_name"] for s in body["study_summaries"]] == ["for_dashboard"]
