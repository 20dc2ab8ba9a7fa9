"""analyze_checkpoints on a tiny model really trained with Trainer, and the checkpoint safety checks."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from grokking_tracked.analysis import (CheckpointError, analyze_checkpoints, compare_figure, find_checkpoints,
                                       load_checkpoint, model_from_checkpoint)
from grokking_tracked.config import preset
from grokking_tracked.train import Callback, Trainer

FIGURES = {"progress_measures.png", "fourier_spectrum.png", "attention_patterns.png", "attention_change.png",
           "activation_stats.png", "gradient_flow.png", "weight_evolution.png"}


class SaveCheckpoints(Callback):
    def __init__(self, directory: Path):
        self.directory = directory

    def on_checkpoint(self, trainer, step, reasons):
        torch.save(trainer.state_dict(), self.directory / f"step_{step:06d}.pt")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """p=23 addition, half the pairs for training: memorises within ~50 steps, circuit forms after."""
    directory = tmp_path_factory.mktemp("checkpoints")
    config = preset("default", p=23, train_frac=0.5, d_model=32, d_mlp=128, n_heads=4, max_steps=150,
                    eval_every=10, checkpoint_every=50)
    result = Trainer(config, [SaveCheckpoints(directory)], progress=False).train()
    return directory, result


@pytest.fixture(scope="module")
def analysed(run, tmp_path_factory):
    directory, result = run
    out = tmp_path_factory.mktemp("analysis")
    return out, analyze_checkpoints(find_checkpoints(directory), out, history=result.history, progress=False)


class Payload:
    """Unpickling this runs ``open(marker, "w")``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_analysis_writes_figures_and_summary(run, analysed):
    directory, result = run
    out, summary = analysed
    steps = [s for s, _ in find_checkpoints(directory)]
    assert len(steps) >= 3 and steps[-1] == 150
    assert FIGURES <= {path.name for path in out.iterdir()}
    assert all((out / name).stat().st_size > 10_000 for name in FIGURES)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert set(summary["figures"]) == FIGURES
    assert summary["n_checkpoints"] == len(steps) and summary["steps"] == steps
    assert summary["p"] == 23 and summary["operation"] == "add"

    fourier = summary["fourier"]
    assert fourier["basis"] == "additive" and fourier["meaningful"]
    keys = fourier["key_frequencies"]
    assert 1 <= len(keys) <= 10 and all(1 <= k <= 11 for k in keys) and keys == sorted(keys)
    assert len(fourier["final_embedding_freq_norms"]) == 11

    comparison = summary["restricted_loss_falls_before_test_loss"]
    assert comparison["test_loss_source"] == "history"
    assert comparison["answer"] in (True, False, None) and "rule" in comparison

    records = summary["checkpoints"]
    first, last = records[0], records[-1]
    assert first["weight_relative_change"] is None and last["weight_relative_change"] > 0
    assert last["train_acc"] == pytest.approx(1.0)  # memorised
    # The checkpoint's own losses match what the trainer logged at that step.
    logged = dict(result.history)[last["step"]]
    assert last["train_loss"] == pytest.approx(logged["train_loss"], rel=1e-4, abs=1e-6)
    assert last["test_loss"] == pytest.approx(logged["test_loss"], rel=1e-4)
    assert 0 <= last["gini_embedding"] <= 1 and last["total_weight_norm"] == pytest.approx(
        last["weights"]["total_norm"], rel=1e-6)
    assert set(last["attention"]) == {f"head_{h}" for h in range(4)}
    assert all(0 <= head["to_a"] <= 1 for head in last["attention"].values())
    assert last["attention"]["head_0"]["change"] is not None
    post = last["activations"]["blocks.0.mlp.hook_post"]
    assert 0 < post["sparsity"] < 1 and post["norm"] > 0  # ReLU output: some exact zeros
    # Each of the 3 query rows of a causal pattern sums to 1 over 3 keys: the mean entry is exactly 1/3.
    assert last["activations"]["blocks.0.attn.hook_pattern"]["mean"] == pytest.approx(1 / 3)
    grads = last["gradients"]
    assert set(grads) == {name for name, _ in model_from_checkpoint(load_checkpoint(directory / "step_000150.pt"))
                          .named_parameters()}
    assert all(g["grad_norm"] > 0 and g["ratio"] > 0 for name, g in grads.items() if name != "pos_embed.W_pos")


def test_analysis_without_history_uses_checkpoint_test_loss(run, tmp_path):
    directory, _ = run
    summary = analyze_checkpoints(find_checkpoints(directory)[-3:], tmp_path, progress=False)
    assert summary["restricted_loss_falls_before_test_loss"]["test_loss_source"] == "checkpoints"
    assert summary["n_checkpoints"] == 3


def test_malicious_pickle_is_refused_and_runs_nothing(run, tmp_path):
    directory, _ = run
    marker = tmp_path / "pwned"
    planted = tmp_path / "checkpoints"
    planted.mkdir()
    for step, path in find_checkpoints(directory)[:2]:
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


def test_corrupt_and_truncated_checkpoints_are_refused(run, tmp_path):
    directory, _ = run
    good = find_checkpoints(directory)[-1][1].read_bytes()
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


def test_checkpoint_of_another_model_shape_is_refused(run, tmp_path):
    directory, _ = run
    checkpoints = find_checkpoints(directory)
    state = load_checkpoint(checkpoints[-1][1])
    # Weights that do not match the checkpoint's own config.
    lying = dict(state, config=dict(state["config"], d_model=64))
    with pytest.raises(CheckpointError, match="another model shape") as error:
        model_from_checkpoint(lying)
    assert "\n" not in str(error.value)
    # A consistent checkpoint of another shape mixed into a run.
    other = Trainer(preset("default", p=23, d_model=16, d_mlp=64, max_steps=1), progress=False)
    torch.save(other.state_dict(), tmp_path / "step_000999.pt")
    with pytest.raises(CheckpointError, match="another model shape: d_model=32, expected 16"):
        analyze_checkpoints(checkpoints[:2] + [(999, tmp_path / "step_000999.pt")], tmp_path / "out",
                            progress=False)
    assert not (tmp_path / "out").exists()


def test_compare_figure_draws_several_runs(run, analysed, tmp_path):
    _, result = run
    _, summary = analysed
    shifted = [(step + 5, dict(m, test_loss=m["test_loss"] * 0.5)) for step, m in result.history]
    path = compare_figure({"run a": result.history, "run b": shifted}, tmp_path / "compare.png",
                          progress={"run a": summary}, title="two runs")
    assert path.exists() and path.stat().st_size > 10_000
