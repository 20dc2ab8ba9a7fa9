"""The outbox against a real `mlflow server` behind our fault proxy: outages lose nothing, double nothing.

Each scenario sends a stream shaped like a run (7 metrics per evaluation, tags, params, events.json,
~1 MB checkpoints, the final status) and checks what the SERVER holds at the end. The outbox's client
fails fast (no MLflow-level retries, short timeouts) so that an outage is noticed in seconds, as the CLI
will configure it; the assertions use a second client that talks to the server directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from faultproxy import FaultProxy, MlflowServer
from grokking_tracked.tracking.delivery.outbox import Outbox, deliver_spool
from grokking_tracked.tracking.delivery.spool import ENTRY_NAME

METRIC_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm", "grad_norm", "lr")
EVAL_EVERY, CHECKPOINT_EVERY = 10, 200
FAST_FAILING = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
TRAINING_PACE_S = 0.25  # time between evaluations of the simulated training loop
DROPPED = ("connection reset", "connection dropped", "connection refused")  # the short reasons of an outage


@pytest.fixture(autouse=True)
def fast_failing_client(monkeypatch):
    for key, value in FAST_FAILING.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A server of our own, for the test that kills it. Started when the module starts, so its ~25 s
    start-up overlaps the tests that use the shared one."""
    server = MlflowServer(tmp_path_factory.mktemp("own-server")).start(wait=False)
    yield server
    server.stop()


