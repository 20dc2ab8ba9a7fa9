"""What optuna-dashboard shows of a study: the objective's name, what the intermediate values are, a note with
the MLflow parent run's link, each trial's run link. Read back through the dashboard's own WSGI app (its JSON API)
over a real SQLite Optuna storage; no training (the study's plumbing is checked in test_ui.py's store)."""

from __future__ import annotations

import json
import warnings

import pytest

optuna = pytest.importorskip("optuna")
optuna_dashboard = pytest.importorskip("optuna_dashboard")
from werkzeug.test import Client  # noqa: E402

from grokking_tracked.study.dashboard import (INTERMEDIATE_VALUES_ATTR, PARENT_RUN_URL_ATTR, RUN_URL_ATTR,  # noqa: E402
                                              annotate_study, link_trial_run, run_page_url)
from grokking_tracked.study.spec import load_spec  # noqa: E402

SPEC = """
[study]
name = "{name}"

[task]
p = 23

[objective]
target = "{target}"

[search]
lr = {{ type = "float", low = 1e-3, high = 1e-2, log = true }}
train_frac = {{ type = "float", low = 0.3, high = 0.6 }}

[pruner]
{pruner}
"""
PARENT_URL = "http://127.0.0.1:5000/#/experiments/4/runs/parent0123"


def spec_for(tmp_path, target="steps", pruner='name = "median"\nreport_every = 25\nmetric = "test_loss"'):
    path = tmp_path / f"{target}.toml"
    path.write_text(SPEC.format(name=f"dash_{target}", target=target, pruner=pruner))
    return load_spec(str(path))


def dashboard_study(storage: str, study: optuna.Study) -> dict:
    """The study as optuna-dashboard's API serves it to its web page."""
    response = Client(optuna_dashboard.wsgi(storage)).get(f"/api/studies/{study._study_id}")
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    return json.loads(response.get_data(as_text=True))


def test_the_dashboard_names_the_objective_and_links_the_parent_run_and_each_trial_run(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    spec = spec_for(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(study_name=spec.name, storage=storage, directions=spec.directions)
    annotate_study(study, spec, "parent0123", PARENT_URL, "http://127.0.0.1:5000/#/experiments/4/runs")
    annotate_study(study, spec, "parent0123", PARENT_URL, "http://127.0.0.1:5000/#/experiments/4/runs")  # joined
    trial = study.ask()
    link_trial_run(trial, "sqlite:///somewhere/mlflow.db", "4", "run0123")
    trial.report(2.5, 25)
    study.tell(trial, 100.0)

    shown = dashboard_study(storage, study)
    assert shown["objective_names"] == ["steps_to_generalize"]
    attrs = {a["key"]: a["value"] for a in shown["user_attrs"]}
    assert attrs[PARENT_RUN_URL_ATTR] == PARENT_URL
    assert attrs[INTERMEDIATE_VALUES_ATTR].startswith("test_loss")
    assert "every 25 steps" in attrs[INTERMEDIATE_VALUES_ATTR]
    assert f"[parent0123]({PARENT_URL})" in shown["note"]["body"]  # Markdown: a link the dashboard opens
    assert shown["note"]["version"] == 1  # a second invocation joining the study does not rewrite the same note
    (served,) = shown["trials"]
    run_url = "http://127.0.0.1:5000/#/experiments/4/runs/run0123?workflowType=machine_learning"  # `ui`'s address
    assert {a["key"]: a["value"] for a in served["user_attrs"]}[RUN_URL_ATTR] == run_url
    assert f"({run_url})" in served["note"]["body"]


def test_two_objectives_are_named_in_order_and_no_pruner_says_so(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    spec = spec_for(tmp_path, "steps_vs_train_frac", pruner='name = "none"')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(study_name=spec.name, storage=storage, directions=spec.directions)
    annotate_study(study, spec, "parent0123", None)
    shown = dashboard_study(storage, study)
    assert shown["objective_names"] == ["steps_to_generalize", "train_frac"]
    attrs = {a["key"]: a["value"] for a in shown["user_attrs"]}
    assert PARENT_RUN_URL_ATTR not in attrs
    assert "no pruner" in attrs[INTERMEDIATE_VALUES_ATTR]
    assert "`parent0123`" in shown["note"]["body"]


def test_a_tracking_server_serves_the_run_pages_itself():
    view = "?workflowType=machine_learning"  # MLflow 3.17's model-training view, not the GenAI one
    assert run_page_url("http://10.0.0.5:5001/", "7", "abc") == "http://10.0.0.5:5001/#/experiments/7/runs/abc" + view
    assert run_page_url("sqlite:///x/mlflow.db", "7", "abc") == "http://127.0.0.1:5000/#/experiments/7/runs/abc" + view
