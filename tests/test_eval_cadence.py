"""Evaluation the papers' way (``train_metrics_from_batches``, on in power2022 and grokfast2024): train loss and
accuracy from the minibatches trained since the last evaluation, only the held-out split evaluated at
``eval_every``; the detection events keep their rules. Real torch training of tiny models (p = 23)."""

from __future__ import annotations

import io

import pytest
import torch

from grokking_tracked.config import ConfigError, preset
from grokking_tracked.detect import GrokDetector
from grokking_tracked.detect import detector_for
from grokking_tracked.train import Callback, Trainer, TrainingStopped


def small(**overrides):
    # p = 23, half the pairs: 264 training examples, batches of 50 (6 an epoch, the last of 14)
    values = dict(p=23, train_frac=0.5, d_model=32, d_mlp=64, batch_size=50, lr=1e-2, max_steps=40, eval_every=5,
                  checkpoint_every=0, stop_on_grok=False, device="cpu", train_metrics_from_batches=True)
    values.update(overrides)
    return preset("default", **values)


class Watched(Trainer):
    """Records what each step trained on (its batch's loss, correct answers and size) and what each evaluation
    forwarded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[tuple[int, float, int, int]] = []  # (step, loss, correct, size)
        self.evaluated: list[tuple[int, int]] = []  # (step, examples forwarded)

    def _loss_and_grads(self, tokens, labels):
        loss, logits = super()._loss_and_grads(tokens, labels)
        self.batches.append((self.step + 1, loss.item(), int((logits.argmax(-1) == labels).sum()), len(labels)))
        return loss, logits

    def _last_logits(self, tokens):
        self.evaluated.append((self.step, len(tokens)))
        return super()._last_logits(tokens)


def test_train_metrics_are_the_batches_since_the_last_evaluation_and_only_the_test_split_is_forwarded():
    trainer = Watched(small(), progress=False)
    result = trainer.train()
    n_train, n_test = len(trainer.data.train_labels), len(trainer.data.test_labels)
    assert trainer.evaluated[0] == (0, n_train + n_test)  # step 0: nothing trained yet, both splits evaluated
    assert trainer.evaluated[1:] == [(step, n_test) for step in range(5, 41, 5)]
    for step, metrics in result.history[1:]:
        window = [b for b in trainer.batches if step - 5 < b[0] <= step]
        assert len(window) == 5
        examples = sum(size for *_, size in window)
        assert metrics["train_loss"] == pytest.approx(sum(loss * size for _, loss, _, size in window) / examples,
                                                      rel=1e-12)
        assert metrics["train_acc"] == pytest.approx(sum(correct for _, _, correct, _ in window) / examples,
                                                     rel=1e-12)


def test_the_held_out_metrics_and_the_trajectory_are_those_of_the_full_evaluation():
    """Evaluating differently changes nothing that trains: every test metric, norm and weight is equal."""
    batches = Trainer(small(), progress=False)
    full = Trainer(small(train_metrics_from_batches=False), progress=False)
    got, expected = batches.train().history, full.train().history
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        for name in ("test_loss", "test_acc", "weight_norm", "grad_norm", "lr"):
            assert a[name] == pytest.approx(b[name], rel=1e-12, abs=1e-15), name
    for p, q in zip(batches.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)


def test_detection_events_keep_their_rules_on_the_recorded_history():
    """The events a run reports are the detector's rules applied to its recorded history (the train metrics
    being the batches'); those that read held-out metrics only fire at the same step as with full evaluation.
    Thresholds are lowered so that memorisation and generalisation fire within 150 steps of a tiny model."""
    thresholds = dict(memorization_threshold=0.2, generalization_threshold=0.03, max_steps=150)
    batches = Trainer(small(**thresholds), progress=False).train()
    full = Trainer(small(**thresholds, train_metrics_from_batches=False), progress=False).train()
    replay = detector_for(small(**thresholds))
    for step, metrics in batches.history:
        replay.update(step, metrics)
    assert replay.events == batches.events
    assert batches.step_of("memorization") is not None and batches.step_of("generalization") is not None
    memorized = next(s for s, m in batches.history if m["train_acc"] >= 0.2)  # the rule, on what was recorded
    assert batches.step_of("memorization") == memorized
    assert batches.step_of("generalization") == full.step_of("generalization")
    # the rules themselves are unchanged: the full evaluation's history replays to its own events
    again = GrokDetector(0.2, 0.03, 0.5)
    for step, metrics in full.history:
        again.update(step, metrics)
    assert again.events == full.events


def test_a_checkpoint_between_evaluations_continues_the_same_window():
    """A periodic checkpoint at step 17 (2 batches into the window that ends at 20), then the process dies; the
    checkpoint, loaded with weights_only=True, continues as the uninterrupted run, train metrics included."""
    config = small(max_steps=30)
    whole = Trainer(config, progress=False).train()

    class DiesAfterCheckpoint(Callback):
        saved = io.BytesIO()

        def on_checkpoint(self, run, step, reasons):
            if step == 17:
                torch.save(run.state_dict(), self.saved)
                raise TrainingStopped

    first = Trainer(config.replace(checkpoint_every=17), callbacks=[DiesAfterCheckpoint()], progress=False)
    with pytest.raises(TrainingStopped):
        first.train()
    assert first._batch_examples == 100  # the checkpoint holds a window of two batches
    DiesAfterCheckpoint.saved.seek(0)
    second = Trainer(config, progress=False)
    second.load_state_dict(torch.load(DiesAfterCheckpoint.saved, weights_only=True))
    second.history = list(first.history)
    resumed = second.train()
    assert [s for s, _ in resumed.history] == [s for s, _ in whole.history]
    for (_, got), (_, expected) in zip(resumed.history, whole.history):
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_the_paper_presets_use_it_and_full_batch_refuses_it():
    assert preset("grokfast2024").train_metrics_from_batches and preset("power2022").train_metrics_from_batches
    assert not preset("default").train_metrics_from_batches and not preset("nanda2023").train_metrics_from_batches
    with pytest.raises(ConfigError, match="train_metrics_from_batches needs minibatches") as error:
        preset("default", train_metrics_from_batches=True)
    assert "\n" not in str(error.value)
    assert not preset("grokfast2024", train_metrics_from_batches="false").train_metrics_from_batches  # --set