@pytest.fixture(autouse=True, scope="module")
def _boot_own_server_early(request):
    if any("own_server" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("own_server")


@pytest.fixture
def proxy(mlflow_server):
    with FaultProxy(mlflow_server) as proxy:
        yield proxy


def new_run(client: MlflowClient) -> str:
    experiment = client.create_experiment(f"outbox-{uuid.uuid4().hex[:8]}")
    return client.create_run(experiment).info.run_id


def wait_until(predicate, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        time.sleep(0.05)


class RunStream:
    """Feeds an outbox the operations of a training run and remembers what the server must end with."""

    def __init__(self, outbox: Outbox):
        self.outbox, self.step = outbox, 0
        self.checkpoints: dict[str, int] = {}
        outbox.log_params({"p": 59, "lr": 0.001, "train_frac": 0.4})
        outbox.set_tags({"grokking_tracked.task": "add mod 59"})
        outbox.log_dict([], "events.json")

    def evaluate(self, count: int = 1, paced: bool = False) -> None:
        for _ in range(count):
            self.step += EVAL_EVERY
            self.outbox.log_metrics({key: self.step / 1000 + i for i, key in enumerate(METRIC_KEYS)}, self.step)
            if self.step % CHECKPOINT_EVERY == 0:
                self.checkpoint()
            if paced:
                time.sleep(TRAINING_PACE_S)

    def checkpoint(self) -> None:
        name = f"step_{self.step:07d}.pt"
        path = self.outbox.staging_path(name)
        path.write_bytes(os.urandom((1 << 20) + self.step))  # ~1 MB, a distinct size per checkpoint
        self.checkpoints[name] = path.stat().st_size
        self.outbox.log_file(path, "checkpoints", move=True)

    def finish(self) -> None:
        self.outbox.log_dict([{"event": "memorization", "step": EVAL_EVERY}], "events.json")
        self.outbox.set_tags({"grokked": "true"})
        self.outbox.set_status("FINISHED")

    def steps(self) -> list[int]:
        return list(range(EVAL_EVERY, self.step + 1, EVAL_EVERY))


def server_steps(client: MlflowClient, run_id: str, key: str = "test_acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_run_complete(client: MlflowClient, run_id: str, stream: RunStream, tmp_path: Path) -> None:
    for key in METRIC_KEYS:  # every evaluation exactly once, in every metric
        assert server_steps(client, run_id, key) == stream.steps(), key
    held = {Path(f.path).name: f.file_size for f in client.list_artifacts(run_id, "checkpoints")}
    assert held == stream.checkpoints
    events = client.download_artifacts(run_id, "events.json", str(tmp_path))
    assert json.loads(Path(events).read_text()) == [{"event": "memorization", "step": EVAL_EVERY}]
    run = client.get_run(run_id)
    assert run.data.tags["grokked"] == "true" and run.data.tags["grokking_tracked.task"] == "add mod 59"
    assert run.data.params == {"p": "59", "lr": "0.001", "train_frac": "0.4"}
    assert run.info.status == "FINISHED"


def assert_one_outage(lines: list[str], spool: Path, reasons: tuple[str, ...]) -> None:
    assert len(lines) == 2, lines
    assert lines[0].startswith("tracking server unreachable (") and f"); spooling to {spool}, retrying" in lines[0]
    assert lines[0][len("tracking server unreachable ("):lines[0].index(");")] in reasons, lines[0]
    assert lines[1].startswith("tracking server reachable again after ") and "pending operations" in lines[1]


def spooled(directory: Path) -> int:
    return sum(1 for p in directory.iterdir() if ENTRY_NAME.match(p.name)) if directory.exists() else 0


def test_blackout_of_tens_of_seconds_loses_and_doubles_nothing(mlflow_server, proxy, tmp_path):
    direct = MlflowClient(mlflow_server)
    run_id, lines = new_run(direct), []
    outbox = Outbox(MlflowClient(proxy.url), run_id, spool_root=tmp_path / "spool", echo=lines.append,
                    max_backoff=2)
    stream = RunStream(outbox)
    stream.evaluate(30)
    assert outbox.wait(60)
    before = stream.step

    proxy.blackout("reset")
    started = time.monotonic()
    # training goes on: 20 s of evaluations (and two checkpoints) while nothing gets through
    while time.monotonic() - started < 20 or not lines or spooled(outbox.spool_dir) < 50:
        stream.evaluate(paced=True)
    assert server_steps(direct, run_id)[-1] == before  # the blackout was real
    assert len(lines) == 1 and outbox.pending == spooled(outbox.spool_dir)
    backlog = outbox.pending
    proxy.restore()

    stream.evaluate(30)
    stream.finish()
    assert outbox.wait(120)
    outbox.close()
    assert_run_complete(direct, run_id, stream, tmp_path)
    assert_one_outage(lines, outbox.spool_dir, DROPPED)
    assert int(lines[1].split("delivered ")[1].split()[0]) >= backlog  # said once the backlog was in
    assert not outbox.spool_dir.exists()


def test_uploads_refused_for_a_while_then_accepted(mlflow_server, proxy, tmp_path):
    direct = MlflowClient(mlflow_server)
    run_id, lines = new_run(direct), []
    outbox = Outbox(MlflowClient(proxy.url), run_id, spool_root=tmp_path / "spool", echo=lines.append,
                    max_backoff=1)
    stream = RunStream(outbox)
    assert outbox.wait(60)
    proxy.refuse_uploads(507)  # the server's artifact disk is full
    stream.evaluate(CHECKPOINT_EVERY // EVAL_EVERY)  # ends with a checkpoint
    checkpoint_step = stream.step
    stream.evaluate(10)
    # (or: the outbox gave up on the upload, which must fail the test at once rather than time out)
    wait_until(lambda: proxy.stats["refused_uploads"] >= 3 or outbox.pending == 0 or outbox.failures)
    assert proxy.stats["refused_uploads"] >= 3 and not outbox.failures
    # in order: what was enqueued after the checkpoint waits behind it
    assert server_steps(direct, run_id)[-1] == checkpoint_step
    assert not direct.list_artifacts(run_id, "checkpoints")
    proxy.refuse_uploads(None)

    stream.finish()
    assert outbox.wait(60)
    outbox.close()
    assert_run_complete(direct, run_id, stream, tmp_path)
    assert_one_outage(lines, outbox.spool_dir, ("HTTP 507",))


def test_a_batch_that_landed_but_whose_answer_was_lost_is_not_doubled(mlflow_server, proxy, tmp_path):
    direct = MlflowClient(mlflow_server)
    run_id, lines = new_run(direct), []
    outbox = Outbox(MlflowClient(proxy.url), run_id, spool_root=tmp_path / "spool", echo=lines.append,
                    max_backoff=0.5)
    stream = RunStream(outbox)
    assert outbox.wait(60)  # params and tags are in: the answers lost below are those of metric batches
    proxy.drop_responses("/runs/log-batch", 3)
    stream.evaluate(20)
    outbox.log_metrics({"nan_metric": float("nan")}, 1)  # NaN is stored as 0 + a flag: still de-duplicated
    stream.finish()
    assert outbox.wait(60)
    outbox.close()
    assert proxy.stats["dropped_responses"] == 3
    assert_run_complete(direct, run_id, stream, tmp_path)
    assert len(direct.get_metric_history(run_id, "nan_metric")) == 1


def test_a_refused_operation_is_kept_and_reported_and_does_not_block_the_rest(mlflow_server, tmp_path):
    direct = MlflowClient(mlflow_server)
    run_id, lines = new_run(direct), []
    outbox = Outbox(direct, run_id, spool_root=tmp_path / "spool", echo=lines.append)
    outbox.log_params({"lr": "0.001"})
    outbox.log_params({"lr": "0.001"})  # the same value again: accepted
    outbox.log_metrics({"train_loss": 1.0}, 10)
    outbox.log_params({"lr": "0.1"})  # a param cannot change: INVALID_PARAMETER_VALUE, HTTP 400
    outbox.log_metrics({"train_loss": 0.5}, 20)
    outbox.set_tags({"after": "yes"})
    assert outbox.wait(60) is False
    assert server_steps(direct, run_id, "train_loss") == [10, 20]
    run = direct.get_run(run_id)
    assert run.data.params == {"lr": "0.001"} and run.data.tags["after"] == "yes"
    assert len(lines) == 1 and "refused a batch of 0 metrics, 1 params" in lines[0]
    assert "Changing param values is not allowed" in lines[0]
    assert outbox.failures == lines
    failed = outbox.spool_dir / "failed"
    [entry] = [json.loads(p.read_text()) for p in failed.glob("*.json")]
    assert entry["params"] == [["lr", "0.1"]] and "Changing param values is not allowed" in entry["error"]
    outbox.close()
    assert failed.exists()  # kept: never silently lost


def test_server_still_away_at_the_end_leaves_the_spool_for_later(mlflow_server, proxy, tmp_path, monkeypatch):
    direct = MlflowClient(mlflow_server)
    run_id = new_run(direct)
    proxy.blackout("stall")  # a partition: requests time out instead of failing at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    outbox = Outbox(MlflowClient(proxy.url), run_id, spool_root=tmp_path / "spool", echo=lambda line: None)
    stream = RunStream(outbox)
    stream.evaluate(CHECKPOINT_EVERY // EVAL_EVERY)
    stream.finish()
    enqueued = outbox.pending
    assert outbox.wait(timeout=3) is False
    outbox.close()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", FAST_FAILING["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    spool = outbox.spool_dir
    assert spooled(spool) == enqueued and direct.get_run(run_id).info.status == "RUNNING"
    [checkpoint] = spool.glob("*.files/step_*.pt")
    assert checkpoint.stat().st_size == stream.checkpoints[checkpoint.name]

    proxy.restore()
    report = deliver_spool(MlflowClient(proxy.url), tmp_path / "spool", timeout=60, echo=lambda line: None)
    assert report.complete and report.delivered == enqueued and not report.busy
    assert_run_complete(direct, run_id, stream, tmp_path)
    assert not spool.exists()


WRITER = textwrap.dedent("""
    import json, sys, time
    from mlflow import MlflowClient
    from grokking_tracked.tracking.delivery.outbox import Outbox
    sys.path.insert(0, {tests!r})
    from test_outbox import RunStream
    outbox = Outbox(MlflowClient({url!r}), {run_id!r}, spool_root={spool!r}, echo=lambda line: None, max_backoff=0.5)
    stream = RunStream(outbox)
    stream.evaluate(10)
    assert outbox.wait(60)
    print("delivered", stream.step, flush=True)
    sys.stdin.readline()  # the test cuts the network now
    stream.evaluate(30)
    stream.finish()
    print("spooled", outbox.pending, outbox.spool_dir, json.dumps(stream.checkpoints), flush=True)
    time.sleep(600)
""")


def test_spool_of_a_process_killed_with_sigkill_is_delivered_later(mlflow_server, proxy, tmp_path):
    direct = MlflowClient(mlflow_server)
    run_id, spool_root = new_run(direct), tmp_path / "spool"
    code = WRITER.format(tests=str(Path(__file__).parent), url=proxy.url, run_id=run_id, spool=str(spool_root))
    writer = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, **FAST_FAILING})
    try:
        assert writer.stdout.readline().split() == ["delivered", str(10 * EVAL_EVERY)]
        proxy.blackout("reset")
        writer.stdin.write("go\n")
        writer.stdin.flush()
        _, pending, spool, checkpoints = writer.stdout.readline().split(maxsplit=3)
        spool, pending = Path(spool), int(pending)
        assert pending > 30 and spooled(spool) == pending

        early = deliver_spool(direct, spool_root, timeout=5)  # the writer is alive: its spool is not ours
        assert early.busy == [spool] and early.delivered == 0 and spooled(spool) == pending
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    proxy.restore()

    report = deliver_spool(direct, spool_root / run_id, timeout=60)
    assert report.complete and report.delivered == pending and not report.busy
    stream = RunStream.__new__(RunStream)  # what the writer sent: 40 evaluations and their checkpoints
    stream.step, stream.checkpoints = 40 * EVAL_EVERY, json.loads(checkpoints)
    assert_run_complete(direct, run_id, stream, tmp_path)
    assert not spool.exists()


def test_server_killed_and_restarted_on_the_same_store(own_server, tmp_path):
    own_server.wait_healthy()
    direct = MlflowClient(own_server.url)
    run_id, lines = new_run(direct), []
    with FaultProxy(own_server.url) as proxy:
        outbox = Outbox(MlflowClient(proxy.url), run_id, spool_root=tmp_path / "spool", echo=lines.append,
                        max_backoff=2)
        stream = RunStream(outbox)
        stream.evaluate(CHECKPOINT_EVERY // EVAL_EVERY)
        own_server.kill()  # while that burst (and its checkpoint) is being delivered
        killed_at = stream.step
        own_server.start(wait=False)
        proxy.retarget(own_server.url)
        while not own_server.healthy():  # training goes on while the server restarts (~25 s)
            stream.evaluate(paced=True)
        assert stream.step > killed_at + 10 * EVAL_EVERY and len(lines) == 1
        stream.evaluate(20)
        stream.finish()
        assert outbox.wait(120)
        outbox.close()
    direct = MlflowClient(own_server.url)
    assert_run_complete(direct, run_id, stream, tmp_path)
    assert_one_outage(lines, outbox.spool_dir, DROPPED)
