"""What the training loop promises, checked on what it actually did: Grokfast's EMA arithmetic, the curriculum's
active set, the live progress measures merged into the metrics, and the stop rule."""

from __future__ import annotations

import copy

import pytest
import torch

from grokking_tracked.config import ConfigError, preset
from grokking_tracked.data import curriculum_order
from grokking_tracked.measures import PROGRESS_METRICS
from grokking_tracked.metrics import cross_entropy_high_precision
from grokking_tracked.optim import GrokfastEMA
from grokking_tracked.train import Trainer


def short(**overrides):
    base = dict(p=23, train_frac=0.5, d_model=32, d_mlp=64, max_steps=40, eval_every=10, checkpoint_every=0)
    return preset("default", **{**base, **overrides})


# ------------------------------------------------------------------------------------------ Grokfast
def test_grokfast_ema_arithmetic_on_a_known_gradient_sequence():
    """ema_1 = g_1, ema_t = α ema_(t-1) + (1 − α) g_t, and each gradient becomes g_t + λ ema_t (Lee et al. 2024)."""
    ema = GrokfastEMA(alpha=0.5, lamb=2.0)
    sequence = [[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]
    expected_ema = [[1.0, 2.0], [2.0, 3.0], [1.0, 1.5]]
    for raw, want_ema in zip(sequence, expected_ema):
        grads = [torch.tensor(raw[:1]), torch.tensor(raw[1:])]
        ema.apply(grads)
        assert torch.cat(ema.ema).tolist() == want_ema
        assert torch.cat(grads).tolist() == [g + 2.0 * e for g, e in zip(raw, want_ema)]


def raw_gradients(trainer: Trainer) -> list[torch.Tensor]:
    """The unfiltered full-batch gradient at the trainer's current weights, from a copy of its model."""
    model = copy.deepcopy(trainer.model)
    loss = cross_entropy_high_precision(model(trainer._train_tokens, last_only=True), trainer._train_labels)
    return list(torch.autograd.grad(loss, list(model.parameters())))


def test_trainer_applies_the_filter_to_the_gradients_it_steps_with():
    alpha, lamb = 0.9, 2.0
    trainer = Trainer(short(grokfast_alpha=alpha, grokfast_lambda=lamb), progress=False)
    ema = None
    for _ in range(3):
        raw = raw_gradients(trainer)
        ema = raw if ema is None else [alpha * e + (1 - alpha) * g for e, g in zip(ema, raw)]
        trainer.train_step()
        for param, g, e in zip(trainer.model.parameters(), raw, ema):
            torch.testing.assert_close(param.grad, g + lamb * e, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ curriculum
def test_curriculum_trains_only_on_the_active_easy_examples(monkeypatch):
    # The autograd path, so the model's forward sees each step's batch (the hand-written step takes the same
    # _train_tokens[:n]; tests/test_fastpath.py shows its gradients equal autograd's on a curriculum prefix).
    monkeypatch.setenv("GROKKING_FASTPATH", "0")
    trainer = Trainer(short(curriculum=True, curriculum_start_frac=0.25, curriculum_steps=20, max_steps=30),
                      progress=False)
    seen: list[torch.Tensor] = []
    trainer.model.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].clone()) if torch.is_grad_enabled() else None)  # training only
    trainer.train()
    assert len(seen) == 30
    train = trainer.data.train_tokens
    order = curriculum_order(train)
    n = len(train)
    assert n == 264 and [len(seen[s]) for s in (0, 10, 20, 29)] == [66, 165, 264, 264]  # ceil(n · (¼ + ¾ · s/20))
    for step, tokens in enumerate(seen):
        active = len(tokens)
        assert torch.equal(tokens, train[order[:active]])  # the easiest `active` examples, nothing else
        if active < n:  # easy first: no unused example has a smaller largest operand than a used one
            assert tokens[:, :2].max(-1).values.max() <= train[order[active:]][:, :2].max(-1).values.min()
    assert len(seen[-1]) == n


# ------------------------------------------------------------------------------------------ progress measures
def test_progress_measures_join_the_metrics_without_changing_training():
    plain = Trainer(short(), progress=False).train()
    measured_trainer = Trainer(short(progress_every=20), progress=False)
    measured = measured_trainer.train()
    assert [s for s, _ in measured.history] == [s for s, _ in plain.history]
    for (step, with_measures), (_, without) in zip(measured.history, plain.history):
        assert {k: with_measures[k] for k in without} == without  # bit-identical trajectory
        assert (set(PROGRESS_METRICS) <= set(with_measures)) == (step % 20 == 0)
    # the values are those of measures.py on the same weights
    final = measured.history[-1][1]
    again = measured_trainer.progress_measures.read(measured_trainer.model).metrics
    assert {k: final[k] for k in PROGRESS_METRICS} == pytest.approx(again)
    assert final["total_weight_norm"] == pytest.approx(final["weight_norm"], rel=1e-6)
    assert isinstance(measured_trainer.progress_measures.key_frequencies, list)


def test_progress_measures_read_at_the_first_evaluation_of_each_interval():
    history = Trainer(short(eval_every=15, progress_every=40, max_steps=120), progress=False).train().history
    assert [s for s, m in history if "restricted_loss" in m] == [0, 45, 90, 120]


@pytest.mark.parametrize("overrides, message", [
    (dict(progress_every=-1), r"progress_every must be an integer in \[0, "),
    (dict(stop_after="memorization"), "unknown stop_after"),
    (dict(stop_after="cleanup_end"), "needs the progress measures"),
])
def test_progress_and_stop_options_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        short(**overrides)


def test_nanda2023_preset_is_the_papers_run_until_cleanup_ends():
    nanda = preset("nanda2023")
    assert (nanda.p, nanda.train_frac, nanda.d_model, nanda.n_heads, nanda.d_mlp, nanda.lr, nanda.weight_decay,
            nanda.beta1, nanda.beta2) == (113, 0.3, 128, 4, 512, 1e-3, 1.0, 0.9, 0.98)
    assert (nanda.max_steps, nanda.checkpoint_every, nanda.stop_after) == (40_000, 500, "cleanup_end")
    assert nanda.progress_every % nanda.eval_every == 0 and nanda.progress_every <= 5 * nanda.eval_every
