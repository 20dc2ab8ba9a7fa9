"""Nanda's phases as detection events, on synthetic progress-measure curves whose boundaries are known."""

from __future__ import annotations

import json

import pytest

from grokking_tracked.detect import GrokDetector, detect_events


def curves(keys_from: int = 600, flicker_at: int | None = 650, generalize_at: int = 800, plateau_at: int = 1000,
           norm_falls: bool = True, end: int = 2000, test_peak: int = 150) -> list[tuple[int, dict]]:
    """Evaluations every 10 steps, progress readings every 50.

    memorised at 50; weight norm peaks at 100 then falls 1.5 % per 50 steps (or keeps rising); test loss peaks at
    ``test_peak`` then falls; key frequencies stand out from ``keys_from`` (gone again at ``flicker_at``); test accuracy
    reaches 1 at ``generalize_at``; both Gini coefficients rise linearly from 600 and are flat from ``plateau_at``."""
    history = []
    for step in range(0, end + 1, 10):
        metrics = {"train_acc": min(1.0, step / 50), "train_loss": 1e-6 if step >= 50 else 1.0,
                   "test_acc": 1.0 if step >= generalize_at else 0.05,
                   "test_loss": (10 + step / test_peak * 10 if step <= test_peak else 20 - (step - test_peak) / 100)
                   if step < generalize_at else 0.01}
        if step % 50 == 0:
            if norm_falls:
                norm = 50 + step / 10 if step <= 100 else 60 * (1 - 0.015 * (step - 100) / 50)
            else:
                norm = 50 + step / 10
            rising = min(max(step - 600, 0), plateau_at - 600) / (plateau_at - 600)
            metrics.update(total_weight_norm=norm, gini_embedding=0.1 + 0.5 * rising, gini_neuron_logit=0.2 + 0.6 * rising,
                           n_key_frequencies=3.0 if step >= keys_from and step != flicker_at else 0.0,
                           restricted_loss=1.0, excluded_loss=1.0)
        history.append((step, metrics))
    return history


def steps(events) -> dict[str, int]:
    return {e["event"]: e["step"] for e in events}


def test_phases_fire_once_each_at_the_documented_readings():
    events = detect_events(curves())
    found = steps(events)
    # circuit formation: first reading with the norm <= 98 % of its peak (60 at 100; 58.2 at 200) and the test
    # loss below its peak (at 150): step 200
    assert found["circuit_formation"] == 200
    # clean-up: keys at 600, gone at 650 (the run restarts), then at 700 and 750: fires at 750, from 700
    cleanup = next(e for e in events if e["event"] == "cleanup")
    assert (cleanup["step"], cleanup["from_step"], cleanup["n_key_frequencies"]) == (750, 700, 3.0)
    # clean-up ends once both Gini changed < 0.02 since the reading nearest 0.8 t: at 1250, 0.8 t = 1000 (flat)
    end = next(e for e in events if e["event"] == "cleanup_end")
    assert (end["step"], end["compared_with_step"]) == (1250, 1000)
    assert found["memorization"] == 50 and found["generalization"] == 800
    assert [e["event"] for e in events].count("cleanup_end") == 1 and len(events) == len(set(steps(events)))
    assert found["memorization"] < found["circuit_formation"] < found["cleanup"] < found["generalization"] < \
        found["cleanup_end"]


def test_circuit_formation_waits_for_the_test_loss_to_turn():
    # the weight norm falls from 100 on, but the test loss climbs until 400: circuit formation at the next reading
    assert steps(detect_events(curves(test_peak=400)))["circuit_formation"] == 450


def test_no_phases_without_progress_readings_or_when_weights_keep_growing():
    without_measures = [(s, {k: v for k, v in m.items() if k in ("train_acc", "test_acc", "test_loss")})
                        for s, m in curves()]
    assert set(steps(detect_events(without_measures))) == {"memorization", "generalization"}
    # a weight-decay-free run: the norm never falls, so no circuit formation and nothing after it
    assert not {"circuit_formation", "cleanup", "cleanup_end"} & set(steps(detect_events(curves(norm_falls=False))))


def test_cleanup_end_waits_for_generalization_and_for_the_plateau():
    found = steps(detect_events(curves(generalize_at=1500)))  # the Gini plateau (1250) came before generalisation
    assert found["generalization"] == 1500 and found["cleanup_end"] == 1500
    found = steps(detect_events(curves(plateau_at=1600, end=1800)))  # still rising at the end: no end yet
    assert "cleanup_end" not in found and found["cleanup"] == 750


def test_keys_that_never_settle_never_start_cleanup():
    history = [(s, dict(m, n_key_frequencies=float(s % 100 == 0)) if "n_key_frequencies" in m else m)
               for s, m in curves()]  # keys on every other reading only
    assert "cleanup" not in steps(detect_events(history))


@pytest.mark.parametrize("split", [125, 300, 725, 760, 1100, 1300])
def test_detector_state_round_trips_through_json_mid_phase(split):
    history = curves()
    first = GrokDetector()
    for step, metrics in history:
        if step <= split:
            first.update(step, metrics)
    second = GrokDetector()
    second.load_state(json.loads(json.dumps(first.state())))  # what a checkpoint carries
    for step, metrics in history:
        if step > split:
            second.update(step, metrics)
    assert second.events == detect_events(history)


def test_state_of_a_checkpoint_written_before_the_phases_existed_still_loads():
    detector = GrokDetector()
    detector.load_state({"events": [{"event": "memorization", "step": 50}], "peak_test_loss": None, "evals_below": 0})
    for step, metrics in curves():
        if step > 50:
            detector.update(step, metrics)
    assert steps(detector.events)["cleanup"] == 750
