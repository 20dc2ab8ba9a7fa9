"""The tracked run end to end: a real `mlflow server`, real subprocesses, a real SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from conftest import run_cli
from grokking_tracked.tracking.names import to_mlflow
from grokking_tracked.cli import main as cli_main
from grokking_tracked.config import Config, preset
from grokking_tracked.tracking import resume_experiment, run_experiment
from grokking_tracked.train import Trainer

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
    test_acc = client.get_metric_history(run_id, "accuracy/test")
    steps = [m.step for m in test_acc]
    assert steps[0] == 0 and steps == sorted(set(steps)) and all(s % 10 == 0 for s in steps)
    for key in CONTRACT_METRICS:
        assert steps_of(client, run_id, to_mlflow(key)) == steps

    # detection events: artifact, metrics and tag agree with the metric history
    scratch = tmp_path / "download"
    events = json.loads((client.download_artifacts(run_id, "events.json", str(scratch)) and
                         (scratch / "events.json").read_text()))
    names = [e["event"] for e in events]
    assert names[0] == "memorization" and names[-1] == "generalization" and len(names) == len(set(names))
    by_name = {e["event"]: e["step"] for e in events}
    first_general = min(m.step for m in test_acc if m.value >= 0.99)
    assert by_name["generalization"] == first_general
    assert run.data.metrics["steps_to/generalization"] == first_general
    assert run.data.metrics["steps_to/memorization"] == by_name["memorization"]
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


# The resume test's task: memorised at 50, onset at 220, generalised at 430, stopped at 630 (~10 s of training).
RESUMED = ["--p", "59", "--train-frac", "0.35", "--eval-every", "10", "--checkpoint-every", "50"]
# The same task in minibatches of 450 of the 1,218 training pairs (3 steps an epoch, the last of 318): memorised at
# 120, onset at 310, generalised at 580, stopped at 780. Killed after the checkpoint at 200, it resumes from 200
# or 250, both inside an epoch: the sampler's permutation and position must come back from the checkpoint.
RESUMED_MINIBATCH = [*RESUMED, "--batch-size", "450"]


def checkpoint_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(int(a.path.rsplit("_", 1)[1].split(".")[0]) for a in client.list_artifacts(run_id, "checkpoints"))


def download_json(client: MlflowClient, run_id: str, path: str, scratch) -> object:
    return json.loads(open(client.download_artifacts(run_id, path, str(scratch))).read())


def assert_same_history(client: MlflowClient, run_id: str, expected: list[tuple[int, dict]]) -> None:
    """Every evaluation metric of the run, step by step, equals the uninterrupted training's (float tolerance)."""
    for key in expected[0][1]:
        logged = [(m.step, m.value) for m in client.get_metric_history(run_id, to_mlflow(key))]
        assert [s for s, _ in logged] == [s for s, _ in expected], key
        assert [v for _, v in logged] == pytest.approx([m[key] for _, m in expected], rel=1e-6, abs=1e-9), key


