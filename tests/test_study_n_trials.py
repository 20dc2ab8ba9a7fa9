"""``--n-trials N`` means N finished trials (COMPLETE or PRUNED) across workers and invocations: with 2 workers
a worker does not start a trial while the trials running elsewhere would make up N, and a trial asked at the
same moment beyond N (``SurplusTrial``) trains nothing and ends FAIL with that reason."""

from __future__ import annotations

import sqlite3

import pytest

from conftest import run_cli

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

from grokking_tracked.study.storage import is_surplus, room_for_trials  # noqa: E402

SPEC = """
[study]
name = "n_trials"
experiment = "n-trials"
n_trials = 10
[task]
p = 23
d_model = 32
d_mlp = 64
max_steps = 60
eval_every = 10
checkpoint_every = 0
stop_margin = 0
[search]
lr = { type = "float", low = 1e-3, high = 3e-2, log = true }
[sampler]
name = "random"
seed = 3
[pruner]
name = "none"
"""


def trials(tmp_path):
    return optuna.load_study(study_name="n_trials", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db").get_trials()


def test_two_workers_finish_exactly_n_trials_and_a_second_invocation_adds_none(tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC)
    env = {"GROKKING_TORCH_THREADS": "1"}
    done = run_cli("study", "spec.toml", "--workers", "2", "--n-trials", "3", "--no-progress", cwd=tmp_path, env=env,
                   timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 workers started" in done.stdout + done.stderr
    first = trials(tmp_path)
    finished = [t for t in first if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3, [(t.number, t.state) for t in first]
    others = [t for t in first if t not in finished]  # only surplus trials, which trained nothing
    assert all(t.state == TrialState.FAIL and t.user_attrs["fail_reason"].startswith("surplus") and
               "mlflow_run_id" not in t.user_attrs for t in others)
    again = run_cli("study", "spec.toml", "--workers", "2", "--n-trials", "3", "--no-progress", cwd=tmp_path, env=env,
                    timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "3/3 trials finished" in again.stdout + again.stderr and len(trials(tmp_path)) == len(first)
    with sqlite3.connect(tmp_path / "mlruns" / "mlflow.db") as db:  # no MLflow run left RUNNING
        assert db.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0] == 0


def study_with(complete: int, running: int) -> tuple[optuna.Study, list]:
    study = optuna.create_study()
    for _ in range(complete):
        study.tell(study.ask(), 1.0)
    return study, [study.ask() for _ in range(running)]  # asked, never told: RUNNING


def test_room_counts_the_trials_running_elsewhere():
    study, _ = study_with(complete=2, running=1)
    assert room_for_trials(study, 5) == 2
    assert room_for_trials(study, 2) == 0  # N finished: stop
    # the running trial would make the 3rd: no room now; past the deadline the wait gives up
    assert room_for_trials(study, 3, deadline=0.0) == 0


def test_room_reopens_when_the_trial_running_elsewhere_fails():
    study, running = study_with(complete=2, running=1)
    study.tell(running[0], state=TrialState.FAIL)
    assert room_for_trials(study, 3, deadline=0.0) == 1


def test_of_trials_asked_at_once_those_beyond_n_are_surplus_by_number():
    study, running = study_with(complete=1, running=3)
    assert [is_surplus(study, t.number, 3) for t in running] == [False, False, True]


def test_pruned_trials_count_as_finished_and_failed_ones_do_not():
    study, running = study_with(complete=1, running=2)
    study.tell(study.ask(), state=TrialState.PRUNED)
    study.tell(study.ask(), state=TrialState.FAIL)
    assert [is_surplus(study, t.number, 3) for t in running] == [False, True]  # 1 complete + 1 pruned + 1 earlier
