"""The grokking-aware pruner (study/pruners.py): its rules replayed on recorded training histories, and once end to
end through the real CLI (a real Optuna storage, a real MLflow store), where its reason reaches the trial's user
attrs and its run."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from grokking_tracked.config import Config
from grokking_tracked.study.pruners import (GrokkingPruner, Rules, Signals, RisingTestLoss, decide, onset_spans,
                                            replay)
from grokking_tracked.train import Trainer

optuna = pytest.importorskip("optuna")
from mlflow import MlflowClient  # noqa: E402
from optuna.trial import TrialState  # noqa: E402


def history(budget: int, every: int, train_acc, test_acc, weight_norm, collapse=None):
    """An evaluation history: each metric a function of the step (collapse read every 100 steps, as progress_every)."""
    rows = []
    for step in range(0, budget + 1, every):
        metrics = {"train_acc": train_acc(step), "test_acc": test_acc(step), "weight_norm": weight_norm(step)}
        if collapse is not None and step % 100 == 0:
            metrics["softmax_collapse"] = collapse(step)
        rows.append((step, metrics))
    return rows


# A late grokker under weight decay, as the `default` preset's runs look: memorised at 150, its weight norm falls
# while the collapse fraction is high, onset at 1,500, generalised at 1,750 of a 2,000-step budget.
LATE = dict(budget=2000, every=10, train_acc=lambda s: min(1.0, s / 150), test_acc=lambda s: 0.02 if s < 1700 else 1.0,
            weight_norm=lambda s: 40 + min(s, 150) / 10 - max(0, s - 150) / 100,
            collapse=lambda s: 0.0 if s < 300 else 0.95)
LATE_EVENTS = [{"event": "memorization", "step": 150}, {"event": "onset", "step": 1500},
               {"event": "generalization", "step": 1750}]
SPANS = [250, 400, 600]  # onset -> generalisation of the study's earlier trials


def test_a_late_grokker_is_not_pruned():
    decisions = replay(history(**LATE), LATE_EVENTS, 2000, 50, SPANS, loss="softmax32")
    assert decisions and not any(d.prune for _, d in decisions)
    assert decisions[-1][0] == 1700 and decisions[-1][1].rule == "onset"  # reported until it generalised at 1,750
    assert {d.rule for _, d in decisions} == {"waiting", "onset"}
    assert all(d.reason for _, d in decisions)


def test_a_never_memoriser_is_pruned_with_its_reason():
    never = dict(LATE, train_acc=lambda s: 0.4, weight_norm=lambda s: 40.0, collapse=lambda s: 0.0)
    decisions = replay(history(**never), [], 2000, 50, SPANS, loss="softmax32")
    step, last = decisions[-1]
    assert last.prune and last.rule == "not_memorized" and step == 600  # the first report at 0.3 x 2,000
    assert "not memorised by step 600" in last.reason and "train accuracy 0.400" in last.reason
    assert not any(d.prune for _, d in decisions[:-1])


def test_collapse_with_a_rising_weight_norm_is_pruned():
    # No weight decay (Prieto et al.'s baseline): memorised, then the weights grow and float32 softmax collapses.
    stuck = dict(LATE, test_acc=lambda s: 0.02, weight_norm=lambda s: 40 + s / 10)
    decisions = replay(history(**stuck), LATE_EVENTS[:1], 2000, 50, SPANS, loss="softmax32")
    step, last = decisions[-1]
    assert last.prune and last.rule == "collapse" and step == 750  # 0.3 x 2,000 steps after memorising at 150
    assert "softmax collapse 0.95" in last.reason and "weight norm still rising" in last.reason
    # The same collapse with the weight norm falling (weight decay at work) is the late grokker: kept.
    assert not any(d.prune for _, d in replay(history(**LATE), LATE_EVENTS[:1], 2000, 50, [], loss="softmax32"))
    # A float64 loss keeps learning from pairs whose float32 softmax reads 1.0: the rule does not read the fraction.
    decisions = replay(history(**stuck), LATE_EVENTS[:1], 2000, 50, [], loss="softmax")
    assert not any(d.prune for _, d in decisions) and {d.rule for _, d in decisions} == {"waiting"}


def with_test_loss(rows, test_loss):
    return [(step, dict(metrics, test_loss=test_loss(step))) for step, metrics in rows]


def test_a_test_loss_rising_since_memorisation_is_pruned_and_a_short_rise_is_not():
    """The measured rule (benchmarks/pruner_calibration.py): a never-generalising trial's test loss keeps rising
    after memorisation; a late grokker's rises for a while, then falls before its onset."""
    stuck = with_test_loss(history(**dict(LATE, test_acc=lambda s: 0.02, collapse=None)), lambda s: 2 + s / 1000)
    decisions = replay(stuck, LATE_EVENTS[:1], 2000, 50, [], loss="softmax")
    step, last = decisions[-1]
    assert last.prune and last.rule == "test_loss_rising" and step == 650  # 0.25 x 2,000 steps after step 150
    assert "test loss rising since step 150 (500 steps >= 0.25 of the 2000-step budget" in last.reason
    assert not any(d.prune for _, d in decisions[:-1])
    # Rising 150 -> 500 (350 steps < 500), then falling until the onset at 1,500: kept to its generalisation.
    late = with_test_loss(history(**dict(LATE, collapse=None)),
                          lambda s: 2 + min(s, 500) / 1000 - max(0, s - 500) / 2000)
    decisions = replay(late, LATE_EVENTS, 2000, 50, [], loss="softmax")
    assert decisions and not any(d.prune for _, d in decisions) and decisions[-1][1].rule == "onset"
    assert not any(d.prune for _, d in replay(stuck, LATE_EVENTS[:1], 2000, 50, [], Rules(rising_for=0.5),
                                              loss="softmax")[:-1])