def assert_same_events(got: list[dict], expected: list[dict]) -> None:
    assert [(e["event"], e["step"]) for e in got] == [(e["event"], e["step"]) for e in expected]
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        assert {k: v for k, v in g.items() if k != "event"} == pytest.approx(
            {k: v for k, v in e.items() if k != "event"}, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("args, kill_after, end", [(RESUMED, 100, 630), (RESUMED_MINIBATCH, 200, 780)],
                         ids=["full-batch", "minibatch"])
def test_sigkilled_run_resumes_exactly_as_if_never_interrupted(mlflow_server, tmp_path, args, kill_after, end):
    """A real `run` SIGKILLed mid-training (after memorisation, before onset and generalisation), then
    `--resume`d: the whole metric history, the events (metrics and events.json) and the final weights equal an
    uninterrupted training of the same config; the resume started from the newest checkpoint, not from step 0."""
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "grokking_tracked", "run", *args, "--experiment", "resume", "--no-progress",
         "--tracking-uri", mlflow_server], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        line = ""
        while "started MLflow run" not in line:
            line = process.stderr.readline()
            assert line or process.poll() is None, "the run ended before announcing its id"
        run_id = line.split()[-1]
        client = MlflowClient(mlflow_server)
        # Observable state, not a delay: a checkpoint past memorisation is on the server and evaluations after it
        # are logged (the resume must skip those), well before onset (220; minibatch: 310) and the end.
        deadline = time.time() + 240
        while not (kill_after in checkpoint_steps(client, run_id)
                   and max(steps_of(client, run_id, "accuracy/test"), default=0) >= kill_after + 20):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, f"no checkpoint at step {kill_after} within 240 s"
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
        process.stderr.close()
    assert client.get_run(run_id).info.status == "RUNNING"  # killed hard: nothing could close it
    killed_at = max(steps_of(client, run_id, "accuracy/test"))
    assert killed_at < end, "the kill landed after the run ended"

    result = run_cli("run", "--resume", run_id, "--no-progress", cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": mlflow_server})  # the environment variable works as in MLflow
    assert result.returncode == 0, result.stderr
    assert run_id_of(result.stdout) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    resumed_from = json.loads(run.data.tags["grokking_tracked.resume.1"])["from_step"]
    assert kill_after <= resumed_from <= killed_at and resumed_from % 50 == 0  # a checkpoint, not step 0

    # The same config, trained without interruption (in-process: the same single-threaded CPU arithmetic).
    config = Config.from_dict(download_json(client, run_id, "config.json", tmp_path / "config"))
    trainer = Trainer(config, progress=False)
    whole = trainer.train()
    assert [e["event"] for e in whole.events] == ["memorization", "onset", "generalization"]
    assert whole.step_of("memorization") < killed_at < whole.step_of("onset")  # events on both sides of the kill
    assert_same_history(client, run_id, whole.history)
    for event in whole.events:  # each event metric exactly once, at the same step as uninterrupted
        key = f"steps_to/{event['event']}"
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == [(event["step"], event["step"])]
    assert_same_events(download_json(client, run_id, "events.json", tmp_path / "events"), whole.events)
    assert run.data.tags["grokked"] == "true"

    final = checkpoint_steps(client, run_id)[-1]
    assert final == whole.final_step
    state = torch.load(client.download_artifacts(run_id, f"checkpoints/step_{final:07d}.pt", str(tmp_path / "w")),
                       weights_only=True)
    assert state["step"] == whole.final_step
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-5, atol=1e-7, msg=name)


def all_runs(store: str) -> list:
    client = MlflowClient(store)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def count_runs(database: Path) -> int:
    if not database.exists():
        return 0
    with sqlite3.connect(database) as connection:
        return connection.execute("select count(*) from runs").fetchone()[0]


@pytest.mark.parametrize("args, message", [
    (["--p", "2"], "p must be an integer in [3, 5,000], got 2"),
    (["--resume", "0123456789abcdef0123456789abcdef"], "no MLflow run with id"),
])
def test_bad_input_through_the_console_script_is_one_line_and_creates_no_run(tmp_path, args, message):
    """The real console entry point in a subprocess (the full table runs in-process: tests/test_bad_input.py)."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_cli("run", *args, "--no-progress", "--tracking-uri", store, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert lines[0].startswith("grokking-tracked: error:")
    assert count_runs(tmp_path / "mlflow.db") == 0  # not even one created and ended FAILED
    assert not (tmp_path / "mlruns").exists()  # nothing fell back to the default store either


def test_unresponsive_tracking_server_fails_fast_with_one_line(tmp_path):
    """A server that accepts connections and never answers (the hard case of "unreachable": a refused connection
    fails at once). The command must fail within 45 s while the helper waits 120 s: MLflow's own client would
    wait its 30 s request timeout on each of its attempts (minutes with its default retries)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever reads or replies
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        result = run_cli("run", "--p", "23", "--max-steps", "20", "--no-progress", "--tracking-uri", uri,
                         cwd=tmp_path, timeout=120)
        elapsed = time.monotonic() - started
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the MLflow tracking server" in lines[0], result.stderr
    assert elapsed < 45, f"took {elapsed:.1f} s"
    assert not any(tmp_path.iterdir())  # no local store, no spool, no checkpoint written instead


