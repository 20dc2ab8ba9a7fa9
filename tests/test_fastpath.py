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
