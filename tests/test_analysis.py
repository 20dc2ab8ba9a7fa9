"""analyze_checkpoints on real runs: a grokking run trained past clean-up and a weight-decay-free control trained
at least as long, whose answers must be opposite; and the checkpoint safety checks."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from grokking_tracked.analysis import (CheckpointError, analyze_checkpoints, find_checkpoints, load_checkpoint,
                                       model_from_checkpoint)
from grokking_tracked import fourier
from grokking_tracked.analysis import algorithm
from grokking_tracked.analysis.plots import compare_runs_figure
from grokking_tracked.config import preset
from grokking_tracked.train import Callback, Trainer

FIGURES = {"progress_measures.png", "fourier_spectrum.png", "attention_patterns.png", "attention_change.png",
           "activation_stats.png", "gradient_flow.png", "weight_evolution.png", "algorithm.png"}
# p=59 with half the pairs: memorises by ~50 steps, generalises by ~250, clean-up ends by ~500 (seconds on 1 core).
GROKKING = dict(p=59, train_frac=0.5, checkpoint_every=40, progress_every=20, max_steps=1500)
# Two real trainings (~700 steps each) and their analyses: ~40 s on 2 idle cores; they carry most tests here.
pytestmark = pytest.mark.slow


class SaveCheckpoints(Callback):
    def __init__(self, directory: Path):
        self.directory = directory

    def on_checkpoint(self, trainer, step, reasons):
        torch.save(trainer.state_dict(), self.directory / f"step_{step:06d}.pt")


def train(directory: Path, config):
    return Trainer(config, [SaveCheckpoints(directory)], progress=False).train()


@pytest.fixture(scope="module")
def grokked(tmp_path_factory):
    """Trained until clean-up is over (stop_after = cleanup_end), then analysed with its history and events."""
    directory = tmp_path_factory.mktemp("grokked")
    result = train(directory, preset("default", **GROKKING, stop_after="cleanup_end"))
    out = tmp_path_factory.mktemp("grokked-analysis")
    summary = analyze_checkpoints(find_checkpoints(directory), out, history=result.history, events=result.events,
                                  progress=False)
    return directory, result, out, summary


@pytest.fixture(scope="module")
def control(grokked, tmp_path_factory):
    """The same task without weight decay, trained at least as long as the grokking run: it only memorises."""
    directory = tmp_path_factory.mktemp("control")
    result = train(directory, preset("default", **dict(GROKKING, max_steps=grokked[1].final_step), weight_decay=0.0))
    summary = analyze_checkpoints(find_checkpoints(directory), tmp_path_factory.mktemp("control-analysis"),
                                  history=result.history, progress=False)
    return result, summary


def records(summary) -> dict[int, dict]:
    return {r["step"]: r for r in summary["checkpoints"]}


def test_analysis_writes_figures_and_summary(grokked):
    directory, result, out, summary = grokked
    steps = [s for s, _ in find_checkpoints(directory)]
    assert FIGURES <= {path.name for path in out.iterdir()} and set(summary["figures"]) == FIGURES
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["n_checkpoints"] == len(steps) and summary["steps"] == steps and steps[-1] == result.final_step
    assert summary["p"] == 59 and summary["operation"] == "add" and summary["fourier"]["basis"] == "additive"
    last = summary["checkpoints"][-1]
    # The checkpoint's own losses match what the trainer logged at that step.
    logged = dict(result.history)[last["step"]]
    assert last["train_loss"] == pytest.approx(logged["train_loss"], rel=1e-4, abs=1e-9)
    assert last["test_loss"] == pytest.approx(logged["test_loss"], rel=1e-4)
    assert last["test_acc"] == pytest.approx(logged["test_acc"]) and last["test_acc"] > 0.99
    assert last["total_weight_norm"] == pytest.approx(last["weights"]["total_norm"], rel=1e-6)
    assert set(last["attention"]) == {f"head_{h}" for h in range(4)}
    assert all(head["change"] > 0 for head in summary["checkpoints"][1]["attention"].values())
    post = last["activations"]["blocks.0.mlp.hook_post"]
    assert 0 < post["sparsity"] < 1 and post["norm"] > 0  # ReLU output: some exact zeros
    grads = last["gradients"]
    assert set(grads) == {name for name, _ in model_from_checkpoint(load_checkpoint(directory / f"step_{steps[-1]:06d}.pt"))
                          .named_parameters()}


def test_grokked_run_has_the_rules_small_sparse_set_of_key_frequencies(grokked):
    fourier_summary = grokked[3]["fourier"]
    keys = fourier_summary["key_frequencies"]
    norms = torch.tensor(fourier_summary["final_embedding_freq_norms"])
    assert keys == fourier.key_frequencies(norms)[0] and fourier_summary["key_frequency_rule"] == fourier.KEY_RULE
    assert 1 <= len(keys) <= 5 and fourier_summary["sparse"] is True  # the paper's runs: 3-5
    floor = float(norms.median())
    assert all(norms[k - 1] >= 3 * floor for k in keys)  # every key stands out of the floor
    others = [float(norms[k - 1]) for k in range(1, len(norms) + 1) if k not in keys]
    assert min(float(norms[k - 1]) for k in keys) >= 1.5 * max(others)  # and a real gap below the weakest
    assert fourier_summary["key_agreement"]["jaccard"] >= 0.5  # W_L, the cross-check, sees (mostly) the same


def test_grokked_run_restricted_loss_falls_strictly_before_test_loss(grokked):
    _, result, _, summary = grokked
    comparison = summary["restricted_loss_falls_before_test_loss"]
    assert comparison["answer"] is True and comparison["test_loss_source"] == "history"
    restricted_step = comparison["restricted_loss_drop_step"]
    # checked on the data itself: when the restricted loss has halved, the test loss has not yet
    restricted = [(r["step"], r["restricted_loss"]) for r in summary["checkpoints"]]
    peak_step, peak = max(restricted, key=lambda item: item[1])
    assert dict(restricted)[restricted_step] <= 0.5 * peak and restricted_step > peak_step
    test = [(s, m["test_loss"]) for s, m in result.history]
    test_peak = max(v for s, v in test if s <= restricted_step)
    assert all(v > 0.5 * test_peak for s, v in test if s <= restricted_step)


def test_grokked_run_excluded_loss_rises_while_the_circuit_forms(grokked):
    _, result, _, summary = grokked
    by_step = records(summary)
    initial = by_step[0]  # no circuit yet: removing the (final) key frequencies changes nothing
    assert initial["excluded_loss"] == pytest.approx(initial["train_loss"], rel=0.02)
    memorized, general = result.step_of("memorization"), result.step_of("generalization")
    forming = [by_step[s] for s in sorted(by_step) if memorized - 20 <= s <= general]
    assert len(forming) >= 4
    # The model relies more and more on the key frequencies: without them its training fit gets ever worse
    # relative to the full model's, and the excluded loss itself rises well above its initial value.
    ratios = [r["excluded_loss"] / r["train_loss"] for r in forming]
    assert ratios[-1] >= 100 and ratios[-1] >= 10 * ratios[0]
    assert min(r["excluded_loss"] for r in forming) >= 1.4 * initial["excluded_loss"]


def test_grokked_run_phases_come_in_the_papers_order(grokked):
    phases = grokked[3]["phases"]
    assert phases["source"] == "events.json" and phases["in_order"] is True
    assert phases["memorization"] < phases["circuit_formation"] <= phases["cleanup"] <= phases["cleanup_end"]
    assert phases["circuit_formation"] < phases["generalization"] <= phases["cleanup_end"]
    # trained until clean-up was over: stop_after = cleanup_end stops stop_margin after it, not after generalisation
    result = grokked[1]
    assert result.final_step == result.step_of("cleanup_end") + 200 > result.step_of("generalization") + 200


def test_control_without_weight_decay_answers_the_opposite(grokked, control):
    result, summary = control
    assert result.final_step >= grokked[1].final_step
    assert summary["fourier"]["key_frequencies"] == [] and summary["fourier"]["sparse"] is False
    assert summary["restricted_loss_falls_before_test_loss"]["answer"] is not True
    assert summary["restricted_loss_falls_before_test_loss"]["restricted_loss_drop_step"] is None
    for record in summary["checkpoints"]:  # no key frequencies: nothing is removed, excluded loss = train loss
        assert record["excluded_loss"] == pytest.approx(record["train_loss"], rel=1e-9, abs=1e-12)
    assert summary["phases"]["circuit_formation"] is None and summary["phases"]["cleanup"] is None


def test_algorithm_measures_per_checkpoint_and_the_final_class(grokked, control):
    summary = grokked[3]
    first, last = summary["checkpoints"][0], summary["checkpoints"][-1]
    which = summary["algorithm"]
    assert which["step"] == last["step"] and which["rule"] == algorithm.RULE
    assert which["class"] == algorithm.classify_algorithm(last["gradient_symmetricity"], last["distance_irrelevance"],
                                                          test_accuracy=last["test_acc"])
    # the trained circuit's logits are mostly the key-frequency terms; the random initialisation's are not
    assert last["key_variance_explained"] > 0.7 > 0.01 > first["key_variance_explained"]
    assert first["distance_irrelevance"] > 0.95  # no structure at initialisation
    # the control only memorises: never classified, however its measures fall
    assert control[1]["algorithm"]["class"] == "undetermined"
    assert all(r["key_variance_explained"] == 0.0 for r in control[1]["checkpoints"])  # no key frequencies


def test_onset_fires_before_generalization_in_grokking_but_not_in_a_control(grokked, control):
    grokking = grokked[1]
    memorized, onset, general = (grokking.step_of(e) for e in ("memorization", "onset", "generalization"))
    assert None not in (memorized, onset, general) and memorized < onset < general
    result = control[0]
    assert result.final_step >= grokking.final_step  # as long as the grokking run, not shorter
    assert result.step_of("memorization") is not None
    assert result.step_of("onset") is None and result.step_of("generalization") is None
    assert max(m["test_acc"] for _, m in result.history) < 0.99


def test_analysis_without_history_uses_checkpoint_test_loss(grokked, tmp_path):
    summary = analyze_checkpoints(find_checkpoints(grokked[0])[-3:], tmp_path, progress=False)
    assert summary["restricted_loss_falls_before_test_loss"]["test_loss_source"] == "checkpoints"
    assert summary["n_checkpoints"] == 3 and summary["phases"]["source"] == "checkpoints"


def test_compare_figure_draws_the_progress_measures_it_is_given(grokked, control):
    _, result, _, summary = grokked
    fig = compare_runs_figure({"grokked": result.history, "control": control[0].history},
                              progress={"grokked": summary})
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert {"train loss", "test loss", "test acc", "restricted loss", "excluded loss", "gini embedding",
            "total weight norm"} <= set(panels)
    lines = {line.get_label(): line for line in panels["restricted loss"].get_lines()}
    # the grokked run's restricted loss comes from its summary (checkpoints); the control's from its live measures
    assert list(lines["grokked"].get_xdata()) == [r["step"] for r in summary["checkpoints"]]
    assert list(lines["grokked"].get_ydata()) == pytest.approx([r["restricted_loss"] for r in summary["checkpoints"]])
    live = [(s, m["restricted_loss"]) for s, m in control[0].history if "restricted_loss" in m]
    assert list(lines["control"].get_xdata()) == [s for s, _ in live]
    test_acc = {line.get_label(): line for line in panels["test acc"].get_lines()}
    assert list(test_acc["control"].get_ydata()) == [m["test_acc"] for _, m in control[0].history]


class Payload:
    """Unpickling this runs ``open(marker, "w")``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(grokked, tmp_path):
    marker = tmp_path / "pwned"
    planted = tmp_path / "checkpoints"
    planted.mkdir()
    for step, path in find_checkpoints(grokked[0])[:2]:
        (planted / path.name).write_bytes(path.read_bytes())
    torch.save({"config": {}, "model": Payload(marker)}, planted / "step_999999.pt")

    with pytest.raises(CheckpointError, match="unsafe loading") as error:
        load_checkpoint(planted / "step_999999.pt")
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="unsafe loading"):
        analyze_checkpoints(find_checkpoints(planted), tmp_path / "out", progress=False)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()  # nothing half-written

    # The payload is real: a plain unpickle of the same object does create the marker.
    pickle.loads(pickle.dumps(Payload(tmp_path / "proof"))).close()
    assert (tmp_path / "proof").exists()


