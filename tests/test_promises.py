"""Promises that no test guarded before issue 20 (deleting any one of them left the suite green): the
"consecutive" in onset's rule, the lease refusal of a writer on another host, the check that a server's
checkpoint paths sit in their folder, and the memory estimate's parameter count."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from mlflow import MlflowClient

from faultproxy import FaultProxy
from grokking_tracked.cli import main
from grokking_tracked.config import Config
from grokking_tracked.detect import detect_events
from grokking_tracked.tracking.delivery.lease import LEASE_TAG
from test_core import synthetic


def test_onset_needs_consecutive_evaluations_below_the_drop():
    """Three dips under half the peak, each followed by a rebound, never fire onset (onset_confirm = 3)."""
    steps = list(range(0, 1500, 50))
    loss = [10.0] * len(steps)
    for index in (10, 12, 14, 16):  # below, above, below, above, ...: never 3 in a row
        loss[index] = 2.0
    history = synthetic(steps, [1.0] * len(steps), [0.1] * len(steps), loss)
    assert "onset" not in [e["event"] for e in detect_events(history)]
    loss[20:23] = [2.0, 2.0, 2.0]  # three in a row: fires at the third
    history = synthetic(steps, [1.0] * len(steps), [0.1] * len(steps), loss)
    assert [e["step"] for e in detect_events(history) if e["event"] == "onset"] == [steps[22]]


@pytest.mark.parametrize("config", [Config(), Config(normalization="ln", n_layers=2, p=113, d_model=96, n_heads=3,
                                                     d_mlp=100)], ids=["default", "ln-2-layers"])
def test_the_memory_estimate_counts_every_parameter_four_times(config):
    import torch

    from grokking_tracked.model import GrokkingTransformer

    with torch.device("meta"):  # shapes only
        model = GrokkingTransformer(config)
    assert config.parameter_count == sum(p.numel() for p in model.parameters())
    assert config.estimated_memory_bytes() >= 4 * 4 * config.parameter_count  # weights, grads, AdamW's 2 moments


def test_a_model_whose_parameters_cannot_fit_is_estimated_by_its_parameters():
    """d_model 16384, d_mlp 65536: 3.2e9 parameters, 51 GB with gradients and AdamW's moments, while its activations
    over all p^2 pairs are ~5 GB (the old estimate, activations only, let it start and take 22 GB)."""
    config = Config(d_model=16384, d_mlp=65536)
    assert config.parameter_count > 3e9
    assert config.estimated_memory_bytes() >= 16 * config.parameter_count > 50e9


def test_resume_is_refused_while_a_writer_on_another_host_holds_the_lease(tmp_path, capsys, monkeypatch):
    """The other host's writer has its own spool there: ours is empty, so only the lease tag can refuse us."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    lease = json.dumps({"host": "gpu-node-7", "pid": 4242, "started": "boot:1", "heartbeat": time.time() - 5,
                        "released": False})
    run = client.create_run(client.create_experiment("leased"), tags={LEASE_TAG: lease})
    capsys.readouterr()  # (MLflow's lines about creating the store above)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--resume", run.info.run_id, "--no-progress", "--tracking-uri", uri])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code != 0
    assert len(lines) == 1 and "still being written" in lines[0] and "pid 4242 on gpu-node-7" in lines[0], lines
    after = client.get_run(run.info.run_id)
    assert after.data.tags[LEASE_TAG] == lease and after.info.status == "RUNNING"  # untouched
    assert not (tmp_path / ".spool").exists() or not any((tmp_path / ".spool").iterdir())


def test_checkpoints_listed_outside_their_folder_are_skipped(mlflow_server, tmp_path):
    """A server that lists ``checkpoints/sub/step_5.pt`` gets a warning, not a step 5 (fetch.RunArtifacts)."""
    from grokking_tracked.tracking.fetch import RunArtifacts

    direct = MlflowClient(mlflow_server)
    run_id = direct.create_run(direct.create_experiment(f"paths-{uuid.uuid4().hex[:8]}")).info.run_id
    (tmp_path / "step_100.pt").write_bytes(b"x")
    direct.log_artifact(run_id, str(tmp_path / "step_100.pt"), "checkpoints")

    def add_foreign_entry(body: bytes) -> bytes:
        try:
            listing = json.loads(body)
        except ValueError:
            return body  # a download, not a listing
        if isinstance(listing, dict) and any(f["path"] == "step_100.pt" for f in listing.get("files", [])):
            listing["files"].append({"path": "sub/step_5.pt", "is_dir": False, "file_size": 1})
        return json.dumps(listing).encode()

    with FaultProxy(mlflow_server) as proxy:
        proxy.rewrite_responses("/mlflow-artifacts/artifacts?", add_foreign_entry)
        warnings: list[str] = []
        found = RunArtifacts(MlflowClient(proxy.url), run_id).checkpoints(warn=warnings.append)
        assert proxy.stats["rewritten"] >= 1
    assert found == [(100, "checkpoints/step_100.pt")]
    assert len(warnings) == 1 and "'checkpoints/sub/step_5.pt'" in warnings[0]
