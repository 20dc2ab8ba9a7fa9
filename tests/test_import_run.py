"""`grokking-tracked import`: a run folder of the earlier project becomes an MLflow run that `analyze` and `compare`
work on, through the real entry point and a real SQLite store; a planted payload is refused and creates nothing."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from mlflow import MlflowClient

from conftest import run_cli
from test_importer import earlier_checkpoint, write_earlier_run


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def run_count(database) -> int:
    if not database.exists():
        return 0
    with sqlite3.connect(database) as db:
        return db.execute("select count(*) from runs").fetchone()[0]


def test_an_imported_earlier_run_is_analysed_and_cannot_be_resumed(tmp_path):
    store = f"sqlite:///{tmp_path}/store/mlflow.db"
    folder = write_earlier_run(tmp_path / "grokking_20241222_222024")
    imported = run_cli("import", str(folder), "--tracking-uri", store, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    run_id = imported.stdout.split()[-1]
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["grokking_tracked.imported_from"] == str(folder.resolve())
    assert run.data.tags["grokking_tracked.imported_kind"] == "earlier-project"
    assert (run.data.params["p"], run.data.params["d_model"], run.data.params["seed"]) == ("23", "32", "999")
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {
        "checkpoints/step_0000001.pt", "checkpoints/step_0005001.pt", "checkpoints/step_0010001.pt"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss/test")] == [
        (1, 4.0), (5001, 3.5), (10001, 3.0)]

    analysed = run_cli("analyze", run_id, "--no-progress", "--tracking-uri", store, cwd=tmp_path)
    assert analysed.returncode == 0, analysed.stderr
    summary = json.loads(open(client.download_artifacts(run_id, "analysis/1/summary.json", str(tmp_path))).read())
    assert summary["steps"] == [1, 5001, 10001] and summary["p"] == 23

    resumed = run_cli("run", "--resume", run_id, "--no-progress", "--tracking-uri", store, cwd=tmp_path)
    lines = [line for line in resumed.stderr.splitlines() if line.strip()]
    assert resumed.returncode != 0 and len(lines) == 1 and "was imported from" in lines[0], lines


@pytest.mark.parametrize("planted", ["payload", "shape", "absurd-epoch"])
def test_an_unusable_import_is_one_line_and_creates_no_run(tmp_path, planted):
    store_db = tmp_path / "store" / "mlflow.db"
    folder = write_earlier_run(tmp_path / "run", epochs=(0,))
    marker = tmp_path / "pwned"
    # an absurd epoch became a step beyond int64: an entry no sync could deliver, in a run that never finished
    bad = earlier_checkpoint(2 ** 63 - 1 if planted == "absurd-epoch" else 5000, seed=1)
    if planted == "absurd-epoch":
        pass
    elif planted == "payload":
        bad["model_state_dict"]["embed.W_E"] = Payload(marker)
    else:
        bad["model_state_dict"]["embed.W_E"] = torch.zeros(7, 5)
    torch.save(bad, folder / "checkpoints" / "checkpoint_epoch_5000.pt")
    result = run_cli("import", str(folder), "--tracking-uri", f"sqlite:///{store_db}", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "checkpoint_epoch_5000.pt" in lines[0]
    assert not marker.exists()
    assert run_count(store_db) == 0
