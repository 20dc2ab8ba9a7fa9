"""`grokking-tracked ui` in a real browser: MLflow's UI is a JavaScript app, so a headless Chromium renders the
page `ui` prints and the DOM it built is searched (the run's name in the runs view; the dataset and the source
on a run's page). Debian's `chromium` (installed by .ci/run); skipped with a reason where absent, required
under CI=true. A store with one small run and a one-trial study, made in-process."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import free_port, unavailable

# One tiny run and one tiny study trial (seconds), the UI server (~10 s to answer here) and three page renders.
pytestmark = pytest.mark.slow

TASK = dict(p=23, d_model=32, d_mlp=64, eval_every=10, checkpoint_every=0)
SPEC = """
[study]
name = "ui_study"
experiment = "grokking"
n_trials = 1

[task]
p = 23
d_model = 32
d_mlp = 64
max_steps = 30
eval_every = 10
checkpoint_every = 0

[search]
lr = { type = "float", low = 3e-3, high = 3e-2, log = true }

[sampler]
name = "random"
seed = 1

[pruner]
name = "none"
"""


@pytest.fixture(scope="module")
def browser() -> str:
    """Debian's chromium; asked for first, so a machine without it skips before the store is made."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        unavailable("no `chromium` on PATH (apt-get install -y chromium): the UI test needs a real browser")
    return path


