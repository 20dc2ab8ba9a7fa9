"""Our MLflow UI links have one home (tracking/store.py ``ui_link``), so every page a user reaches from them opens in
the model-training view and none carries credentials."""

from pathlib import Path

from grokking_tracked.tracking.store import ui_base, ui_link

PACKAGE = Path(__file__).resolve().parents[1] / "grokking_tracked"


def test_every_page_is_the_model_training_view_and_carries_no_credentials():
    base = ui_base("http://alice:s3cret@host:5000")
    assert ui_link(base, "3") == "http://host:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert ui_link(base, "3", page="models") == "http://host:5000/#/experiments/3/models?workflowType=machine_learning"
    assert ui_link(base, "3", run_id="abc") == "http://host:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert ui_base("sqlite:///x/mlflow.db") == "http://127.0.0.1:5000"


def test_no_other_module_builds_a_ui_link():
    builders = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                if "#/experiments/" in path.read_text() and path.name != "store.py"]
    assert builders == []


def test_sqlite_paths_are_parsed_once_by_sqlalchemy():
    from grokking_tracked.tracking.delivery.spool import spool_root_for
    from grokking_tracked.tracking.store import local_database, sqlite_database

    assert sqlite_database("sqlite:////data/a b/mlflow.db?mode=ro") == "/data/a b/mlflow.db"  # the query is not a path
    assert sqlite_database("sqlite:///:memory:") is None and sqlite_database("postgresql://h/db") is None
    assert str(local_database("sqlite:////data/x/mlflow.db?timeout=5")) == "/data/x/mlflow.db"
    assert spool_root_for("sqlite:////data/x/mlflow.db?timeout=5") == Path("/data/x/.spool")
    sources = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
               if 'len("sqlite:///")' in path.read_text()]
    assert sources == []
