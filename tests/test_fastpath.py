"""The hand-written training step (grokking_tracked/fastpath.py) computes what autograd computes: logits, loss
and every parameter's gradient; the Trainer takes it where it applies and autograd everywhere else."""

import pytest
import torch

from grokking_tracked import fastpath
from grokking_tracked.config import preset
from grokking_tracked.data import make_dataset
from grokking_tracked.metrics import cross_entropy_high_precision
from grokking_tracked.model import GrokkingTransformer
from grokking_tracked.train import Trainer

SMALL = dict(p=23, d_model=32, d_mlp=64, n_heads=4)


def _autograd(model, tokens, labels):
    model.zero_grad(set_to_none=True)
    logits = model(tokens, last_only=True)
    loss = cross_entropy_high_precision(logits, labels)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logits.detach(), loss.detach(), grads


def _check(model, tokens, labels, rtol, atol):
    logits, loss, grads = _autograd(model, tokens, labels)
    torch.testing.assert_close(fastpath.last_logits(model, tokens), logits, rtol=rtol, atol=atol)
    fast_loss = fastpath.loss_and_grads(model, tokens, labels)
    assert fast_loss.dtype == torch.float64
    torch.testing.assert_close(fast_loss, loss, rtol=rtol, atol=atol)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        torch.testing.assert_close(p.grad, grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("operation", ["add", "div"])
@pytest.mark.parametrize("n_examples", [None, 17])  # the whole training set, and a curriculum's prefix
def test_equals_autograd_in_float64(operation, n_examples):
    config = preset("default", **SMALL, operation=operation)
    data = make_dataset(config)
    model = GrokkingTransformer(config).double()
    with torch.no_grad():  # away from the initialisation: larger, less symmetric activations
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
    _check(model, data.train_tokens[:n_examples], data.train_labels[:n_examples], rtol=1e-10, atol=1e-12)


def test_equals_autograd_in_float32_on_the_seed_preset():
    config = preset("seed")
    data = make_dataset(config)
    _check(GrokkingTransformer(config), data.train_tokens, data.train_labels, rtol=1e-4, atol=1e-6)


def test_gradient_at_a_tiny_loss_keeps_float64_precision():
    """A memorised model (train loss ~1e-8): each label's gradient is 1 - p(label) ~ 1e-8, which float32
    cannot represent next to 1. The float32 model's gradients must still match float64 autograd."""
    config = preset("default", **SMALL)
    tokens = make_dataset(config).train_tokens
    model = GrokkingTransformer(config)
    with torch.no_grad():
        labels = model(tokens, last_only=True).argmax(-1)  # what it predicts is what it has "memorised"
        for _ in range(30):  # widen the margins until the loss is ~1e-8
            loss = cross_entropy_high_precision(model(tokens, last_only=True), labels)
            if loss < 1e-7:
                break
            model.unembed.W_U.mul_(1.25)
    assert 1e-10 < loss < 1e-7
    _check(model, tokens, labels, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("overrides", [dict(n_layers=2), dict(normalization="ln")])
def test_other_architectures_fall_back_to_autograd(overrides):
    config = preset("default", **SMALL, **overrides, max_steps=3, checkpoint_every=0)
    assert not fastpath.supports(GrokkingTransformer(config))
    trainer = Trainer(config, progress=False)
    loss = trainer.train_step()
    assert loss.grad_fn is not None  # autograd's graph: the fallback ran
    assert all(p.grad is not None for p in trainer.model.parameters())


def test_trainer_takes_the_fast_path_and_trains_as_autograd_does(monkeypatch):
    config = preset("default", **SMALL, lr=3e-3, max_steps=40, eval_every=10, checkpoint_every=0, curriculum=True,
                    curriculum_steps=20, grokfast_lambda=1.0, wd_schedule="linear", wd_schedule_steps=40)
    fast = Trainer(config, progress=False)
    assert fastpath.supports(fast.model)
    assert fast.train_step().grad_fn is None  # no autograd graph: the hand-written step ran
    monkeypatch.setenv("GROKKING_FASTPATH", "0")
    slow = Trainer(config, progress=False)
    assert slow.train_step().grad_fn is not None
    monkeypatch.delenv("GROKKING_FASTPATH")
    fast_result = fast.train()
    monkeypatch.setenv("GROKKING_FASTPATH", "0")
    slow_result = slow.train()
    assert [s for s, _ in fast_result.history] == [s for s, _ in slow_result.history] == [10, 20, 30, 40]
    for (_, got), (_, expected) in zip(fast_result.history, slow_result.history):
        for name in ("train_loss", "test_loss", "weight_norm", "grad_norm"):
            assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
    for (name, p_fast), (_, p_slow) in zip(fast.model.named_parameters(), slow.model.named_parameters()):
        torch.testing.assert_close(p_fast, p_slow, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------ lean_last_logits: every other model
@pytest.mark.parametrize("overrides", [
    dict(n_layers=2, normalization="ln", activation="gelu"),  # grokfast2024's family
    dict(n_layers=2, normalization="ln", activation="relu"),  # power2022's
    dict(n_layers=3, normalization="ln", attention_rate=0.3),  # more blocks, Zhong's blended pattern
    dict(n_layers=1, normalization="ln"),
])
def test_lean_forward_equals_the_full_forward_logits_and_gradients(overrides):
    config = preset("default", **SMALL, **overrides)
    data = make_dataset(config)
    model = GrokkingTransformer(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
    tokens, labels = data.train_tokens, data.train_labels
    full = model(tokens)[:, -1]  # every position through every block, hooks and all
    cross_entropy_high_precision(full, labels).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    lean = fastpath.lean_last_logits(model, tokens)
    cross_entropy_high_precision(lean, labels).backward()
    torch.testing.assert_close(lean, full, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(fastpath.last_logits(model, tokens), full.detach(), rtol=1e-10, atol=1e-12)


class PlainTrainer(Trainer):
    """The reference: the model's full forward over every position (hooks, autograd), the loss at the last."""

    def _loss_and_grads(self, tokens, labels):
        logits = self.model(tokens)[:, -1]
        loss = cross_entropy_high_precision(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, logits


class Recorded(Trainer):
    losses: list

    def _loss_and_grads(self, tokens, labels):
        loss, logits = super()._loss_and_grads(tokens, labels)
        self.losses.append(loss.item())
        return loss, logits


class RecordedPlain(PlainTrainer):
    losses: list

    def _loss_and_grads(self, tokens, labels):
        loss, logits = super()._loss_and_grads(tokens, labels)
        self.losses.append(loss.item())
        return loss, logits


FAMILIES = {  # each preset family at a tiny size, minibatches where the preset has them
    "1-layer ReLU, no LN (default, seed, nanda2023)": ("default", dict(lr=3e-3)),
    "2-layer LN GELU (grokfast2024)": ("grokfast2024", dict(batch_size=40, grokfast_lambda=2.0, weight_decay=0.005)),
    "2-layer LN ReLU (power2022)": ("power2022", dict(batch_size=40, lr=3e-3)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_sixty_steps_give_the_losses_of_the_plain_all_positions_path(family):
    """The training path (hand-written for 1 layer, lean_last_logits otherwise) against the full forward of every
    position with autograd: the same loss at every one of 60 steps and the same weights after them, in float64
    (rtol 1e-9: only summation order differs), on each preset family at a tiny size (p = 23, d_model 32)."""
    name, overrides = FAMILIES[family]
    config = preset(name, p=23, train_frac=0.5, d_model=32, d_mlp=64, n_heads=4, max_steps=60, eval_every=20,
                    checkpoint_every=0, stop_on_grok=False, device="cpu", **overrides)
    runs = []
    for kind in (Recorded, RecordedPlain):
        trainer = kind(config, progress=False)
        trainer.model.double()  # float64 parameters: differences are then rounding only
        trainer.losses = []
        result = trainer.train()
        runs.append((trainer, result))
    (ours, ours_result), (plain, plain_result) = runs
    assert len(ours.losses) == len(plain.losses) == 60
    assert ours.losses[-1] < ours.losses[0] - 0.05  # it trained
    assert ours.losses == pytest.approx(plain.losses, rel=1e-9, abs=1e-12)
    for (_, got), (_, expected) in zip(ours_result.history, plain_result.history):
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    for (key, p), (_, q) in zip(ours.model.named_parameters(), plain.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=key)
