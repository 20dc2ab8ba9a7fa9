"""``[study] seeds = N``: a trial trains its configuration with N seeds, each a child run of the trial's run; its
value is the median over the seeds and its run carries the spread. One seed failing fails the trial. Real stores
without a server: MLflow's SQLite store in a temp dir and an in-memory Optuna study."""

from __future__ import annotations

import statistics

import optuna
import pytest
from optuna.trial import TrialState

from grokking_tracked.study import objectives
from grokking_tracked.study.spec import StudySpec
from grokking_tracked.study.trial import Objective, SeedFailed, StudyContext
from grokking_tracked.tracking import TrackedRun, connect

TINY = dict(p=23, d_model=32, d_mlp=64, max_steps=40, eval_every=10, checkpoint_every=0, stop_margin=0,
            train_frac=0.6, lr=3e-2, device="cpu")


@pytest.fixture
def client(tmp_path):
    return connect(f"sqlite:///{tmp_path}/store/mlflow.db")


@pytest.fixture
def seed_cubed():
    """A value known per seed, skewed so that median, mean and any one seed differ: (seed - 999)^3 = 0, 1, 8."""
    toy = objectives.register(objectives.StudyObjective("seed_cubed", ("seed_cubed",),
                                                        lambda outcome: float((outcome.config.seed - 999) ** 3), ""))
    yield toy
    del objectives.REGISTRY[toy.name]


@pytest.fixture
def context(client, seed_cubed):
    parent = TrackedRun.create(client, "seeds", run_name="parent", leased=False)
    parent.end("FINISHED")
    spec = StudySpec(path="x.toml", name="s", overrides=TINY, seeds=3, pruner="none", objective="seed_cubed")
    return StudyContext(spec, "s", "seeds", parent.run_id, client, progress=False)


def seed_runs(client, trial_run_id):
    experiment = client.get_experiment_by_name("seeds")
    runs = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{trial_run_id}'")
    return sorted(runs, key=lambda r: int(r.data.tags["grokking_tracked.seed_index"]))


def optimize_one(objective) -> optuna.trial.FrozenTrial:
    study = optuna.create_study()
    study.optimize(objective, n_trials=1, catch=(SeedFailed,))
    TrackedRun.wait_for_background(timeout=120)
    return study.trials[0]


def test_a_seeded_trial_scores_the_median_and_logs_every_seed_and_the_spread(client, context):
    trial = optimize_one(Objective(context))
    assert trial.state == TrialState.COMPLETE
    values = trial.user_attrs["seed_values"]
    assert values == [0.0, 1.0, 8.0] and trial.value == statistics.median(values) == 1.0
    assert trial.user_attrs["value_min"] == min(values) and trial.user_attrs["value_max"] == max(values)
    assert trial.user_attrs["phase"] in trial.user_attrs["seed_phases"]
    trial_run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert trial_run.info.status == "FINISHED" and trial_run.data.tags["grokking_tracked.seeds"] == "3"
    assert trial_run.data.metrics["objective_median"] == trial.value
    assert [trial_run.data.metrics[f"objective_seed_{k}"] for k in range(3)] == values
    seeds = seed_runs(client, trial_run.info.run_id)
    assert [r.info.status for r in seeds] == ["FINISHED"] * 3
    # each seed is its own model seed and data split, and has its own curves
    assert [(int(r.data.params["seed"]), int(r.data.params["data_seed"])) for r in seeds] == [(999, 598), (1000, 599),
                                                                                          (1001, 600)]
    for run in seeds:
        assert client.get_metric_history(run.info.run_id, "accuracy/test") and run.data.tags["grokking_tracked.phase"]


class SecondSeedFails(Objective):
    def train_seed(self, config, run, pruning):
        if config.seed == 1000:
            raise RuntimeError("out of luck")
        return super().train_seed(config, run, pruning)


def test_one_seed_failing_fails_the_trial_and_leaves_the_earlier_seed_finished(client, context):
    trial = optimize_one(SecondSeedFails(context))
    assert trial.state == TrialState.FAIL
    trial_run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert trial_run.info.status == "FAILED"
    assert "seed 1 (seed=1000, data_seed=599) failed: RuntimeError: out of luck" in \
        trial_run.data.tags["optuna.fail_reason"]
    seeds = seed_runs(client, trial_run.info.run_id)
    assert [r.info.status for r in seeds] == ["FINISHED", "FAILED"]  # the third seed never started


SPEC = """
[study]
name = "s"
seeds = {seeds}
[task]
p = 23
max_steps = 20
[search]
{search}
[pruner]
name = "none"
"""


@pytest.mark.parametrize("seeds, search, message", [
    (0, 'lr = { low = 1e-3, high = 1e-2 }', "seeds must be a positive integer"),
    (3, 'seed = { type = "int", low = 0, high = 5 }', "do not also search seed or data_seed"),
])
def test_a_bad_seeds_setting_is_refused_in_one_line(tmp_path, seeds, search, message):
    from grokking_tracked.study.spec import StudyError, load_spec

    path = tmp_path / "s.toml"
    path.write_text(SPEC.format(seeds=seeds, search=search))
    with pytest.raises(StudyError, match=message):
        load_spec(path)
