"""Durable tracking end to end: real `grokking-tracked` processes talk to a real `mlflow server` through our
fault-injecting proxy (tests/faultproxy.py). Outages in the middle of a run lose nothing, a run whose lease is
live cannot be resumed twice, and a lying server cannot make us touch local files.

Synchronisation is on observable state only: steps stored on the server (read directly, not through the
proxy), the spool's entries on disk, the lines a process prints, the proxy's counters."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from conftest import run_cli
from grokking_tracked.tracking.names import to_mlflow
from faultproxy import FaultProxy, MlflowServer

EVAL_EVERY, CHECKPOINT_EVERY = 10, 200
STEPS = 1400  # ~20-60 s of training on 2 shared cores: long enough for an outage in its middle
TASK = ["--p", "59", "--train-frac", "0.5", "--d-model", "32", "--d-mlp", "128", "--eval-every", str(EVAL_EVERY),
        "--checkpoint-every", str(CHECKPOINT_EVERY), "--max-steps", str(STEPS), "--no-stop-on-grok", "--no-progress"]
# MLflow's own retries off: the outbox's back-off is what is under test, and an outage shows in seconds.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
              "GROKKING_TORCH_THREADS": "1"}
WAIT = 240  # seconds any single condition may take on a loaded 2-core machine


def wait_for(condition, what: str, timeout: float = WAIT, process: "RunProcess | None" = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.popen.poll() is not None and not condition():
            raise AssertionError(f"the process ended before {what}: {process.stderr()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class RunProcess:
    """A real `grokking-tracked run` subprocess whose stderr lines are collected as they come."""

    def __init__(self, args: list[str], cwd: Path, env: dict):
        full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        full_env.update({"PYTHONUNBUFFERED": "1", **CLIENT_ENV, **env})
        self.popen = subprocess.Popen([sys.executable, "-m", "grokking_tracked", "run", *args], cwd=cwd,
                                      env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.out: list[str] = []
        threading.Thread(target=self._read, args=(self.popen.stderr, self.lines), daemon=True).start()
        threading.Thread(target=self._read, args=(self.popen.stdout, self.out), daemon=True).start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def stderr(self) -> str:
        return "\n".join(self.lines)

    def run_id(self) -> str:
        line = wait_for(lambda: next((l for l in self.lines if "started MLflow run" in l), None), "the run id",
                        process=self)
        return line.split()[-1]

    def finish(self, timeout: float = 600) -> int:
        code = self.popen.wait(timeout)
        time.sleep(0)  # let the reader threads drain (they end with the pipes)
        return code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A dedicated server this module may kill and restart on the same store."""
    instance = MlflowServer(tmp_path_factory.mktemp("durable-server")).start()
    yield instance
    instance.stop()


@pytest.fixture
def proxy(server):
    with FaultProxy(server.url) as instance:
        yield instance


@pytest.fixture
def spool(tmp_path):
    return tmp_path / "spool"


def stored_steps(server: MlflowServer, run_id: str, key: str = "accuracy/test") -> list[int]:
    return [m.step for m in MlflowClient(server.url).get_metric_history(run_id, key)]


def spool_entries(spool: Path) -> int:
    return sum(1 for p in spool.rglob("*.json") if re.fullmatch(r"\d{10}\.json", p.name))


def outage_lines(process: RunProcess) -> list[str]:
    return [l for l in process.lines if "tracking server unreachable" in l or "reachable again" in l]


def assert_complete(server: MlflowServer, run_id: str, tmp_path: Path) -> None:
    """FINISHED, every evaluation step exactly once for every metric, every checkpoint, figures and tags."""
    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    expected = list(range(0, STEPS + 1, EVAL_EVERY))
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm", "grad_norm"):
        assert stored_steps(server, run_id, to_mlflow(key)) == expected, key
    checkpoints = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert {f"checkpoints/step_{s:07d}.pt" for s in range(0, STEPS + 1, CHECKPOINT_EVERY)} <= checkpoints
    assert {a.path for a in client.list_artifacts(run_id, "figures")} == {
        "figures/learning_curves.png", "figures/norms.png", "figures/attention.png"}
    assert run.data.tags["grokked"] in ("true", "false") and run.data.params["max_steps"] == str(STEPS)
    events = json.loads(Path(client.download_artifacts(run_id, "events.json", str(tmp_path))).read_text())
    assert [e["event"] for e in events][:1] == ["memorization"]


@pytest.mark.slow
def test_a_blackout_and_refused_uploads_mid_run_lose_nothing(server, proxy, spool, tmp_path):
    process = RunProcess([*TASK, "--tracking-uri", proxy.url, "--experiment", "durable"], tmp_path,
                         {"GROKKING_TRACKED_SPOOL": str(spool)})
    run_id = process.run_id()
    wait_for(lambda: len(stored_steps(server, run_id)) >= 20, "200 steps on the server", process=process)
    proxy.blackout("reset")
    wait_for(lambda: outage_lines(process), "the unreachable line", process=process)
    before = spool_entries(spool)
    wait_for(lambda: spool_entries(spool) >= before + 10, "ten more entries spooled during the blackout",
             process=process)
    proxy.restore()
    wait_for(lambda: len(outage_lines(process)) == 2, "the reachable-again line", process=process)
    proxy.refuse_uploads(507)  # the server's artifact disk is full for a while
    wait_for(lambda: proxy.stats["refused_uploads"] >= 2 or process.popen.poll() is not None,
             "a refused upload", process=process)
    proxy.refuse_uploads(None)
    assert process.finish() == 0, process.stderr()
    assert re.search(r"run id: [0-9a-f]{32}", "\n".join(process.out))
    assert_complete(server, run_id, tmp_path)
    assert proxy.stats["refused_connections"] + proxy.stats["dropped"] > 0
    assert [l for l in process.lines if "unreachable" in l][0].startswith("grokking-tracked: tracking server unreachable")
    assert spool_entries(spool) == 0  # delivered spools are removed


