"""Zhong et al.'s clock/pizza measures and the key-frequency variance explained, on inputs with a known answer;
the attention_rate field (Zhong's blend of learned and constant attention)."""

import math

import pytest
import torch

from grokking_tracked import fastpath
from grokking_tracked import fourier
from grokking_tracked.analysis import algorithm
from grokking_tracked.config import ConfigError, preset
from grokking_tracked.data import make_dataset
from grokking_tracked.model import GrokkingTransformer

P = 31


def grid_for(operation: str = "add", p: int = P) -> fourier.TaskGrid:
    return fourier.TaskGrid.build(p, operation, make_dataset(preset("default", p=p, operation=operation)).train_tokens)


def logits_with_correct(grid: fourier.TaskGrid, correct: torch.Tensor) -> torch.Tensor:
    """(n², p) logits, noise everywhere, ``correct`` (n²,) at each row's answer."""
    logits = torch.randn(grid.labels.shape[0], P, generator=torch.Generator().manual_seed(1))
    logits[torch.arange(len(logits)), grid.labels] = correct.float()
    return logits


# ------------------------------------------------------------------------------------------ distance irrelevance
@pytest.mark.parametrize("operation", ["add", "sub", "mul", "div"])  # mul/div: discrete-log order
def test_correct_logit_depending_only_on_the_distance_has_distance_irrelevance_zero(operation):
    grid = grid_for(operation)
    n = grid.view.n
    i, j = torch.arange(n * n) // n, torch.arange(n * n) % n
    distance = (i - grid.view.sign * j) % n  # a − b for add, a + b for sub (in exponents for mul/div)
    pizza_like = 5 + 3 * torch.cos(math.pi * distance / n).abs()  # Zhong's pizza: |cos(w(a − b)/2)|
    table = algorithm.correct_logit_table(logits_with_correct(grid, pizza_like), grid)
    assert algorithm.distance_irrelevance(table) == pytest.approx(0.0, abs=1e-6)


def test_correct_logit_independent_of_the_distance_has_distance_irrelevance_one():
    grid = grid_for()
    answer_only = 5 + torch.sin(2 * math.pi * 3 * grid.s_index.double() / P)  # depends on a + b only
    table = algorithm.correct_logit_table(logits_with_correct(grid, answer_only), grid)
    assert algorithm.distance_irrelevance(table) == pytest.approx(1.0, abs=1e-6)
    # the table is indexed [a + b, a − b]: a = 2, b = 5 sits at row 7, column −3
    row = 2 * P + 5
    assert table[7, (2 - 5) % P] == pytest.approx(float(answer_only[row]), abs=1e-5)


# ------------------------------------------------------------------------------------------ variance explained
def cos_table(grid: fourier.TaskGrid, weights: dict[int, float]) -> torch.Tensor:
    s = grid.s_index.double()[:, None]
    c = torch.arange(P, dtype=torch.float64)[None, :]
    return sum(w * torch.cos(2 * math.pi * k * (s - c) / P) for k, w in weights.items()).float()


def test_pure_key_frequency_logits_are_fully_explained_and_noise_is_not():
    grid = grid_for()
    pure = cos_table(grid, {4: 3.0, 11: 1.5}) + 7.0  # + a per-pair constant softmax ignores
    fraction, loss = algorithm.key_variance_explained(pure, grid, [4, 11])
    assert fraction == pytest.approx(1.0, abs=1e-6)
    assert loss == pytest.approx(float(fourier.cross_entropy(pure, grid.labels)), rel=1e-5)
    noise = torch.randn(P * P, P, generator=torch.Generator().manual_seed(0))
    assert algorithm.key_variance_explained(noise, grid, [4, 11])[0] < 0.01
    # keys the logits do not use explain only their own part
    assert algorithm.key_variance_explained(pure, grid, [4])[0] == pytest.approx(3.0 ** 2 / (3.0 ** 2 + 1.5 ** 2),
                                                                                abs=1e-6)
    assert algorithm.key_variance_explained(pure, grid, []) == (0.0, None)


# ------------------------------------------------------------------------------------------ gradient symmetricity
def test_constant_attention_makes_gradients_exactly_symmetric_and_learned_attention_does_not():
    """With attention_rate 0 the last position reads W_O·W_V(E_a + E_b) (+ the "=" terms): both gradients are one
    vector whatever the weights. Learned attention that weights a and b by their content (scores scaled up, as a
    trained clock's periodic attention does) makes them differ; at initialisation attention is near uniform."""
    grid = grid_for()
    uniform = GrokkingTransformer(preset("default", p=P, attention_rate=0.0))
    learned = GrokkingTransformer(preset("default", p=P))
    with torch.no_grad():
        for model in (uniform, learned):
            model.blocks[0].attn.W_Q.mul_(8)
            model.blocks[0].attn.W_K.mul_(8)
    assert algorithm.gradient_symmetricity(uniform, grid) == pytest.approx(1.0, abs=1e-6)
    assert algorithm.gradient_symmetricity(learned, grid) < 0.9


def test_gradient_symmetricity_is_seeded():
    grid = grid_for()
    model = GrokkingTransformer(preset("default", p=P))
    assert algorithm.gradient_symmetricity(model, grid) == algorithm.gradient_symmetricity(model, grid)


# ------------------------------------------------------------------------------------------ classification
@pytest.mark.parametrize("gs, di, accuracy, expected", [
    (0.994, 0.17, 1.0, "pizza"),  # Zhong's model A
    (0.33, 0.85, 1.0, "clock"),  # Zhong's model B
    (0.33, 0.85, 0.5, "undetermined"),  # a memorising network's logits have no structure either
    (0.9, 0.55, 1.0, "undetermined"),
    (float("nan"), 0.2, None, "undetermined"),
])
def test_classify_algorithm(gs, di, accuracy, expected):
    assert algorithm.classify_algorithm(gs, di, test_accuracy=accuracy) == expected


# ------------------------------------------------------------------------------------------ attention_rate
def test_attention_rate_blends_the_pattern_as_zhong_does_and_hook_pattern_shows_it():
    tokens = torch.tensor([[1, 2, P], [3, 4, P]])
    learned = GrokkingTransformer(preset("default", p=P))
    _, cache = learned.run_with_cache(tokens)
    softmax = cache["blocks.0.attn.hook_pattern"]
    for rate in (0.0, 0.3):
        blended = GrokkingTransformer(preset("default", p=P, attention_rate=rate))  # same seed, same weights
        logits, cache = blended.run_with_cache(tokens)
        causal = torch.tril(torch.ones(3, 3))
        assert torch.allclose(cache["blocks.0.attn.hook_pattern"], rate * softmax + (1 - rate) * causal, atol=1e-6)
        assert torch.allclose(blended(tokens, last_only=True), logits[:, -1], atol=1e-5)  # training path agrees


def test_fast_path_declines_blended_attention_and_field_is_validated():
    assert fastpath.supports(GrokkingTransformer(preset("default", p=P)))
    assert not fastpath.supports(GrokkingTransformer(preset("default", p=P, attention_rate=0.5)))
    with pytest.raises(ConfigError, match="attention_rate"):
        preset("default", attention_rate=1.5)
