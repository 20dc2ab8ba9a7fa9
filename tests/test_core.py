"""Core behaviour without tracking: config validation, data, detection on synthetic histories, strategies."""

from __future__ import annotations

import io
import math

import pytest
import torch

from grokking_tracked.config import Config, ConfigError, preset
from grokking_tracked.data import all_pairs, make_dataset
from grokking_tracked.detect import GrokDetector, detect_events
from grokking_tracked.optim import weight_decay_at
from grokking_tracked.train import Trainer


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, message", [
    (dict(p=2), "p must be an integer in [3, 5,000], got 2"),
    (dict(train_frac=0.0), "train_frac must be a finite number in (0, 1), got 0.0"),
    (dict(train_frac=1.0), "train_frac must be a finite number in (0, 1), got 1.0"),
    (dict(lr=0), "lr must be a finite number in (0, 10], got 0.0"),
    (dict(lr=-1e-3), "lr must be a finite number in (0, 10], got -0.001"),
    (dict(lr=float("inf")), "lr must be a finite number in (0, 10], got inf"),
    (dict(lr=0.5, weight_decay=2.0), "lr x weight_decay must be < 1"),
    (dict(operation="pow"), "unknown operation"),
    (dict(operation="div", p=60), "not prime"),
    (dict(d_model=65), "multiple of n_heads"),
    (dict(lr_schedule="exp"), "unknown lr_schedule"),
])
def test_invalid_config_is_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        preset("default", **overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_presets_and_overrides():
    seed = preset("seed")
    assert (seed.p, seed.d_model, seed.d_mlp, seed.n_heads, seed.train_frac, seed.lr, seed.weight_decay,
            seed.beta1, seed.beta2) == (113, 64, 256, 4, 0.3, 1e-3, 1.0, 0.9, 0.98)
    nanda = preset("nanda2023")
    assert (nanda.p, nanda.d_model, nanda.d_mlp, nanda.n_heads) == (113, 128, 512, 4)
    assert preset("default", lr="3e-3", curriculum="true").lr == 3e-3
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")
    with pytest.raises(ConfigError, match="unknown config field"):
        preset("default", bogus=1)
    with pytest.raises(ConfigError, match="expects a int"):
        preset("default", p="abc")
    assert Config.from_dict(preset("seed").to_dict()) == preset("seed")


# ------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("operation, expected", [("add", (5 + 9) % 11), ("sub", (5 - 9) % 11),
                                                 ("mul", (5 * 9) % 11), ("div", (5 * pow(9, -1, 11)) % 11)])
def test_operations(operation, expected):
    tokens, labels = all_pairs(11, operation)
    index = ((tokens[:, 0] == 5) & (tokens[:, 1] == 9)).nonzero().item()
    assert labels[index].item() == expected
    assert (tokens[:, 2] == 11).all()  # the "=" token


def test_division_excludes_zero_and_checks_inverse():
    tokens, labels = all_pairs(7, "div")
    assert len(tokens) == 7 * 6 and (tokens[:, 1] != 0).all()
    assert ((labels * tokens[:, 1]) % 7 == tokens[:, 0]).all()


def test_split_is_seeded_disjoint_and_sized():
    config = preset("default", p=31, train_frac=0.4)
    first, again = make_dataset(config), make_dataset(config)
    assert torch.equal(first.train_tokens, again.train_tokens)
    assert len(first.train_tokens) == round(0.4 * 31 * 31)
    assert len(first.train_tokens) + len(first.test_tokens) == 31 * 31
    train = {tuple(t) for t in first.train_tokens.tolist()}
    assert not train & {tuple(t) for t in first.test_tokens.tolist()}
    other = make_dataset(config.replace(data_seed=1))
    assert not torch.equal(first.train_tokens, other.train_tokens)


# ------------------------------------------------------------------------------------------ detection
def synthetic(steps, train_acc, test_acc, test_loss):
    return [(s, dict(train_acc=a, test_acc=b, test_loss=c)) for s, a, b, c in zip(steps, train_acc, test_acc, test_loss)]


def grokking_history():
    """Memorise by step 100, test loss peaks at 500, falls slowly, test accuracy jumps at 2000."""
    steps = list(range(0, 2600, 50))
    train_acc = [min(1.0, s / 100) for s in steps]
    test_loss = [4 + 8 * min(s, 500) / 500 if s <= 500 else 12 * math.exp(-(s - 500) / 400) for s in steps]
    test_acc = [0.02 if s < 1800 else min(1.0, 0.5 + (s - 1800) / 300) for s in steps]
    return synthetic(steps, train_acc, test_acc, test_loss)


