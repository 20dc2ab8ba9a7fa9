"""The extension points (issue 28): an event added through ``detect.EVENTS`` alone, and an analysis measure added
through ``analysis.registry.MEASURES`` alone, reach everything that reads them (figures, logged models, stop_after,
phases; the run's metrics and figures), as the toy objective does for studies."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from grokking_tracked import detect, figures
from grokking_tracked.config import Config, ConfigError
from grokking_tracked.train import Callback, Trainer

TOY_COLOR = "#123456"
TINY = dict(p=23, d_model=32, d_mlp=64, n_heads=4, max_steps=40, eval_every=10, checkpoint_every=0, stop_margin=10)


def halfway(detector, step, metrics):
    """A toy rule: fires at the first evaluation at or after step 20 (counting its evaluations in rule_state)."""
    seen = detector.rule_state.setdefault("toy", {"evaluations": 0})
    seen["evaluations"] += 1
    return {"evaluations": seen["evaluations"]} if step >= 20 else None


@pytest.fixture
def toy_event(monkeypatch):
    """One registry entry, nothing else: removed again after the test."""
    event = detect.Event("toy", halfway, TOY_COLOR, ":", logged_model=True, can_stop=True, phase=True)
    monkeypatch.setitem(detect.EVENTS, "toy", event)
    return event


class Reasons(Callback):
    def __init__(self):
        self.reasons = {}

    def on_checkpoint(self, run, step, reasons):
        self.reasons[step] = list(reasons)


def test_an_unregistered_event_cannot_stop_a_run():
    with pytest.raises(ConfigError, match="unknown stop_after 'toy'"):
        Config(**TINY, stop_after="toy").validate()


def test_a_toy_event_reaches_detection_checkpoints_stop_figures_and_phases(toy_event):
    reasons = Reasons()
    config = Config(**TINY, stop_after="toy", stop_on_grok=True)  # can_stop: stop_after accepts it
    result = Trainer(config.replace(max_steps=200), callbacks=[reasons], progress=False).train()
    assert result.step_of("toy") == 20 and detect.step_of(result.events, "toy") == 20
    assert result.final_step == 20 + config.stop_margin  # it stopped the run
    assert "toy" in reasons.reasons[20]  # its checkpoint is taken (and becomes a logged model, below)

    from grokking_tracked.tracking.models import model_reasons

    assert model_reasons(["toy", "periodic", "final"]) == ["toy", "final"]

    fig = figures.learning_curves(result.history, result.events)
    marks = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("toy @ 20")]
    assert marks and marks[0].get_color() == TOY_COLOR and marks[0].get_linestyle() == ":"

    from grokking_tracked.analysis.report import _phases

    assert _phases(result.events, "events.json")["toy"] == 20


def test_a_toy_event_becomes_a_logged_model(toy_event, local_store):
    from grokking_tracked.tracking import run_experiment

    config = Config(**TINY, stop_on_grok=False)
    outcome = run_experiment(config, tracking_uri=local_store, experiment="toy-event", progress=False)
    assert outcome.result.step_of("toy") == 20
    client = MlflowClient(local_store)
    run = client.get_run(outcome.run_id)
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{outcome.run_id}'")
    by_event = {m.tags["grokking_tracked.event"]: m for m in models}
    assert "toy" in by_event and by_event["toy"].tags["grokking_tracked.step"] == "20"


# ---------------------------------------------------------------------------------------------- measures
def mlp_active(given):
    """A toy measure: the fraction of MLP neurons active at "=" over every pair (reads one declared hook)."""
    from transformer_lens.utilities import get_act_name

    post = given.cache[get_act_name("post", 0)]  # (p², 3, d_mlp)
    assert post.shape[0] == given.logits.shape[0] == given.model.config.p ** 2
    return {"toy_active": float((post[:, -1] > 0).float().mean())}


@pytest.fixture
def toy_measure(monkeypatch):
    from transformer_lens.utilities import get_act_name

    from grokking_tracked.measure_registry import MEASURES, Measure

    measure = Measure("toy", ("toy_active",), mlp_active, hooks=(get_act_name("post", 0),), live=True,
                      description="active MLP neurons at '='")
    monkeypatch.setitem(MEASURES, "toy", measure)
    return measure


def test_a_toy_measure_reaches_the_run_metrics_live_and_through_analyze(toy_measure, local_store):
    from grokking_tracked.tracking import analyze_run, run_experiment

    config = Config(**{**TINY, "checkpoint_every": 20}, progress_every=10, stop_on_grok=False)
    outcome = run_experiment(config, tracking_uri=local_store, experiment="toy-measure", progress=False)
    client = MlflowClient(local_store)
    live = client.get_metric_history(outcome.run_id, "progress/toy_active")  # live: at every progress reading
    assert sorted(m.step for m in live) == [0, 10, 20, 30, 40] and all(0 <= m.value <= 1 for m in live)

    summary = analyze_run(outcome.run_id, tracking_uri=local_store, progress=False)
    assert summary["measures"]["toy"] == ["toy_active"]
    logged = client.get_metric_history(outcome.run_id, "analysis/toy_active")  # per checkpoint, from analyze
    assert sorted(m.step for m in logged) == [0, 20, 40]
    files = {info.path.rsplit("/", 1)[-1] for info in client.list_artifacts(outcome.run_id, summary["analysis_path"])}
    assert "toy.png" in files and "toy.png" in summary["figures"]
