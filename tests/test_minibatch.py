"""Minibatch training (``batch_size``), the Power and Grokfast presets, and what refuses them.

Real torch training throughout, a few dozen steps of small models (CPU, one thread by default)."""

from __future__ import annotations

import io

import pytest
import torch

from grokking_tracked import fastpath
from grokking_tracked.config import ConfigError, preset
from grokking_tracked.data import MinibatchSampler, make_dataset, sampler_seed
from grokking_tracked.lockstep import check_compatible
from grokking_tracked.model import GrokkingTransformer
from grokking_tracked.train import Trainer


def small(**overrides):
    # p = 23, 40 % of the pairs: 212 training examples; a few dozen steps take well under a second
    values = dict(p=23, train_frac=0.4, d_model=32, d_mlp=64, max_steps=30, eval_every=5, checkpoint_every=0,
                  stop_on_grok=False, device="cpu")
    values.update(overrides)
    return preset("default", **values)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in trainer.model.state_dict().items()}


def test_batch_size_at_least_the_train_set_is_full_batch_bit_for_bit():
    full = Trainer(small(), progress=False)
    full_result = full.train()
    n_train = len(full.data.train_labels)
    for batch_size in (n_train, n_train + 1, 10 ** 6):
        other = Trainer(small(batch_size=batch_size), progress=False)
        result = other.train()
        assert result.history == full_result.history, batch_size  # exact float equality, every metric and step
        for name, value in weights(other).items():
            assert torch.equal(value, weights(full)[name]), (batch_size, name)


def test_minibatches_take_one_step_per_batch_and_change_the_trajectory():
    full = Trainer(small(), progress=False)
    full.train()
    mini = Trainer(small(batch_size=50), progress=False)
    result = mini.train()
    assert result.final_step == 30 and [s for s, _ in result.history] == list(range(0, 31, 5))
    assert mini.sampler is not None and mini.sampler.batch_size == 50
    # 30 steps of batches of 50 over 212 examples (5 an epoch: 4 x 50 + 12): 6 whole epochs, at the end of one
    assert mini.sampler.position == 212 and len(mini.sampler.permutation) == 212
    assert any(not torch.equal(a, b) for a, b in zip(mini.model.parameters(), full.model.parameters()))


def test_the_sampler_is_seeded_covers_every_example_each_epoch_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    sampler = MinibatchSampler(23, 5, seed=sampler_seed(7))
    epochs = [[sampler.next_indices() for _ in range(5)] for _ in range(3)]  # 23 = 4 x 5 + 3
    assert torch.equal(torch.get_rng_state(), global_state)  # its own generator only
    for batches in epochs:
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        assert sorted(torch.cat(batches).tolist()) == list(range(23))
    assert not all(torch.equal(torch.cat(a), torch.cat(b)) for a, b in zip(epochs, epochs[1:]))  # reshuffled
    again = MinibatchSampler(23, 5, seed=sampler_seed(7))
    assert all(torch.equal(again.next_indices(), b) for batches in epochs for b in batches)  # deterministic
    other = MinibatchSampler(23, 5, seed=sampler_seed(8))
    assert not torch.equal(torch.cat([other.next_indices() for _ in range(5)]), torch.cat(epochs[0]))
    assert sampler_seed(7) != 7 and sampler_seed(7) != sampler_seed(8)


def test_a_sampler_state_continues_the_same_sequence_mid_epoch():
    sampler = MinibatchSampler(23, 5, seed=3)
    for _ in range(7):
        sampler.next_indices()
    buffer = io.BytesIO()
    torch.save(sampler.state(), buffer)
    buffer.seek(0)
    restored = MinibatchSampler(23, 5, seed=999)
    restored.load_state(torch.load(buffer, weights_only=True))
    assert all(torch.equal(restored.next_indices(), sampler.next_indices()) for _ in range(12))


def test_a_minibatch_checkpoint_resumed_mid_epoch_continues_exactly():
    """Stopped at step 17 (2 steps into the 4th epoch of 5 batches), saved, loaded with weights_only=True:
    the rest equals the uninterrupted run, metric for metric and weight for weight."""
    config = small(batch_size=50, max_steps=30, eval_every=1, grokfast_lambda=1.0)
    whole = Trainer(config, progress=False)
    whole_result = whole.train()
    first = Trainer(config.replace(max_steps=17), progress=False)
    first.train()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = Trainer(config, progress=False)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    second.history = list(first.history)
    resumed = second.train()
    assert [s for s, _ in resumed.history] == [s for s, _ in whole_result.history]
    for (_, got), (_, expected) in zip(resumed.history, whole_result.history):
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)
    for name, value in weights(second).items():
        torch.testing.assert_close(value, weights(whole)[name], rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize("name", ["power2022", "grokfast2024"])
def test_the_paper_presets_load_and_train_a_few_steps(name):
    config = preset(name, max_steps=3, eval_every=3, checkpoint_every=0, device="cpu")
    assert (config.p, config.n_layers, config.d_model, config.n_heads, config.batch_size) == (97, 2, 128, 4, 512)
    trainer = Trainer(config, progress=False)
    result = trainer.train()
    assert result.final_step == 3 and [s for s, _ in result.history] == [0, 3]
    assert trainer.sampler is not None and len(trainer.data.train_labels) > 512
    assert not fastpath.supports(trainer.model)  # two layers with LayerNorm: autograd
    assert isinstance(trainer.optimizer, torch.optim.Adam if name == "grokfast2024" else torch.optim.AdamW)


def test_gelu_is_the_mlp_activation_and_the_fast_path_refuses_it():
    relu, gelu = GrokkingTransformer(small()), GrokkingTransformer(small(activation="gelu"))
    tokens = make_dataset(small()).train_tokens[:8]
    assert fastpath.supports(relu) and not fastpath.supports(gelu)
    _, cache = gelu.run_with_cache(tokens)
    pre, post = cache["blocks.0.mlp.hook_pre"], cache["blocks.0.mlp.hook_post"]
    torch.testing.assert_close(post, torch.nn.functional.gelu(pre))


def test_minibatches_are_refused_with_a_curriculum_and_in_lockstep():
    with pytest.raises(ConfigError, match="curriculum and batch_size"):
        small(curriculum=True, batch_size=50)
    for field, value in (("batch_size", 50), ("optimizer", "adam")):
        with pytest.raises(ValueError, match=f"lockstep training supports .* {field}") as error:
            check_compatible([small(), small(**{field: value})])
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="must share 'activation'"):
        check_compatible([small(), small(activation="gelu")])