@pytest.mark.slow
def test_the_server_killed_and_restarted_mid_run_loses_nothing(server, proxy, spool, tmp_path):
    process = RunProcess([*TASK, "--tracking-uri", proxy.url, "--experiment", "durable"], tmp_path,
                         {"GROKKING_TRACKED_SPOOL": str(spool), "GROKKING_TRACKED_DELIVERY_WAIT": "600"})
    run_id = process.run_id()
    wait_for(lambda: len(stored_steps(server, run_id)) >= 20, "200 steps on the server", process=process)
    server.kill()
    wait_for(lambda: outage_lines(process), "the unreachable line", process=process)
    server.start()  # same backend store and artifact root, a new port
    proxy.retarget(server.url)
    assert process.finish() == 0, process.stderr()
    assert len(outage_lines(process)) == 2, process.stderr()
    assert_complete(server, run_id, tmp_path)


@pytest.mark.slow
def test_a_server_still_away_at_the_end_keeps_the_spool_and_sync_delivers_it(server, proxy, spool, tmp_path):
    process = RunProcess([*TASK, "--max-steps", "300", "--tracking-uri", proxy.url, "--experiment", "durable"],
                         tmp_path, {"GROKKING_TRACKED_SPOOL": str(spool), "GROKKING_TRACKED_DELIVERY_WAIT": "3"})
    run_id = process.run_id()
    wait_for(lambda: stored_steps(server, run_id), "a first evaluation on the server", process=process)
    proxy.blackout("reset")
    code = process.finish()
    assert code != 0
    final = process.lines[-1]
    assert "safe in" in final and str(spool) in final and "grokking-tracked sync" in final, process.stderr()
    assert MlflowClient(server.url).get_run(run_id).info.status == "RUNNING"  # never finished before its data
    assert spool_entries(spool) > 0
    proxy.restore()
    synced = run_cli("sync", "--tracking-uri", proxy.url, cwd=tmp_path,
                     env={**CLIENT_ENV, "GROKKING_TRACKED_SPOOL": str(spool)})
    assert synced.returncode == 0, synced.stderr
    run = MlflowClient(server.url).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert stored_steps(server, run_id) == list(range(0, 301, EVAL_EVERY))
    assert spool_entries(spool) == 0


@pytest.mark.slow
def test_resume_is_refused_while_the_run_trains_and_works_at_once_after_kill_9(server, spool, tmp_path):
    env = {"GROKKING_TRACKED_SPOOL": str(spool)}
    first = RunProcess([*TASK, "--max-steps", "20000", "--tracking-uri", server.url, "--experiment", "lease"],
                       tmp_path, env)
    run_id = first.run_id()
    wait_for(lambda: MlflowClient(server.url).list_artifacts(run_id, "checkpoints"), "a first checkpoint",
             process=first)
    second = run_cli("run", "--resume", run_id, "--no-progress", "--tracking-uri", server.url, cwd=tmp_path,
                     env={**CLIENT_ENV, **env})
    assert second.returncode != 0
    lines = [l for l in second.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "still being written" in lines[0] and str(first.popen.pid) in lines[0], lines
    assert first.popen.poll() is None  # the first one never noticed
    first.popen.send_signal(signal.SIGKILL)
    first.finish()
    resumed = run_cli("run", "--resume", run_id, "--max-steps", "400", "--no-progress", "--tracking-uri",
                      server.url, cwd=tmp_path, env={**CLIENT_ENV, **env})
    assert resumed.returncode == 0, resumed.stderr
    run = MlflowClient(server.url).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.tags["grokking_tracked.lease"])["released"] is True


def test_a_server_naming_a_local_artifact_path_cannot_make_analyze_touch_it(server, proxy, tmp_path):
    from grokking_tracked.config import preset
    from grokking_tracked.tracking import run_experiment

    outcome = run_experiment(preset("default", p=23, d_model=32, d_mlp=64, max_steps=40, checkpoint_every=20),
                             tracking_uri=server.url, experiment="liar", progress=False)
    victim = tmp_path / "victim"
    (victim / "analysis").mkdir(parents=True)
    (victim / "analysis" / "keep.txt").write_text("precious")
    (victim / "checkpoints").mkdir()
    torch.save({"model": {}, "config": {}}, victim / "checkpoints" / "step_0000001.pt")
    before = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()}

    def lie(body: bytes) -> bytes:
        answer = json.loads(body)
        if "run" in answer:
            answer["run"]["info"]["artifact_uri"] = f"file://{victim}?x=/analysis"
        return json.dumps(answer).encode()

    proxy.rewrite_responses("/runs/get", lie)
    result = run_cli("analyze", outcome.run_id, "--no-progress", "--tracking-uri", proxy.url, cwd=tmp_path)
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "refusing to read or write there" in lines[0], lines
    assert proxy.stats["rewritten"] >= 1
    assert {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before
    assert not MlflowClient(server.url).list_artifacts(outcome.run_id, "analysis")
