"""Transient vs final, against a real `mlflow server` behind the fault proxy (issue 20): a proxy's HTML 404 is an
outage, MLflow's own 500 to one entry is a poison entry set aside after bounded tries while the rest flows, a run
whose data did not all arrive never ends FINISHED, and `sync` (deliver_spool) retries what was set aside."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from faultproxy import MLFLOW_500, PROXY_404_PAGE
from grokking_tracked.tracking.delivery.outbox import POISON_TRIES, Outbox, deliver_spool
from test_outbox import (RunStream, assert_run_complete, fast_failing_client, new_run, proxy,  # noqa: F401 - fixtures
                         server_steps, wait_until)


def test_a_proxys_html_404_to_uploads_is_an_outage_not_a_refusal(mlflow_server, proxy, tmp_path):
    """The issue's case: a reverse proxy answering 404 (HTML) to uploads while its backend restarts. Before, every
    4xx was final: the run ended FINISHED with none of its checkpoints."""
    direct = MlflowClient(mlflow_server)
    run_id, lines = new_run(direct), []
    outbox = Outbox(MlflowClient(proxy.url), run_id, spool_root=tmp_path / "spool", echo=lines.append,
                    max_backoff=1.0)
    proxy.refuse_uploads(404, PROXY_404_PAGE)
    stream = RunStream(outbox)
    stream.evaluate(40)  # two checkpoints
    stream.finish()
    wait_until(lambda: proxy.stats["refused_uploads"] >= 3, what="three refused uploads")
    assert not outbox.failures and outbox.pending > 0
    assert direct.get_run(run_id).info.status == "RUNNING"  # the status waits behind the checkpoints
    assert lines and lines[0].startswith("tracking server unreachable (HTTP 404)"), lines
    proxy.refuse_uploads(None)  # the backend is back
    assert outbox.wait(60)
    outbox.close()
    assert_run_complete(direct, run_id, stream, tmp_path)


def test_a_poison_entry_is_set_aside_the_rest_flows_the_run_is_not_finished_and_sync_retries_it(
        mlflow_server, proxy, tmp_path):
    direct = MlflowClient(mlflow_server)
    run_id, lines = new_run(direct), []
    outbox = Outbox(MlflowClient(proxy.url), run_id, spool_root=tmp_path / "spool", echo=lines.append,
                    max_backoff=0.5)
    proxy.refuse_requests("/runs/log-batch", b"poison_metric", 500, MLFLOW_500)  # MLflow fails on it, forever
    outbox.log_metrics({"train_loss": 1.0}, 10)
    outbox.log_metrics({"poison_metric": 1.0}, 20)
    outbox.log_metrics({"train_loss": 0.5}, 30)
    outbox.set_tags({"after": "yes"})
    outbox.set_status("FINISHED")
    assert outbox.wait(60) is False, lines
    assert server_steps(direct, run_id, "train_loss") == [10, 30], (lines, outbox.failures)  # the entries behind it still flowed
    run = direct.get_run(run_id)
    assert run.data.tags["after"] == "yes"
    assert run.info.status == "FAILED"  # never FINISHED without all its data
    assert proxy.stats["refused_requests"] >= POISON_TRIES
    refused = [line for line in lines if "refused a batch of 1 metrics" in line]
    assert len(refused) == 1 and f"after {POISON_TRIES} refusals" in refused[0], lines
    assert any("ended FAILED, not FINISHED" in line for line in lines), lines
    assert not any(line.startswith("tracking server unreachable") for line in lines), lines  # not an outage
    outbox.close()
    failed = sorted(json.loads(p.read_text())["op"] for p in (outbox.spool_dir / "failed").glob("*.json"))
    assert failed == ["batch", "status"]

    # The server is fixed; sync tries again what was set aside, in order, and then the held FINISHED.
    proxy.refuse_requests("/runs/log-batch", b"poison_metric", None)
    report = deliver_spool(MlflowClient(proxy.url), tmp_path / "spool", timeout=60, echo=lines.append)
    assert report.complete and report.delivered == 2, report
    assert server_steps(direct, run_id, "poison_metric") == [20]
    assert direct.get_run(run_id).info.status == "FINISHED"
    assert not (tmp_path / "spool").exists() or not any((tmp_path / "spool").rglob("*.json"))


def test_sync_leaves_mlflows_final_refusal_aside_and_the_run_failed(mlflow_server, tmp_path):
    """INVALID_PARAMETER_VALUE cannot pass on a later attempt: sync leaves it (and the run's FINISHED) aside."""
    direct = MlflowClient(mlflow_server)
    run_id, lines = new_run(direct), []
    outbox = Outbox(direct, run_id, spool_root=tmp_path / "spool", echo=lines.append)
    outbox.log_params({"lr": "0.001"})
    outbox.log_params({"lr": "0.1"})  # a param cannot change
    outbox.set_status("FINISHED")
    assert outbox.wait(60) is False
    outbox.close()
    assert direct.get_run(run_id).info.status == "FAILED"
    report = deliver_spool(direct, tmp_path / "spool", timeout=30, echo=lines.append)
    assert not report.complete and report.delivered == 0
    assert any("refused earlier are kept" in line for line in report.failed), report
    assert direct.get_run(run_id).info.status == "FAILED"


@pytest.mark.slow  # two CLI processes (a tiny training run, then sync): ~30 s unloaded
def test_run_through_a_proxy_answering_404_to_uploads_never_ends_finished_without_its_checkpoints(
        mlflow_server, proxy, tmp_path):
    """The issue's case end to end: `run` behind a proxy that answers 404 (HTML) to every upload. The run waits its
    delivery wait, exits non-zero and stays RUNNING with its checkpoints in the spool; once the proxy is fixed,
    `sync` delivers them and the run is FINISHED."""
    from conftest import run_cli

    proxy.refuse_uploads(404, PROXY_404_PAGE)
    experiment = f"proxy-404-{tmp_path.name}"
    env = {"GROKKING_TRACKED_SPOOL": str(tmp_path / "spool"), "GROKKING_TRACKED_DELIVERY_WAIT": "3"}
    result = run_cli("run", "--p", "11", "--d-model", "16", "--d-mlp", "32", "--max-steps", "60",
                     "--checkpoint-every", "20", "--no-stop-on-grok", "--no-progress", "--experiment", experiment,
                     "--tracking-uri", proxy.url, cwd=tmp_path, env=env)
    assert result.returncode != 0, result.stderr
    assert "did not take run" in result.stderr and "grokking-tracked sync" in result.stderr, result.stderr
    direct = MlflowClient(mlflow_server)
    [run] = direct.search_runs([direct.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "RUNNING" and not direct.list_artifacts(run.info.run_id, "checkpoints")

    proxy.refuse_uploads(None)
    synced = run_cli("sync", "--tracking-uri", proxy.url, cwd=tmp_path, env=env)
    assert synced.returncode == 0, synced.stderr
    run = direct.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    held = {f.path for f in direct.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"checkpoints/step_0000020.pt", "checkpoints/step_0000040.pt", "checkpoints/step_0000060.pt"} <= held, held