# ------------------------------------------------------------------------ resume: cheap in-process checks
TINY = dict(p=23, d_model=32, d_mlp=64, train_frac=0.5, eval_every=10, checkpoint_every=10, stop_on_grok=False)


def artifact_file(client: MlflowClient, run_id: str, path: str) -> Path:
    """Where a local store keeps one of the run's artifacts (to damage it as a crash would)."""
    root = client.get_run(run_id).info.artifact_uri
    return Path(root.removeprefix("file://")) / path


def tiny_run(store: str, max_steps: int) -> str:
    return run_experiment(preset("default", **TINY, max_steps=max_steps), tracking_uri=store, experiment="resume",
                          progress=False).run_id


def test_resume_max_steps_extends_a_finished_run_as_if_trained_that_long(local_store):
    run_id = tiny_run(local_store, 40)
    outcome = resume_experiment(run_id, local_store, progress=False, max_steps=70)
    assert outcome.run_id == run_id and outcome.result.final_step == 70
    client = MlflowClient(local_store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_max_steps"] == "70"
    assert json.loads(run.data.tags["grokking_tracked.resume.1"])["from_step"] == 40
    assert json.loads(artifact_file(client, run_id, "config.json").read_text())["max_steps"] == 70
    longer = Trainer(preset("default", **TINY, max_steps=70), progress=False)
    assert_same_history(client, run_id, longer.train().history)
    assert checkpoint_steps(client, run_id)[-1] == 70
    state = torch.load(artifact_file(client, run_id, "checkpoints/step_0000070.pt"), weights_only=True)
    for name, value in longer.model.state_dict().items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_resume_skips_a_truncated_newest_checkpoint(local_store, capfd):
    run_id = tiny_run(local_store, 40)
    client = MlflowClient(local_store)
    newest = artifact_file(client, run_id, "checkpoints/step_0000040.pt")
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a kill mid-upload
    capfd.readouterr()
    outcome = resume_experiment(run_id, local_store, progress=False, max_steps=60)
    assert "skipping checkpoints/step_0000040.pt" in capfd.readouterr().err
    assert json.loads(client.get_run(run_id).data.tags["grokking_tracked.resume.1"])["from_step"] == 30
    assert outcome.result.final_step == 60
    # from step 30 the same trajectory as a 60-step run: steps 30-40 retrained (not logged twice), 50-60 new
    assert_same_history(client, run_id, Trainer(preset("default", **TINY, max_steps=60), progress=False).train().history)


def test_options_other_than_max_steps_are_refused_with_resume(local_store, capsys, monkeypatch):
    """Each refused in one line before anything changes: the run keeps its status, history and tags."""
    run_id = tiny_run(local_store, 20)
    client = MlflowClient(local_store)
    before = client.get_run(run_id)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = signal.getsignal(signal.SIGTERM)  # main() installs the CLI's handler
    for options, named in [(["--lr", "0.1"], "--lr"), (["--preset", "seed"], "--preset"),
                           (["--set", "seed=3"], "--seed"), (["--p", "29", "--max-steps", "40"], "--p")]:
        capsys.readouterr()
        try:
            with pytest.raises(SystemExit) as exit_info:
                cli_main(["run", "--resume", run_id, *options, "--no-progress", "--tracking-uri", local_store])
        finally:
            signal.signal(signal.SIGTERM, previous)
        assert exit_info.value.code != 0
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and "only --max-steps may be given" in lines[0] and named in lines[0], lines
    after = client.get_run(run_id)
    assert (after.info.status, after.data.tags, after.data.metrics) == (before.info.status, before.data.tags,
                                                                       before.data.metrics)
    assert [m.step for m in client.get_metric_history(run_id, "accuracy/test")] == [0, 10, 20]
    assert len(all_runs(local_store)) == 1