def page_text(browser: str, url: str, profile: Path, budget_ms: int) -> str:
    """The visible text of the DOM Chromium built for ``url`` after ``budget_ms`` of virtual time."""
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={profile}", "--run-all-compositor-stages-before-draw",
                           f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    html = re.sub(r"<script.*?</script>|<style.*?</style>", " ", done.stdout, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def rendered(browser: str, url: str, profile: Path, *wanted: str) -> str:
    """The page's text once every ``wanted`` string is in it: a longer virtual-time budget on each attempt
    (the app fetches runs after it loads); the last text otherwise, for the assertion's message."""
    text = ""
    for budget_ms in (10_000, 20_000, 40_000):
        text = page_text(browser, url, profile, budget_ms)
        if all(w in text for w in wanted):
            break
    return text


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A local store (the embedded SQLite layout) with one plain run and a one-trial study, in experiment grokking."""
    from grokking_tracked.config import preset
    from grokking_tracked.study import run_study
    from grokking_tracked.tracking import run_experiment

    root = tmp_path_factory.mktemp("ui-store")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    config = preset("default", **TASK, max_steps=40)
    outcome = run_experiment(config, uri, run_name="ui-check-run", progress=False)
    spec = root / "ui_study.toml"
    spec.write_text(SPEC)
    run_study(str(spec), workers=1, tracking_uri=uri, storage=f"sqlite:///{root}/mlruns/optuna.db", progress=False,
              echo=lambda line: None)
    return root, uri, outcome, config


@pytest.fixture(scope="module")
def ui(store):
    """`grokking-tracked ui` on a free port; yields the runs-view link it printed for experiment grokking."""
    root, uri, _, _ = store
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "grokking_tracked", "ui", "--tracking-uri", uri, "--port",
                               str(port)], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        link = None
        for line in server.stderr:  # the links come first, then the server's own lines
            if line.startswith("grokking: "):
                link = line.split(": ", 1)[1].strip()
            if line.startswith("MLflow UI on"):
                break
        assert link, "ui printed no runs link for experiment grokking"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "the ui server exited"
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the ui server did not answer within 120 s"
            time.sleep(0.2)
        yield link
    finally:
        server.terminate()  # mlflow server (exec'd in place of `ui`) stops its uvicorn worker with it
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        server.stderr.close()


def test_the_runs_view_ui_prints_shows_the_run_and_the_study(browser, ui, store, tmp_path):
    assert ui.endswith("/runs?workflowType=machine_learning"), ui
    text = rendered(browser, ui, tmp_path / "profile", "ui-check-run", "study-ui_study")
    assert "ui-check-run" in text, text[:2000]
    assert "study-ui_study" in text, text[:2000]  # the study's parent run, its trial nested under it


def test_a_run_page_shows_its_dataset_and_source(browser, ui, store, tmp_path):
    from mlflow import MlflowClient

    from grokking_tracked.tracking.provenance import split_name

    _, uri, outcome, config = store
    run = MlflowClient(uri).get_run(outcome.run_id)
    source = Path(run.data.tags["mlflow.source.name"]).name  # the UI shows the file name of the source
    dataset = split_name(config)  # the train split is logged as <split>/train
    base = ui.split("#", 1)[0]
    url = f"{base}#/experiments/{run.info.experiment_id}/runs/{outcome.run_id}"
    text = rendered(browser, url, tmp_path / "profile", "Datasets", dataset, "Source", source)
    assert re.search(r"Datasets .*" + re.escape(dataset), text), text[:3000]
    assert dataset.startswith("add_mod_23/"), dataset
    assert re.search(r"Source " + re.escape(source), text), text[:3000]


def test_the_study_links_each_trial_to_its_run_page_and_names_its_objective(browser, ui, store, tmp_path):
    """What optuna-dashboard shows (metric names, the trial's run link) was written by the real study, and the
    link, moved to the port `ui` serves on, opens the trial's run page."""
    import optuna

    from grokking_tracked.study.dashboard import RUN_URL_ATTR

    root, _, _, _ = store
    study = optuna.load_study(study_name="ui_study", storage=f"sqlite:///{root}/mlruns/optuna.db")
    assert study.metric_names == ["steps_to_generalize"]
    (trial,) = study.trials
    link = trial.user_attrs[RUN_URL_ATTR]
    assert link.startswith("http://127.0.0.1:5000/#/experiments/")
    assert link.endswith(f"/runs/{trial.user_attrs['mlflow_run_id']}?workflowType=machine_learning")
    url = ui.split("#", 1)[0] + "#" + link.split("#", 1)[1]  # the test's server is on a free port, not 5000
    text = rendered(browser, url, tmp_path / "profile", "ui_study #0")
    assert "ui_study #0" in text, text[:2000]


GENAI_ONLY = ("Agent versions", "Judges", "Prompts")  # MLflow 3.17's GenAI side navigation


def test_the_models_tab_lists_the_checkpoints_as_models_in_the_model_training_view(browser, ui, store, tmp_path):
    """The link to the Models tab (``ExperimentResult.models_url``) opens the model-training view: the run's event
    and final checkpoints are listed as models, not as GenAI "Agent versions" beside Judges and Prompts."""
    from mlflow import MlflowClient

    _, uri, outcome, _ = store
    client = MlflowClient(uri)
    experiment_id = client.get_run(outcome.run_id).info.experiment_id
    models = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{outcome.run_id}'")
    final = next(m.name for m in models if m.name.startswith("final-"))
    base = ui.split("#", 1)[0].rstrip("/")
    url = outcome.models_url(base)
    assert url == f"{base}/#/experiments/{experiment_id}/models?workflowType=machine_learning"
    text = rendered(browser, url, tmp_path / "profile", final)
    assert final in text, text[:3000]
    assert not [word for word in GENAI_ONLY if word in text], text[:3000]


def test_a_run_page_from_our_link_opens_in_the_model_training_view(browser, ui, store, tmp_path):
    """``ExperimentResult.run_url`` (and the study's trial links) carry workflowType: no GenAI navigation. (MLflow
    3.17 reads the view from that parameter, else from the browser's last choice of the sidebar switch, GenAI by
    default; the experiment's mlflow.experimentKind tag is not read while that switch exists.)"""
    _, _, outcome, _ = store
    url = outcome.run_url(ui.split("#", 1)[0].rstrip("/"))
    assert url.endswith(f"/runs/{outcome.run_id}?workflowType=machine_learning"), url
    text = rendered(browser, url, tmp_path / "profile", "ui-check-run", "Model metrics")
    assert "ui-check-run" in text and "Model metrics" in text, (url, text[:3000])
    assert not [word for word in GENAI_ONLY if word in text], (url, text[:3000])
