"""Each grid point exactly once (issue 26 item 4). Optuna's GridSampler repeats points across workers by design
(optuna #2039, #4627); a grid study instead queues each point as a WAITING trial, which the storage hands to one
worker only, and a trial holding no queued point, or a point an earlier live trial holds, ends untrained."""

from __future__ import annotations

import sqlite3
from collections import Counter

import pytest

from conftest import run_cli

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

from grokking_tracked.study.spec import load_spec  # noqa: E402
from grokking_tracked.study.storage import GRID_SURPLUS, create_or_load_study, grid_point_problem  # noqa: E402

SPEC = """
[study]
name = "grid_once"
experiment = "grid-once"
n_trials = 4

[task]
p = 23
d_model = 32
d_mlp = 64
max_steps = 30
eval_every = 10
checkpoint_every = 0
stop_margin = 0

[search]
lr = { values = [3e-3, 1e-2] }
train_frac = { values = [0.4, 0.8] }

[sampler]
name = "grid"

[pruner]
name = "none"
"""
POINTS = {(3e-3, 0.4), (3e-3, 0.8), (1e-2, 0.4), (1e-2, 0.8)}


def point(trial) -> tuple:
    return trial.params["lr"], trial.params["train_frac"]


def test_a_grid_study_queues_each_point_once_and_a_resumption_only_the_failed_ones(tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC)
    spec = load_spec(tmp_path / "spec.toml")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study, created = create_or_load_study(spec, storage, "grid_once")
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert created and {tuple(t.system_attrs["fixed_params"].values()) for t in waiting} == POINTS
    assert len(waiting) == 4
    create_or_load_study(spec, storage, "grid_once")  # joining: nothing more queued
    assert len(study.get_trials()) == 4

    first = study.ask()  # a queued point (the storage moves it WAITING -> RUNNING for one caller only)
    assert first.number == 0 and grid_point_problem(spec, study, first) is None
    study.tell(first, state=TrialState.FAIL)
    failed = study.get_trials()[0].system_attrs["fixed_params"]
    create_or_load_study(spec, storage, "grid_once")  # a resumption queues the failed point again
    again = [t for t in study.get_trials(states=(TrialState.WAITING,)) if t.system_attrs["fixed_params"] == failed]
    assert len(again) == 1 and again[0].number == 4


def test_a_duplicate_or_pointless_trial_is_told_not_to_train(tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC)
    spec = load_spec(tmp_path / "spec.toml")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study, _ = create_or_load_study(spec, storage, "grid_once")
    # two invocations resuming at the same moment may queue a point twice: only the earlier trial trains it
    study.enqueue_trial({"lr": 3e-3, "train_frac": 0.4})
    asked = [study.ask() for _ in range(5)]
    problems = [grid_point_problem(spec, study, t) for t in asked]
    assert problems == [None] * 4 + ["duplicate: trial 0 holds the same grid point"]
    study.tell(asked[0], state=TrialState.FAIL)  # ... unless the earlier one failed: then the later one retries it
    assert grid_point_problem(spec, study, asked[4]) is None
    for trial in asked[1:]:
        study.tell(trial, 1.0)
    pointless = study.ask()  # the queue is empty: a trial the sampler would fill has no point of its own
    assert grid_point_problem(spec, study, pointless) == GRID_SURPLUS


def test_two_workers_run_every_grid_point_exactly_once_and_a_second_invocation_adds_nothing(tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC)
    env = {"GROKKING_TORCH_THREADS": "1"}
    done = run_cli("study", "spec.toml", "--workers", "2", "--no-progress", cwd=tmp_path, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 workers started" in done.stderr and "Traceback" not in done.stderr
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    trials = optuna.load_study(study_name="grid_once", storage=storage).get_trials()
    trained = [t for t in trials if "mlflow_run_id" in t.user_attrs]
    assert Counter(point(t) for t in trained) == Counter(POINTS)  # each point trained once
    assert all(t.state == TrialState.COMPLETE for t in trained)
    others = [t for t in trials if t not in trained]  # at most trials that trained nothing, by design
    assert all(t.state == TrialState.FAIL and t.user_attrs["fail_reason"].startswith(("surplus", "duplicate"))
               for t in others), [(t.number, t.state, t.user_attrs) for t in others]

    # asking for more trials than the grid has points: GridSampler would re-evaluate points; nothing is left
    again = run_cli("study", "spec.toml", "--workers", "2", "--n-trials", "6", "--no-progress", cwd=tmp_path, env=env,
                    timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4/6 trials finished" in again.stderr
    assert len(optuna.load_study(study_name="grid_once", storage=storage).get_trials()) == len(trials)
    with sqlite3.connect(tmp_path / "mlruns" / "mlflow.db") as db:
        statuses = Counter(s for (s,) in db.execute("select status from runs"))
    assert statuses == {"FINISHED": 5}  # 4 trials and the parent run, each once
