"""MLflow 3 conventions against a real `mlflow server` (issue 21): event and final checkpoints as LoggedModels
(linked to run and step, carrying the step's metrics, found by metric, loaded without unpickling, refused when they
hold a pickle), metric names in sections, and runs logged under the flat names of before still readable."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from grokking_tracked import load_model
from grokking_tracked.checkpoints import safe_load
from grokking_tracked.config import preset
from grokking_tracked.tracking import TrackedRun, analyze_run, compare_runs, fetch_history, run_experiment
from grokking_tracked.tracking.models import MODEL_FILE, ModelError

EXPERIMENT = "logged-models"


@pytest.fixture(scope="module")
def grokked_run(mlflow_server):
    """A small run that memorises, generalises and stops: checkpoints at those events, the end and step 0 only."""
    config = preset("default", p=59, train_frac=0.5, max_steps=600, checkpoint_every=0, stop_margin=50)
    outcome = run_experiment(config, tracking_uri=mlflow_server, experiment=EXPERIMENT, progress=False)
    assert outcome.result.grokked
    return outcome


def run_models(client: MlflowClient, run, filter_string: str = "") -> list:
    where = f"source_run_id = '{run.run_id}'" + (f" AND {filter_string}" if filter_string else "")
    return list(client.search_logged_models([run.experiment_id], filter_string=where))


def events_of(models) -> dict:
    """Each event (a model can name several that fired at its step) -> its model."""
    return {event: m for m in models for event in m.tags["grokking_tracked.event"].split(",")}


def test_event_and_final_checkpoints_are_logged_models(mlflow_server, grokked_run):
    client = MlflowClient(mlflow_server)
    result = grokked_run.result
    expected = {"memorization": result.step_of("memorization"), "generalization": result.step_of("generalization"),
                "final": result.final_step}
    by_event = events_of(run_models(client, grokked_run))
    assert set(expected) <= set(by_event)
    for event, step in expected.items():
        model = by_event[event]
        assert str(model.status) == "READY" and model.source_run_id == grokked_run.run_id
        assert model.tags["grokking_tracked.step"] == str(step) and model.name.endswith(f"-step{step}")
        # the model carries its step's evaluation (the same values as the run's history at that step)
        carried = {m.key: m.value for m in model.metrics if m.step == step}
        at_step = dict(result.history)[step]
        assert carried["accuracy/test"] == pytest.approx(at_step["test_acc"])
        assert carried["loss/train"] == pytest.approx(at_step["train_loss"])
    outputs = {(o.model_id, o.step) for o in client.get_run(grokked_run.run_id).outputs.model_outputs}
    assert {(by_event[e].model_id, s) for e, s in expected.items()} <= outputs  # linked to the run at the step
    # the model metrics did not add rows to the run's own history
    steps = [m.step for m in client.get_metric_history(grokked_run.run_id, "accuracy/test")]
    assert steps == sorted(set(steps))

    # found by metric: generalised checkpoints have test accuracy >= 0.99, the memorisation one does not
    generalised = run_models(client, grokked_run, "metrics.`accuracy/test` >= 0.99")
    assert set(events_of(generalised)) >= {"generalization", "final"}
    assert "memorization" not in events_of(generalised)


def test_load_model_gives_back_the_checkpoint_weights(mlflow_server, grokked_run, tmp_path):
    client = MlflowClient(mlflow_server)
    step = grokked_run.result.step_of("generalization")
    model_id = events_of(run_models(client, grokked_run))["generalization"].model_id
    model = load_model(f"models:/{model_id}", tracking_uri=mlflow_server)
    checkpoint = safe_load(client.download_artifacts(grokked_run.run_id, f"checkpoints/step_{step:07d}.pt",
                                                     str(tmp_path)))
    loaded = model.state_dict()
    assert loaded.keys() == checkpoint["model"].keys()
    for name, tensor in checkpoint["model"].items():
        assert torch.equal(loaded[name], tensor), name
    assert type(model).__name__ == "GrokkingTransformer" and not model.training


class WouldRunCode:
    """Unpickling this creates a marker file: a loader that unpickles would run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def hand_made_model(client: MlflowClient, experiment_id: str, files: dict[str, bytes], tmp_path: Path) -> str:
    model = client.create_logged_model(experiment_id, name=f"hand-made-{time.time_ns()}")
    directory = tmp_path / model.model_id
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    client.log_model_artifacts(model.model_id, str(directory))
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def test_a_logged_model_holding_a_pickle_is_refused(mlflow_server, grokked_run, tmp_path):
    client = MlflowClient(mlflow_server)
    marker = tmp_path / "code-ran"
    config = json.dumps(preset("default").to_dict()).encode()
    payload = pickle.dumps({"model": WouldRunCode(marker)})
    as_weights = hand_made_model(client, grokked_run.experiment_id, {MODEL_FILE: payload, "config.json": config},
                                 tmp_path)
    with pytest.raises(ModelError, match="not a safetensors file"):
        load_model(as_weights, tracking_uri=mlflow_server)
    torch_pickle = tmp_path / "torch.pt"
    torch.save({"model": WouldRunCode(marker)}, torch_pickle)
    beside = hand_made_model(client, grokked_run.experiment_id,
                             {MODEL_FILE: b"", "config.json": config, "model.pt": torch_pickle.read_bytes()}, tmp_path)
    with pytest.raises(ModelError, match="not exactly"):
        load_model(f"models:/{beside}", tracking_uri=mlflow_server)
    assert not marker.exists()


def test_a_run_logged_under_the_old_flat_names_stays_readable(mlflow_server, grokked_run, tmp_path):
    """The same run copied the old way (flat metric names, `<event>_step`): history, compare and analyze read it."""
    client = MlflowClient(mlflow_server)
    new_history = fetch_history(client, grokked_run.run_id)
    assert new_history and set(new_history[0][1]) >= {"train_loss", "test_acc", "lr", "weight_norm"}
    source = tmp_path / "source"
    with TrackedRun.create(client, EXPERIMENT, run_name="old-names") as old:
        now = int(time.time() * 1000)
        old.log_metrics([Metric(key, value, now, step) for step, metrics in new_history for key, value in metrics.items()])
        old.log_metrics([Metric(f"{e['event']}_step", e["step"], now, e["step"]) for e in grokked_run.result.events])
        for name in ("config.json", "events.json"):
            old.log_file(Path(client.download_artifacts(grokked_run.run_id, name, str(source))))
        for step in (0, grokked_run.result.final_step):
            path = client.download_artifacts(grokked_run.run_id, f"checkpoints/step_{step:07d}.pt", str(source))
            old.log_file(Path(path), "checkpoints")
    assert "generalization_step" in client.get_run(old.run_id).data.metrics  # really logged the old way

    assert fetch_history(client, old.run_id) == new_history
    figure = compare_runs([grokked_run.run_id, old.run_id], tmp_path / "compare.png", tracking_uri=mlflow_server)
    assert figure.is_file()
    summary = analyze_run(old.run_id, mlflow_server, progress=False)
    assert summary["n_checkpoints"] == 2
