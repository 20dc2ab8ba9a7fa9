"""The tracked run end to end: a real `mlflow server`, real subprocesses, a real SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow import MlflowClient

from conftest import free_port, run_cli
from grokking_tracked.config import preset
from grokking_tracked.tracking import run_experiment

# p=59 with half the pairs for training generalises in a few hundred steps: seconds on 2 cores.
FAST = ["--p", "59", "--train-frac", "0.5", "--eval-every", "10"]
CONTRACT_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm", "grad_norm")


def run_id_of(output: str) -> str:
    match = re.search(r"run id: ([0-9a-f]{32})", output)
    assert match, output
    return match.group(1)


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_run_end_to_end_against_a_server(mlflow_server, tmp_path):
    result = run_cli("run", *FAST, "--max-steps", "1500", "--checkpoint-every", "100", "--experiment", "e2e",
                     "--run-name", "fast", "--no-progress", "--tracking-uri", mlflow_server, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_id = run_id_of(result.stdout)
    assert re.search(r"memorized at step \d+, generalized at step \d+", result.stdout)
    assert not any(tmp_path.iterdir()), "artifacts must go to the server, not the working directory"

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "fast"
    params = run.data.params
    for key in ("p", "operation", "train_frac", "lr", "weight_decay", "seed", "d_model", "n_layers", "n_heads",
                "d_mlp", "max_steps"):
        assert key in params
    assert (params["p"], params["train_frac"], params["operation"], params["max_steps"]) == ("59", "0.5", "add", "1500")

    # every evaluation step exactly once, for every contract metric
    test_acc = client.get_metric_history(run_id, "test_acc")
    steps = [m.step for m in test_acc]
    assert steps[0] == 0 and steps == sorted(set(steps)) and all(s % 10 == 0 for s in steps)
    for key in CONTRACT_METRICS:
        assert steps_of(client, run_id, key) == steps

    # detection events: artifact, metrics and tag agree with the metric history
    scratch = tmp_path / "download"
    events = json.loads((client.download_artifacts(run_id, "events.json", str(scratch)) and
                         (scratch / "events.json").read_text()))
    names = [e["event"] for e in events]
    assert names[0] == "memorization" and names[-1] == "generalization" and len(names) == len(set(names))
    by_name = {e["event"]: e["step"] for e in events}
    first_general = min(m.step for m in test_acc if m.value >= 0.99)
    assert by_name["generalization"] == first_general
    assert run.data.metrics["generalization_step"] == first_general
    assert run.data.metrics["memorization_step"] == by_name["memorization"]
    assert run.data.tags["grokked"] == "true"
    # stop-on-grok: training ended a short margin after generalisation, not at max_steps
    assert steps[-1] == first_general + 200 < 1500

    config = json.loads(open(client.download_artifacts(run_id, "config.json", str(scratch))).read())
    assert config["p"] == 59 and config["train_frac"] == 0.5 and config["stop_on_grok"] is True

    checkpoints = sorted(a.path for a in client.list_artifacts(run_id, "checkpoints"))
    wanted = {f"checkpoints/step_{s:07d}.pt" for s in [0, *by_name.values(), steps[-1], 100]}
    assert wanted <= set(checkpoints)
    state = torch.load(client.download_artifacts(run_id, checkpoints[-1], str(scratch)), weights_only=True)
    assert {"model", "optimizer", "step", "rng", "config", "detector"} <= set(state)

    figures = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert figures == {"figures/learning_curves.png", "figures/norms.png", "figures/attention.png"}
    png = open(client.download_artifacts(run_id, "figures/learning_curves.png", str(scratch)), "rb").read()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_sigkilled_run_resumes_with_every_step_once(mlflow_server, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "grokking_tracked", "run", "--p", "59", "--eval-every", "10", "--max-steps", "1000",
         "--checkpoint-every", "100", "--no-stop-on-grok", "--experiment", "resume", "--no-progress"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ""
    while "started MLflow run" not in line:
        line = process.stderr.readline()
        assert line or process.poll() is None, "the run ended before announcing its id"
    run_id = line.split()[-1]
    client = MlflowClient(mlflow_server)
    deadline = time.time() + 240
    while max(steps_of(client, run_id, "test_acc"), default=0) < 300:
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert client.get_run(run_id).info.status == "RUNNING"  # killed hard: nothing could close it
    logged_before = steps_of(client, run_id, "test_acc")
    assert logged_before[-1] < 1000

    result = run_cli("run", "--resume", run_id, "--no-progress", cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": mlflow_server})  # the environment variable works as in MLflow
    assert result.returncode == 0, result.stderr
    assert run_id_of(result.stdout) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in CONTRACT_METRICS:
        assert steps_of(client, run_id, key) == list(range(0, 1001, 10)), key
    for key in ("memorization_step", "onset_step", "generalization_step"):
        assert len(client.get_metric_history(run_id, key)) <= 1
    assert "checkpoints/step_0001000.pt" in {a.path for a in client.list_artifacts(run_id, "checkpoints")}


def all_runs(store: str) -> list:
    client = MlflowClient(store)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("args, message", [
    (["--p", "2"], "p must be an integer in [3, 5,000], got 2"),
    (["--resume", "0123456789abcdef0123456789abcdef"], "no MLflow run with id"),
])
def test_bad_input_through_the_console_script_is_one_line_and_leaves_no_run(tmp_path, args, message):
    """The real console entry point in a subprocess (the full table runs in-process: tests/test_bad_input.py)."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_cli("run", *args, "--tracking-uri", store, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    if (tmp_path / "mlflow.db").exists():
        assert not all_runs(store)


def test_unreachable_tracking_server_fails_fast_with_one_line(tmp_path):
    started = time.monotonic()
    result = run_cli("run", "--tracking-uri", f"http://127.0.0.1:{free_port()}", cwd=tmp_path, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.strip().splitlines()
                                                  if "cannot reach the MLflow tracking server" in line]
    assert time.monotonic() - started < 60


def test_help_imports_no_heavy_module():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "grokking_tracked", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "run" in result.stdout and "ui" in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "mlflow", "transformer_lens", "optuna"}


def test_python_api_returns_run_id_and_history(local_store):
    config = preset("default", p=59, train_frac=0.5, max_steps=60, checkpoint_every=0)
    outcome = run_experiment(config, tracking_uri=local_store, experiment="api", progress=False)
    frame = outcome.history_frame()
    assert list(frame.index) == list(range(0, 61, 10))
    client = MlflowClient(local_store)
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(outcome.run_id, "test_acc")] == list(frame["test_acc"])


def test_failure_inside_training_ends_the_run_failed(local_store):
    class Boom(Exception):
        pass

    from grokking_tracked.train import Callback

    class Explode(Callback):
        def on_eval(self, trainer, step, metrics, events):
            if step == 20:
                raise Boom("simulated failure")

    config = preset("default", max_steps=100, checkpoint_every=0)
    run_ids = []
    with pytest.raises(Boom):
        run_experiment(config, tracking_uri=local_store, progress=False, callbacks=[Explode()],
                       on_run_started=run_ids.append)
    assert MlflowClient(local_store).get_run(run_ids[0]).info.status == "FAILED"