def test_events_on_a_grokking_history_fire_once_in_order():
    events = detect_events(grokking_history())
    names = [e["event"] for e in events]
    assert names == ["memorization", "onset", "generalization"]
    by_name = {e["event"]: e["step"] for e in events}
    assert by_name["memorization"] == 100
    assert by_name["memorization"] < by_name["onset"] < by_name["generalization"]
    assert by_name["generalization"] == min(s for s, m in grokking_history() if m["test_acc"] >= 0.99)
    # the onset is where test loss has stayed under half its peak for 3 evaluations
    peak = 12.0
    below = [s for s, m in grokking_history() if s > 500 and m["test_loss"] <= 0.5 * peak]
    assert by_name["onset"] == below[2]


def test_memorising_control_history_never_fires_onset_or_generalization():
    steps = list(range(0, 3000, 50))
    history = synthetic(steps, [min(1.0, s / 100) for s in steps], [0.05] * len(steps),
                        [4 + s / 100 for s in steps])  # test loss only rises
    assert [e["event"] for e in detect_events(history)] == ["memorization"]


def test_a_single_noisy_dip_does_not_fire_onset():
    steps = list(range(0, 1000, 50))
    loss = [10.0] * len(steps)
    loss[10] = 2.0  # one evaluation below half the peak
    history = synthetic(steps, [1.0] * len(steps), [0.1] * len(steps), loss)
    assert "onset" not in [e["event"] for e in detect_events(history)]


def test_detector_state_round_trips_mid_run():
    history = grokking_history()
    whole = detect_events(history)
    first = GrokDetector()
    for step, metrics in history[:15]:
        first.update(step, metrics)
    second = GrokDetector()
    second.load_state(first.state())
    for step, metrics in history[15:]:
        second.update(step, metrics)
    assert second.events == whole


# ------------------------------------------------------------------------------------------ strategies
def short(**overrides) -> Config:
    base = dict(p=23, d_model=32, d_mlp=64, max_steps=40, eval_every=10, checkpoint_every=0, stop_on_grok=False)
    return preset("default", **(base | overrides))


def test_cyclic_and_warmup_lr_schedules_change_the_logged_lr():
    cyclic = Trainer(short(lr_schedule="cyclic", cyclic_period=20), progress=False).train()
    lrs = [m["lr"] for _, m in cyclic.history]
    assert max(lrs) > min(lrs) * 5
    warm = Trainer(short(lr_schedule="warmup", warmup_steps=20), progress=False).train()
    # linear from lr/20 to lr over 20 steps, then constant: the lr of the next step, logged at each evaluation
    assert [m["lr"] for _, m in warm.history] == pytest.approx([1e-2 * (1 + 19 * min(s, 20) / 20) / 20
                                                                for s, _ in warm.history])


def test_plateau_schedule_lowers_lr_when_train_loss_stalls():
    config = short(lr_schedule="plateau", plateau_patience=0, plateau_factor=0.5, lr=1e-7, max_steps=60)
    lrs = [m["lr"] for _, m in Trainer(config, progress=False).train().history]
    assert lrs[-1] < lrs[0]


def test_weight_decay_schedule_values():
    config = short(wd_schedule="linear", weight_decay=1.0, wd_final=0.0, wd_schedule_steps=100)
    assert [weight_decay_at(config, s) for s in (0, 50, 100, 200)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    cosine = config.replace(wd_schedule="cosine")
    assert weight_decay_at(cosine, 50) == pytest.approx(0.5)
    trainer = Trainer(config.replace(max_steps=10), progress=False)
    trainer.train()
    assert trainer.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.91)  # what step 9 used


def test_checkpoint_round_trip_continues_identically():
    """A checkpoint loaded with weights_only=True continues exactly like the uninterrupted run."""
    config = short(max_steps=30, lr_schedule="cyclic", grokfast_lambda=1.0)
    whole = Trainer(config, progress=False).train()
    first = Trainer(config.replace(max_steps=20), progress=False)
    first.train()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    second = Trainer(config, progress=False)
    second.load_state_dict(state)
    second.history = list(first.history)
    resumed = second.train()
    assert [s for s, _ in resumed.history] == [s for s, _ in whole.history]
    for (_, got), (_, expected) in zip(resumed.history, whole.history):
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)
    reference = Trainer(config, progress=False)
    reference.train()
    for (name, got), expected in zip(second.model.named_parameters(), reference.model.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8, msg=name)
