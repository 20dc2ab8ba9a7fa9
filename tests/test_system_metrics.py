"""`--system-metrics`: MLflow's own sampler (SystemMetricsMonitor) logs ``system/...`` metrics on the run while it
trains; off by default. A real embedded store, tiny trainings; the run waits for the sampler's first batch
(observable state) instead of relying on how long it trains."""

from __future__ import annotations

import time

from click.testing import CliRunner
from mlflow import MlflowClient

from grokking_tracked.cli import cli
from grokking_tracked.config import preset
from grokking_tracked.train import Callback
from grokking_tracked.tracking import run_experiment

TINY = preset("default", p=23, d_model=32, d_mlp=64, max_steps=30, eval_every=10, checkpoint_every=0)


def system_metrics(client: MlflowClient, run_id: str) -> set[str]:
    return {key for key in client.get_run(run_id).data.metrics if key.startswith("system/")}


class WaitForSystemMetrics(Callback):
    """Holds training at its start until the sampler's first batch is in the store (at most 60 s)."""

    def __init__(self, client: MlflowClient):
        self.client, self.run_id = client, None

    def on_train_start(self, run) -> None:
        deadline = time.monotonic() + 60
        while not system_metrics(self.client, self.run_id) and time.monotonic() < deadline:
            time.sleep(0.05)


def test_system_metrics_are_logged_on_request_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    waiter = WaitForSystemMetrics(client)
    on = run_experiment(TINY, uri, progress=False, callbacks=[waiter], log_system_metrics=True,
                        on_run_started=lambda run_id: setattr(waiter, "run_id", run_id))
    logged = system_metrics(client, on.run_id)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= logged, logged
    assert client.get_run(on.run_id).info.status == "FINISHED"
    off = run_experiment(TINY, uri, progress=False)
    assert system_metrics(client, off.run_id) == set()


def test_help_states_the_option_and_its_cost():
    for command in ("run", "study"):
        text = " ".join(CliRunner().invoke(cli, [command, "--help"]).output.split())
        assert "--system-metrics" in text
        assert "Off by default; measured cost:" in text and "steps/s" in text
