"""Messages say what happened: a local file we could not read is not "the tracking server refused" it, a FIFO is
a FIFO (not "does not exist"), a device index past int64 is one line (not RuntimeError), and MLflow's own
progress bars and "🏃 View run" lines stay off ``load_model`` and ``sync`` unless asked. Real stores, a real
``mlflow server`` (conftest), the real outbox and spool."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from conftest import run_cli
from grokking_tracked.cli import main
from grokking_tracked.config import Config, ConfigError

FAST_FAILING = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@pytest.fixture(autouse=True)
def process_state(monkeypatch):
    """The CLI sets process-wide state (environment, Optuna's verbosity, MLflow's log level): restore it."""
    environment = dict(os.environ)
    verbosity = optuna.logging.get_verbosity()
    mlflow_level = logging.getLogger("mlflow").level
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    for key in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        os.environ.pop(key, None)  # MLflow's defaults: bars and "View run" lines on
    yield
    os.environ.clear()
    os.environ.update(environment)
    optuna.logging.set_verbosity(verbosity)
    logging.getLogger("mlflow").setLevel(mlflow_level)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('messages')}/mlflow.db"
    MlflowClient(uri).search_experiments()  # (its migrations: seconds, once)
    return uri


def test_a_fifo_is_named_a_fifo(tmp_path, store, capsys):
    fifo = tmp_path / "model_step_100.pt"
    os.mkfifo(fifo)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["import", str(fifo), "--tracking-uri", store])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 1 and len(lines) == 1, lines
    assert lines[0] == f"grokking-tracked: error: file {fifo} is a FIFO (named pipe), not a regular file"


def test_a_device_index_past_int64_is_one_line():
    """``resolve_device`` itself (a config's own check refuses it first: tests/test_bad_input.py)."""
    from grokking_tracked.train import resolve_device

    with pytest.raises(ConfigError, match=r"^device 'cuda:99999999999999999999': "):
        resolve_device("cuda:99999999999999999999")


def test_a_local_file_missing_from_the_spool_is_not_blamed_on_the_server(store, tmp_path):
    from grokking_tracked.tracking.delivery.outbox import Outbox, deliver_spool

    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("missing-file")).info.run_id
    away = Outbox(MlflowClient("http://127.0.0.1:9"), run_id, spool_root=tmp_path / "spool", echo=lambda line: None)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in FAST_FAILING.items():
            patch.setenv(key, value)
        away.log_file(note, "notes")
        away.close()  # the server was away: the entry and its copy stay in the spool
    [copy] = (tmp_path / "spool").rglob("*.files/note.txt")
    copy.unlink()  # e.g. a clean-up of the cache between the run and `sync`
    lines: list[str] = []
    report = deliver_spool(client, tmp_path / "spool", timeout=10, echo=lines.append)
    assert report.failed == lines and len(lines) == 1, lines
    assert lines[0].startswith(f"artifact notes/note.txt of run {run_id} was not sent: its local copy cannot be read")
    assert "tracking server" not in lines[0]


def logged_model(store: str, tmp_path: Path) -> str:
    from safetensors.torch import save_file

    from grokking_tracked.model import GrokkingTransformer

    client = MlflowClient(store)
    model = client.create_logged_model(client.create_experiment(f"quiet-{tmp_path.name}"), name="small")
    directory = tmp_path / "model"
    directory.mkdir()
    config = Config(p=23, d_model=32, d_mlp=64)
    save_file({k: v.contiguous() for k, v in GrokkingTransformer(config).state_dict().items()},
              directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config.to_dict()))
    client.log_model_artifacts(model.model_id, str(directory))
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def test_load_model_is_quiet_unless_asked(store, tmp_path, capfd):
    from grokking_tracked import load_model

    model_id = logged_model(store, tmp_path)
    capfd.readouterr()
    assert load_model(model_id, tracking_uri=store).config.d_model == 32
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # the process is left as it was
    load_model(model_id, tracking_uri=store, progress=True)
    assert "Downloading artifacts" in capfd.readouterr().err  # asked: MLflow's own bars


def test_sync_prints_our_lines_only(mlflow_server, tmp_path):
    """A run whose end (its status) waited in the spool: MLflow's client prints "🏃 View run" when `sync` ends it."""
    from grokking_tracked.tracking.delivery.outbox import Outbox
    from grokking_tracked.tracking.delivery.spool import spool_root_for

    server = MlflowClient(mlflow_server)
    run_id = server.create_run(server.create_experiment(f"quiet-sync-{tmp_path.name}")).info.run_id
    # a spool of this test's own: the session server's shared one may hold other tests' leftovers, which sync
    # would deliver too (and count)
    own_spool = {"GROKKING_TRACKED_SPOOL": str(tmp_path / "spool")}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**FAST_FAILING, **own_spool}.items():
            patch.setenv(key, value)
        away = Outbox(MlflowClient("http://127.0.0.1:9"), run_id, spool_root=spool_root_for(mlflow_server),
                      echo=lambda line: None)
        away.set_status("FINISHED")
        away.close()
    result = run_cli("sync", "--tracking-uri", mlflow_server, "--timeout", "30", cwd=tmp_path, env=own_spool)
    assert result.returncode == 0, result.stderr
    assert server.get_run(run_id).info.status == "FINISHED"
    assert "View run" not in result.stdout + result.stderr and "View experiment" not in result.stdout
    assert result.stdout.splitlines()[0].startswith("delivered 1 operations") and len(result.stdout.splitlines()) == 1
