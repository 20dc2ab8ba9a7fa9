"""The training path (last_only=True) is the full forward restricted to the last position: same logits, same
gradients, for 1 and 2 layers, with and without LayerNorm; hook names follow HookedTransformer's."""

import pytest
import torch

from grokking_tracked.config import preset
from grokking_tracked.data import make_dataset
from grokking_tracked.metrics import cross_entropy_high_precision
from grokking_tracked.model import GrokkingTransformer



def _config(n_layers: int, normalization: str, attention_rate: float = 1.0):
    return preset("default", p=13, d_model=32, d_mlp=64, n_heads=4, n_layers=n_layers, normalization=normalization,
                  attention_rate=attention_rate)


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("normalization", ["none", "ln"])
@pytest.mark.parametrize("attention_rate", [1.0, 0.3])  # Zhong's blend: the masked full forward must agree too
def test_last_only_matches_full_forward_logits_and_gradients(n_layers, normalization, attention_rate):
    config = _config(n_layers, normalization, attention_rate)
    data = make_dataset(config)
    model = GrokkingTransformer(config).double()  # float64: differences are then summation order only
    tokens, labels = data.train_tokens, data.train_labels

    full = model(tokens)
    assert full.shape == (len(tokens), 3, config.p)
    cross_entropy_high_precision(full[:, -1], labels).backward()
    grads_full = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    last = model(tokens, last_only=True)
    assert last.shape == (len(tokens), config.p)
    cross_entropy_high_precision(last, labels).backward()
    torch.testing.assert_close(last, full[:, -1], rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_full[name], rtol=1e-10, atol=1e-12, msg=name)


def test_last_only_matches_in_float32():
    config = _config(1, "none")
    data = make_dataset(config)
    model = GrokkingTransformer(config)
    full = model(data.all_tokens)[:, -1]
    torch.testing.assert_close(model(data.all_tokens, last_only=True), full, rtol=1e-5, atol=1e-5)


def test_hook_names_in_run_with_cache():
    config = _config(2, "ln")
    model = GrokkingTransformer(config)
    tokens = make_dataset(config).train_tokens[:8]
    logits, cache = model.run_with_cache(tokens)
    expected = {"hook_embed": (8, 3, 32), "hook_pos_embed": (8, 3, 32),
                "blocks.0.attn.hook_q": (8, 3, 4, 8), "blocks.0.attn.hook_k": (8, 3, 4, 8),
                "blocks.0.attn.hook_v": (8, 3, 4, 8), "blocks.0.attn.hook_attn_scores": (8, 4, 3, 3),
                "blocks.0.attn.hook_pattern": (8, 4, 3, 3), "blocks.0.attn.hook_z": (8, 3, 4, 8),
                "blocks.0.hook_resid_pre": (8, 3, 32), "blocks.0.hook_attn_out": (8, 3, 32),
                "blocks.0.hook_resid_mid": (8, 3, 32), "blocks.0.mlp.hook_pre": (8, 3, 64),
                "blocks.0.mlp.hook_post": (8, 3, 64), "blocks.0.hook_mlp_out": (8, 3, 32),
                "blocks.1.hook_resid_post": (8, 3, 32), "blocks.0.ln1.hook_normalized": (8, 3, 32),
                "ln_final.hook_scale": (8, 3, 1)}
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name
    pattern = cache["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(8, 4, 3))
    assert torch.all(pattern.triu(diagonal=1) == 0)  # causal
    assert logits.shape == (8, 3, config.p)


def test_parameter_names_and_shapes_are_hooked_transformer_style():
    config = _config(1, "none")
    shapes = {name: tuple(p.shape) for name, p in GrokkingTransformer(config).named_parameters()}
    assert shapes["embed.W_E"] == (14, 32) and shapes["pos_embed.W_pos"] == (3, 32)
    assert shapes["blocks.0.attn.W_Q"] == (4, 32, 8) and shapes["blocks.0.attn.W_O"] == (4, 8, 32)
    assert shapes["blocks.0.mlp.W_in"] == (32, 64) and shapes["unembed.W_U"] == (32, 13)
