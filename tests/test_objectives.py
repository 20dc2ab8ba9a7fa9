"""The objective registry (study/objectives.py): a new objective is one registration, which the spec validates
against, the trial scores with and the dashboard names; the ``delay`` objective on synthetic TrainResults."""

from __future__ import annotations

import pytest

optuna = pytest.importorskip("optuna")

from grokking_tracked.config import preset  # noqa: E402
from grokking_tracked.study import objectives  # noqa: E402
from grokking_tracked.study.dashboard import metric_names  # noqa: E402
from grokking_tracked.study.objectives import Outcome, StudyObjective, median_value  # noqa: E402
from grokking_tracked.study.spec import StudyError, load_spec  # noqa: E402
from grokking_tracked.study.trial import trial_config, trial_value  # noqa: E402
from grokking_tracked.train import Trainer, TrainResult  # noqa: E402

SPEC = """
[study]
name = "toy"
n_trials = 2

[task]
p = 23
d_model = 32
d_mlp = 64
max_steps = 20
eval_every = 5
checkpoint_every = 0

[objective]
target = "{target}"

[search]
lr = {{ type = "float", low = 3e-3, high = 3e-2, log = true }}

[sampler]
name = "random"
seed = 0

[pruner]
name = "{pruner}"
"""


def result(memorized: int | None, generalized: int | None, final: int = 1000) -> TrainResult:
    events = [{"event": name, "step": step} for name, step in (("memorization", memorized),
                                                                 ("generalization", generalized)) if step is not None]
    return TrainResult(history=[], events=events, final_step=final, train_seconds=12.0, stop_reason="max_steps")


def score(name: str, res: TrainResult, max_steps: int = 1000, penalty_factor: float = 2.0):
    return objectives.get(name).score(Outcome(res, preset("default", max_steps=max_steps), penalty_factor))


@pytest.fixture
def toy_objective():
    """final train loss x 1000: an objective no code knows by name."""
    toy = objectives.register(StudyObjective(
        "final_train_loss", ("final_train_loss_x1000",),
        lambda outcome: 1000 * outcome.result.history[-1][1]["train_loss"], "the last train loss, x 1000"))
    yield toy
    del objectives.REGISTRY[toy.name]


def test_a_toy_objective_added_through_the_registry_validates_runs_and_is_named(tmp_path, toy_objective):
    path = tmp_path / "toy.toml"
    path.write_text(SPEC.format(target="final_train_loss", pruner="median"))
    spec = load_spec(path)  # validates, dry run of sampler and pruner included
    assert spec.target is toy_objective and spec.directions == ["minimize"]
    assert metric_names(spec) == ["final_train_loss_x1000"]
    study = optuna.create_study(directions=spec.directions)
    trial = study.ask()
    config = trial_config(spec, trial).replace(device="cpu")
    trained = Trainer(config, progress=False).train()
    value = trial_value(trial, spec, config, trained, None)
    assert value == pytest.approx(1000 * trained.history[-1][1]["train_loss"])
    study.tell(trial, value)
    assert study.best_value == pytest.approx(value)


def test_the_registry_refuses_a_duplicate_and_the_spec_an_unknown_target(tmp_path):
    with pytest.raises(ValueError, match="registered already"):
        objectives.register(StudyObjective("delay", ("x",), lambda o: 0.0, ""))
    path = tmp_path / "bad.toml"
    path.write_text(SPEC.format(target="nope", pruner="none"))
    with pytest.raises(StudyError, match="unknown objective target 'nope'; choose one of steps, seconds, delay"):
        load_spec(path)


def test_an_objective_that_cannot_prune_or_needs_a_searched_field_says_so(tmp_path):
    path = tmp_path / "pareto.toml"
    path.write_text(SPEC.format(target="steps_vs_train_frac", pruner="median"))
    with pytest.raises(StudyError, match="cannot prune"):
        load_spec(path)
    path.write_text(SPEC.format(target="steps_vs_train_frac", pruner="none"))
    with pytest.raises(StudyError, match="needs train_frac in \\[search\\]"):
        load_spec(path)


@pytest.mark.parametrize("memorized, generalized, expected", [
    (200, 1700, 1500.0),      # the delay
    (300, 300, 0.0),          # fits and generalises at the same evaluation
    (200, None, 2000.0),      # never generalises within 1000 steps: 2 x budget
    (None, None, 2000.0),     # never memorises
    (None, 500, 2000.0),      # no memorisation event: no delay to measure
])
def test_delay_is_generalization_minus_memorization_else_the_penalty(memorized, generalized, expected):
    assert score("delay", result(memorized, generalized)) == expected


def test_delay_penalty_is_worse_than_any_delay_within_the_budget():
    worst_real = score("delay", result(0, 1000))
    assert worst_real == 1000.0 < score("delay", result(0, None), penalty_factor=1.5) == 1500.0


def test_the_other_objectives_score_as_before():
    assert score("steps", result(200, 1700)) == 1700.0 and score("steps", result(200, None)) == 2000.0
    outcome = Outcome(result(200, None), preset("default", max_steps=1000), 2.0, seconds_to_generalize=None)
    assert objectives.get("seconds").score(outcome) == 24.0  # 2 x the 12 s trained
    pareto = objectives.get("steps_vs_train_frac").score(Outcome(result(1, 30), preset("default", train_frac=0.4), 2))
    assert pareto == (30.0, 0.4)


def test_the_median_over_seeds():
    assert median_value([300.0, 6000.0, 100.0]) == 300.0
    assert median_value([100.0, 300.0]) == 200.0
    assert median_value([(5.0, 0.4), (1.0, 0.4), (3.0, 0.4)]) == (3.0, 0.4)