def test_the_test_loss_rise_starts_at_the_lowest_point_since_memorisation():
    rise = RisingTestLoss()
    assert rise.update(100, 1.0, None) is None  # not memorised yet
    assert rise.update(200, 3.0, 150) == 200
    assert rise.update(210, 2.0, 150) == 210  # a new low: the rise starts again there
    assert rise.update(220, 2.5, 150) == 210
    assert rise.update(230, 2.4, 150) is None  # below the high since the low: not rising now
    assert rise.update(240, 2.6, 150) == 210


def test_no_time_left_for_the_delay_this_study_has_seen():
    no_onset = dict(LATE, collapse=lambda s: 0.0, test_acc=lambda s: 0.02)
    decisions = replay(history(**no_onset), LATE_EVENTS[:1], 2000, 50, SPANS, loss="softmax32")
    step, last = decisions[-1]
    assert last.prune and last.rule == "no_time" and step == 1900  # 100 steps left < 0.5 x 250 (the quickest span)
    assert "the quickest onset -> generalisation span of 3 finished trials" in last.reason
    fewer = replay(history(**no_onset), LATE_EVENTS[:1], 2000, 50, SPANS[:2], loss="softmax32")  # < 3 spans
    assert not any(d.prune for _, d in fewer)


def test_decide_without_signals_keeps_and_rules_refuse_bad_values():
    assert decide(Signals(step=10, budget=100, train_acc=0.1, test_acc=0.0, weight_norm=1.0), []).rule == "waiting"
    with pytest.raises(ValueError, match="memorize_by must be a number in"):
        Rules(memorize_by=1.5)


def test_onset_spans_read_finished_trials_events():
    trial = optuna.trial.create_trial(value=1.0, user_attrs={"events": [{"event": "onset", "step": 100},
                                                                         {"event": "generalization", "step": 160}],
                                                             "seed_events": [[{"event": "onset", "step": 10},
                                                                              {"event": "generalization", "step": 90}],
                                                                             [{"event": "memorization", "step": 5}]]})
    assert onset_spans([trial]) == [60, 80]


def test_a_real_training_history_replays():
    """A real tiny run that generalises within its budget is never pruned on its own history (it generalised at
    step 330 on an AMD EPYC, below 300 on a Xeon: float rounding differs; the budget leaves room for both)."""
    config = Config(p=23, d_model=32, d_mlp=64, max_steps=800, eval_every=10, progress_every=50, train_frac=0.8)
    result = Trainer(config, progress=False).train()
    assert result.grokked
    decisions = replay(result.history, result.events, config.max_steps, 20, [], loss=config.loss)
    assert not any(d.prune for _, d in decisions)


SPEC = """
[study]
name = "grokprune"
experiment = "pruner-test"
n_trials = 2
heartbeat_interval = 1
grace_period = 3

[task]
p = 23
d_model = 32
d_mlp = 64
max_steps = 60
eval_every = 10
checkpoint_every = 0
progress_every = 20

[search]
lr = { type = "float", low = 1e-6, high = 2e-6, log = true }

[sampler]
name = "random"
seed = 1

[pruner]
name = "grokking"
report_every = 10
memorize_by = 0.3
"""


def test_study_with_the_grokking_pruner_records_its_reasons(tmp_path):
    """lr ~1e-6 cannot memorise in 60 steps: each trial is pruned at step 20 (>= 0.3 x 60) by `not_memorized`, the
    reason in its user attrs and on its KILLED run."""
    spec = tmp_path / "grokprune.toml"
    spec.write_text(SPEC)
    done = run_cli("study", str(spec), "--workers", "1", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    study = optuna.load_study(study_name="grokprune", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert isinstance(GrokkingPruner(), optuna.pruners.BasePruner)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    for trial in trials:
        decisions = trial.user_attrs["pruner_decisions"]
        assert [d["rule"] for d in decisions] == ["waiting", "not_memorized"]
        assert decisions[-1]["step"] == 20 and decisions[-1]["prune"] is True
        assert trial.user_attrs["grokking_signals"]["step"] == 20
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["optuna.pruned_step"] == "20"
        assert "not_memorized: not memorised by step 20" in run.data.tags["optuna.prune_reason"]
        assert [d["rule"] for d in json.loads(run.data.tags["grokking_tracked.pruner_decisions"])] == [
            "waiting", "not_memorized"]


@pytest.mark.parametrize("extra, message", [("memorize_by = 2", "memorize_by must be a number in (0, 1], got 2"),
                                            ("bogus = 1", "unexpected keyword argument 'bogus'"),
                                            ("min_spans = 0", "min_spans must be a positive integer")])
def test_bad_grokking_pruner_arguments_are_one_line(tmp_path, extra, message):
    from grokking_tracked.study.spec import StudyError, load_spec

    spec = tmp_path / "bad.toml"
    spec.write_text(SPEC.replace('memorize_by = 0.3\n', extra + "\n"))
    with pytest.raises(StudyError) as error:
        load_spec(spec)
    assert message in str(error.value) and "\n" not in str(error.value)
