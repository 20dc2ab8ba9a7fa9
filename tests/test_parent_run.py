"""One parent run per study, even when invocations start together: only the study's creator creates it."""

from __future__ import annotations

import threading

import optuna

from grokking_tracked.study.spec import StudySpec
from grokking_tracked.study.workers import PARENT_RUN_ATTR, open_parent_run
from grokking_tracked.tracking import connect


def test_a_joining_invocation_waits_for_the_creators_parent_run(tmp_path):
    client = connect(f"sqlite:///{tmp_path}/store/mlflow.db")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    spec = StudySpec(path="x.toml", name="s")
    study = optuna.create_study(study_name="s", storage=storage)
    joined: dict = {}

    def join() -> None:  # starts before the creator: nothing to find yet
        joiner_view = optuna.load_study(study_name="s", storage=storage)
        with open_parent_run(client, "parents", joiner_view, spec, storage, created=False, wait_seconds=60) as run:
            joined["run_id"] = run.run_id

    joiner = threading.Thread(target=join)
    joiner.start()
    with open_parent_run(client, "parents", study, spec, storage, created=True) as parent:
        created = parent.run_id
    joiner.join(90)
    assert joined["run_id"] == created == study.user_attrs[PARENT_RUN_ATTR]
    runs = client.search_runs([client.get_experiment_by_name("parents").experiment_id])
    assert [r.info.run_id for r in runs] == [created]


def test_a_joiner_creates_the_parent_run_itself_when_the_creator_never_does(tmp_path):
    client = connect(f"sqlite:///{tmp_path}/store/mlflow.db")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage)
    with open_parent_run(client, "parents", study, StudySpec(path="x.toml", name="s"), storage, created=False,
                         wait_seconds=1) as parent:
        assert study.user_attrs[PARENT_RUN_ATTR] == parent.run_id