def test_corrupt_and_truncated_checkpoints_are_refused(grokked, tmp_path):
    good = find_checkpoints(grokked[0])[-1][1].read_bytes()
    (tmp_path / "step_000001.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "step_000002.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "step_000003.pt")
    for name, pattern in [("step_000001.pt", "corrupt"), ("step_000002.pt", "corrupt"),
                          ("step_000003.pt", "not a grokking-tracked checkpoint")]:
        with pytest.raises(CheckpointError, match=pattern) as error:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="no checkpoints"):
        analyze_checkpoints([], tmp_path / "out", progress=False)


def test_checkpoint_of_another_model_shape_is_refused(grokked, tmp_path):
    checkpoints = find_checkpoints(grokked[0])
    state = load_checkpoint(checkpoints[-1][1])
    lying = dict(state, config=dict(state["config"], d_model=32))  # weights that do not match their own config
    with pytest.raises(CheckpointError, match="another model shape") as error:
        model_from_checkpoint(lying)
    assert "\n" not in str(error.value)
    other = Trainer(preset("default", p=59, d_model=16, d_mlp=64, max_steps=1), progress=False)
    torch.save(other.state_dict(), tmp_path / "step_000999.pt")
    with pytest.raises(CheckpointError, match="another model shape: d_model=64, expected 16"):
        analyze_checkpoints(checkpoints[:2] + [(999, tmp_path / "step_000999.pt")], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
