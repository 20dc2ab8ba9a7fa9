"""Everything we read is checked as a whole before a model is built from it: a run's ``config.json`` (analyze,
``run --resume``), a logged model's (``load_model``) and a checkpoint's config. Hostile variants: not an object,
an unknown field, an out-of-domain value, and an in-domain config of ~26 billion parameters (the model was built
before the weights were compared: a ~100 GiB allocation). A real SQLite MLflow store; the CLI in-process through
its entry point (``cli.main``), as tests/test_bad_input.py does."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from grokking_tracked.cli import main
from grokking_tracked.config import Config, ConfigError, stored_config

# ~26 billion parameters, every value in its domain (d_model, d_mlp, n_layers within FIELD_DOMAINS)
HUGE = {"d_model": 16384, "n_heads": 4, "d_mlp": 65536, "n_layers": 8}
HOSTILE = {
    "list": ([1, 2], "is a list, not an object of config fields"),
    "null": (None, "is null, not an object of config fields"),
    "number": (3, "is a number, not an object of config fields"),
    "unknown field": ({"p": 23, "exec": "rm -rf /"}, "unknown config field(s): exec"),
    "out of domain": ({"p": 23, "n_layers": 0}, "n_layers must be an integer in [1, 128], got 0"),
    "overflow": ({"lr": 1e400}, "lr must be a finite number"),  # json reads 1e400 as inf
    "26 billion parameters": (HUGE, "describes a model of 25,772,457,984 parameters"),
}


@pytest.fixture(autouse=True)
def process_state():
    """The CLI sets process-wide state (environment, Optuna's verbosity, MLflow's log level): restore it."""
    environment = dict(os.environ)
    verbosity = optuna.logging.get_verbosity()
    mlflow_level = logging.getLogger("mlflow").level
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.clear()
    os.environ.update(environment)
    optuna.logging.set_verbosity(verbosity)
    logging.getLogger("mlflow").setLevel(mlflow_level)


def invoke(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()  # (what the test's own set-up printed)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_stored_config_is_checked_as_a_whole(case):
    values, message = HOSTILE[case]
    with pytest.raises(ConfigError) as refused:
        stored_config(json.loads(json.dumps(values).replace("Infinity", "1e400")), "config.json")
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_memory_check_is_against_this_machine():
    small = Config(p=23, d_model=32, d_mlp=64).to_dict()
    assert stored_config(small, "config.json").p == 23
    with pytest.raises(ConfigError, match="to load, this machine has 0.0 GiB"):
        stored_config(small, "config.json", available=1000)


def test_a_checkpoint_whose_config_is_huge_is_refused_before_a_model_is_built():
    from grokking_tracked.checkpoints import CheckpointError, model_from_checkpoint

    with pytest.raises(CheckpointError, match="describes a model of 25,772,457,984 parameters"):
        model_from_checkpoint({"config": {**Config().to_dict(), **HUGE}, "model": {}, "step": 0})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One store for the module (making one takes seconds of migrations)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('hostile')}/mlflow.db"
    MlflowClient(uri).search_experiments()
    return uri


def run_with_config(store: str, values, tmp_path: Path) -> str:
    """A finished run whose config.json holds ``values`` (and nothing else: the config is read first)."""
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("hostile") or client.get_experiment(client.create_experiment("hostile"))
    run = client.create_run(experiment.experiment_id)
    client.log_text(run.info.run_id, json.dumps(values), "config.json")
    client.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_analyze_and_resume_refuse_a_hostile_config_json_in_one_line(store, tmp_path, capsys, case):
    values, message = HOSTILE[case]
    run_id = run_with_config(store, values, tmp_path)
    for argv in (["analyze", run_id, "--no-progress"], ["run", "--resume", run_id, "--no-progress"]):
        code, lines = invoke([*argv, "--tracking-uri", store], capsys)
        assert code == 1 and len(lines) == 1, lines
        assert lines[0].startswith(f"grokking-tracked: error: the config.json of run {run_id}") and message in lines[0]
    assert MlflowClient(store).get_run(run_id).info.status == "FAILED"  # left as it was


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_load_model_refuses_a_hostile_config_json(store, tmp_path, case):
    from safetensors.torch import save_file

    from grokking_tracked import load_model
    from grokking_tracked.model import GrokkingTransformer
    from grokking_tracked.tracking.models import ModelError

    values, message = HOSTILE[case]
    client = MlflowClient(store)
    experiment_id = client.create_experiment(f"models-{time.time_ns()}")
    model = client.create_logged_model(experiment_id, name="hand-made")
    directory = tmp_path / "model"
    directory.mkdir()
    small = GrokkingTransformer(Config(p=23, d_model=32, d_mlp=64))  # weights that would load fine
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(values))
    client.log_model_artifacts(model.model_id, str(directory))
    client.finalize_logged_model(model.model_id, "READY")
    with pytest.raises(ModelError) as refused:
        load_model(model.model_id, tracking_uri=store)
    text = str(refused.value)
    assert text.startswith(f"the config.json of logged model {model.model_id}") and message in text, text
    assert text.endswith("refusing to load it") and "\n" not in text
