"""Parallel workers of a seeded study draw different trials; one worker stays reproducible from the spec's seed."""

from __future__ import annotations

import sqlite3

import optuna

from conftest import run_cli
from grokking_tracked.study.spec import StudySpec, make_sampler
from grokking_tracked.study.storage import create_or_load_study

SPACE = {"lr": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True),
         "train_frac": optuna.distributions.FloatDistribution(0.3, 0.8)}


def first_draws(sampler, n=3):
    study = optuna.create_study(sampler=sampler)
    draws = []
    for _ in range(n):
        trial = study.ask(SPACE)
        draws.append(tuple(trial.params.values()))
        study.tell(trial, 1.0)
    return draws


def spec(sampler="tpe"):
    return StudySpec(path="x.toml", name="s", sampler=sampler, sampler_args={"seed": 7})


def test_the_same_seed_draws_the_same_trials_and_a_salt_changes_them():
    for name in ("tpe", "random"):
        assert first_draws(make_sampler(spec(name))) == first_draws(make_sampler(spec(name)))
        assert first_draws(make_sampler(spec(name), "host:1:0")) != first_draws(make_sampler(spec(name), "host:1:1"))
        assert first_draws(make_sampler(spec(name), "host:1:1")) == first_draws(make_sampler(spec(name), "host:1:1"))


def test_exactly_one_caller_creates_the_study(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db")
    assert create_or_load_study(spec(), storage, "s")[1] is True
    assert create_or_load_study(spec(), storage, "s")[1] is False


SPEC = """
[study]
name = "seeds"
experiment = "seeds"
n_trials = 4
[task]
p = 23
d_model = 32
d_mlp = 64
max_steps = 20
eval_every = 10
checkpoint_every = 0
[search]
lr = { type = "float", low = 1e-3, high = 3e-2, log = true }
train_frac = { type = "float", low = 0.4, high = 0.8 }
[sampler]
name = "random"
seed = 3
[pruner]
name = "none"
"""


def test_two_workers_of_a_seeded_study_train_different_trials(tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC)
    done = run_cli("study", "spec.toml", "--workers", "2", "--no-progress", cwd=tmp_path,
                   env={"GROKKING_TORCH_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(tmp_path / "mlruns" / "optuna.db") as db:
        rows = db.execute("select trial_id, param_name, param_value from trial_params").fetchall()
    params = {}
    for trial_id, name, value in rows:
        params.setdefault(trial_id, {})[name] = value
    assert len(params) >= 4
    assert len({tuple(sorted(p.items())) for p in params.values()}) == len(params)  # no trial drawn twice
