"""`analyze` and `compare` against a real MLflow server that serves the artifacts: no local copy of the run."""

from __future__ import annotations

import io
import json
import pickle

import pytest
import torch
from mlflow import MlflowClient

from conftest import free_port, run_cli
from grokking_tracked.fourier import key_frequencies
from grokking_tracked.config import preset
from grokking_tracked.tracking import ensure_experiment, run_experiment

ANALYSIS_FILES = {"summary.json", "progress_measures.png", "fourier_spectrum.png", "attention_patterns.png",
                  "attention_change.png", "activation_stats.png", "gradient_flow.png", "weight_evolution.png",
                  "algorithm.png"}


@pytest.fixture(scope="module")
def trained_run(mlflow_server, tmp_path_factory, request):
    """A small grokking run logged to the server from a directory that is deleted afterwards."""
    workdir = tmp_path_factory.mktemp("training-machine")
    config = preset("default", p=59, train_frac=0.5, max_steps=600, checkpoint_every=100)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        outcome = run_experiment(config, tracking_uri=mlflow_server, experiment="analyze", progress=False)
    assert not any(workdir.iterdir())  # nothing of the run stays on the "training machine"
    workdir.rmdir()
    return outcome.run_id


def names(client: MlflowClient, run_id: str, path: str) -> set[str]:
    return {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, path)}


def test_analyze_from_a_fresh_directory_logs_back_into_the_run(mlflow_server, trained_run, tmp_path):
    client = MlflowClient(mlflow_server)
    stale = tmp_path / "stale.png"
    stale.write_bytes(b"old analysis")
    client.log_artifact(trained_run, str(stale), "analysis")  # something already under analysis/: never deleted

    fresh = tmp_path / "elsewhere"
    fresh.mkdir()
    result = run_cli("analyze", trained_run, "--tracking-uri", mlflow_server, "--output", "local-copy",
                     "--no-progress", cwd=fresh)
    assert result.returncode == 0, result.stderr
    assert "key frequencies" in result.stdout
    run = client.get_run(trained_run)
    assert run.data.tags["analysis.latest"] == "1"
    assert names(client, trained_run, "analysis/1") == ANALYSIS_FILES
    assert "stale.png" in names(client, trained_run, "analysis")
    assert {p.name for p in (fresh / "local-copy").iterdir()} == ANALYSIS_FILES

    summary = json.loads(open(client.download_artifacts(trained_run, "analysis/1/summary.json", str(tmp_path))).read())
    checkpoint_steps = sorted(int(n[5:-3]) for n in names(client, trained_run, "checkpoints"))
    assert [c["step"] for c in summary["checkpoints"]] == checkpoint_steps
    fourier = summary["fourier"]
    norms = torch.tensor(fourier["final_embedding_freq_norms"])
    assert fourier["basis"] == "additive"
    assert fourier["key_frequencies"] == key_frequencies(norms)[0] != []  # the documented rule, a sparse answer
    assert summary["final"]["test_acc"] > 0.99  # measured from the final checkpoint itself
    assert json.loads(run.data.tags["analysis.key_frequencies"]) == fourier["key_frequencies"]
    assert run.data.tags["analysis.algorithm"] == summary["algorithm"]["class"]
    for name in ("gradient_symmetricity", "distance_irrelevance", "key_variance_explained"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(trained_run, f"analysis/{name}"))
        assert logged == [(c["step"], pytest.approx(c[name])) for c in summary["checkpoints"]]
    assert run.info.status == "FINISHED"

    again = run_cli("analyze", trained_run, "--tracking-uri", mlflow_server, "--no-progress", cwd=fresh)
    assert again.returncode == 0, again.stderr
    assert client.get_run(trained_run).data.tags["analysis.latest"] == "2"
    assert names(client, trained_run, "analysis/2") == ANALYSIS_FILES
    assert names(client, trained_run, "analysis/1") == ANALYSIS_FILES  # the previous analysis stays intact


def test_compare_draws_runs_on_shared_axes_and_logs_it(mlflow_server, trained_run, tmp_path):
    other = run_experiment(preset("default", p=59, train_frac=0.5, lr=3e-3, max_steps=200, checkpoint_every=0),
                           tracking_uri=mlflow_server, experiment="analyze", progress=False)
    result = run_cli("compare", trained_run, other.run_id, "--output", "both.png", "--log-to", trained_run,
                     "--tracking-uri", mlflow_server, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "both.png").read_bytes().startswith(b"\x89PNG")
    assert names(MlflowClient(mlflow_server), trained_run, "comparisons") == {"both.png"}


def plant_run(client: MlflowClient, checkpoint_bytes: bytes | None, tmp_path, config=None) -> str:
    """A run that looks like ours (config.json) with the given bytes as its only checkpoint."""
    experiment = ensure_experiment(client, "analyze")
    run_id = client.create_run(experiment).info.run_id
    client.log_dict(run_id, (config or preset("default", p=59)).to_dict(), "config.json")
    if checkpoint_bytes is not None:
        path = tmp_path / "step_0000100.pt"
        path.write_bytes(checkpoint_bytes)
        client.log_artifact(run_id, str(path), "checkpoints")
    client.set_terminated(run_id)
    return run_id


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("form", ["torch.save", "raw pickle"])
def test_malicious_checkpoint_is_refused_and_runs_nothing(mlflow_server, tmp_path, form):
    marker = tmp_path / "pwned"
    client = MlflowClient(mlflow_server)
    payload = {"model": Payload(marker), "config": {}}
    if form == "torch.save":
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        planted = buffer.getvalue()
    else:
        planted = pickle.dumps(payload)
    run_id = plant_run(client, planted, tmp_path)
    result = run_cli("analyze", run_id, "--tracking-uri", mlflow_server, "--no-progress", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ("refused" in lines[0] or "not a torch checkpoint" in lines[0]), lines
    assert not marker.exists()
    assert not client.list_artifacts(run_id, "analysis")  # nothing half-logged


def test_checkpoint_of_another_model_shape_is_refused(mlflow_server, trained_run, tmp_path):
    client = MlflowClient(mlflow_server)
    checkpoint = client.download_artifacts(trained_run, "checkpoints/step_0000100.pt", str(tmp_path))
    state = torch.load(checkpoint, weights_only=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    run_id = plant_run(client, buffer.getvalue(), tmp_path, config=preset("default", p=59, d_model=128))
    result = run_cli("analyze", run_id, "--tracking-uri", mlflow_server, "--no-progress", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "model shape" in result.stderr
    assert not client.list_artifacts(run_id, "analysis")


@pytest.mark.parametrize("case", ["unknown run", "no checkpoints", "unreachable server"])
def test_analyze_bad_input_is_one_line(mlflow_server, tmp_path, case):
    uri = mlflow_server
    run_id = "0123456789abcdef0123456789abcdef"
    if case == "no checkpoints":
        run_id = plant_run(MlflowClient(mlflow_server), None, tmp_path)
    if case == "unreachable server":
        uri = f"http://127.0.0.1:{free_port()}"
    result = run_cli("analyze", run_id, "--tracking-uri", uri, "--no-progress", cwd=tmp_path, timeout=60)
    expected = {"unknown run": "no MLflow run with id", "no checkpoints": "has no checkpoints",
                "unreachable server": "cannot reach the MLflow tracking server"}[case]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.strip().splitlines()
                                                  if expected in line]
