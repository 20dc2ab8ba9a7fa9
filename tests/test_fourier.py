"""Fourier progress measures on hand-built weights and logits whose key frequencies are known."""

from __future__ import annotations

import math

import pytest
import torch

from grokking_tracked.analysis import fourier
from grokking_tracked.config import preset
from grokking_tracked.model import GrokkingTransformer

P = 13


def wave(k: int, n: int, fn=torch.cos) -> torch.Tensor:
    return fn(2 * math.pi * k * torch.arange(n, dtype=torch.float64) / n)


@pytest.mark.parametrize("n", [7, 8, 13])
def test_fourier_basis_is_orthonormal_and_named(n):
    basis, names = fourier.fourier_basis(n)
    assert basis.shape == (n, n)
    torch.testing.assert_close(basis @ basis.T, torch.eye(n, dtype=torch.float64))
    assert names[:3] == ["const", "cos 1", "sin 1"]
    assert (names[-1] == f"cos {n // 2}") == (n % 2 == 0)  # Nyquist: cosine only


def test_gini_on_known_vectors():
    assert fourier.gini(torch.ones(4)) == pytest.approx(0.0)
    assert fourier.gini(torch.tensor([0.0, 0.0, 0.0, 1.0])) == pytest.approx(0.75)
    assert fourier.gini(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.25)
    assert fourier.gini(torch.tensor([-4.0, 3.0, -2.0, 1.0])) == pytest.approx(0.25)  # of |values|
    assert fourier.gini(torch.zeros(5)) == 0.0


def hand_built_model(p: int, keys: list[int], operation: str = "add") -> GrokkingTransformer:
    """A real model whose embedding lives on the given frequencies only (2 dims per frequency)."""
    config = preset("default", p=p, operation=operation, d_model=16, n_heads=4, d_mlp=32)
    model = GrokkingTransformer(config)
    view = fourier.GroupView.for_task(p, operation)
    embedding = torch.zeros(config.d_vocab, config.d_model)
    for j, k in enumerate(keys):
        for offset, fn in enumerate((torch.cos, torch.sin)):
            embedding[list(view.residues), 2 * j + offset] = (3.0 - j) * wave(k, view.n, fn).float()
    with torch.no_grad():
        model.embed.W_E.copy_(embedding)
    return model


def test_embedding_spectrum_finds_known_key_frequencies():
    model = hand_built_model(P, [2, 5])
    view = fourier.GroupView.for_task(P, "add")
    measures = fourier.spectrum_measures(model, view)
    norms = torch.tensor(measures.embedding_freq_norms)
    assert norms.shape == (P // 2,)
    assert set(torch.nonzero(norms > 1e-6).flatten().add(1).tolist()) == {2, 5}
    keys, explained, sparse = fourier.key_frequencies(norms)
    assert keys == [2, 5] and sparse and explained == pytest.approx(1.0)
    # 4 non-zero basis rows out of 13: a sparse Fourier representation has a high Gini coefficient.
    assert measures.gini_embedding > 0.6
    assert measures.total_weight_norm == pytest.approx(
        float(torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in model.parameters()]))))


def test_key_frequencies_rule_on_flat_spectrum_is_not_sparse():
    keys, explained, sparse = fourier.key_frequencies(torch.ones(30), energy_fraction=0.8, max_keys=10)
    assert len(keys) == 10 and not sparse and explained == pytest.approx(1 / 3)
    keys, _, sparse = fourier.key_frequencies(torch.tensor([0.1, 5.0, 0.1, 0.1, 4.0, 0.1]))
    assert keys == [2, 5] and sparse


def trig_logits(n: int, keys: list[int], sign: int, scale: float = 20.0) -> torch.Tensor:
    """logits[a, b, c] = scale · Σ_k cos(w_k (a ± b − c)): the grokked algorithm's logits."""
    i = torch.arange(n, dtype=torch.float64)
    phase = i[:, None, None] + sign * i[None, :, None] - i[None, None, :]
    return scale * sum(torch.cos(2 * math.pi * k * phase / n) for k in keys)


@pytest.mark.parametrize("operation,sign", [("add", 1), ("sub", -1)])
def test_restricted_and_excluded_loss_on_known_logits(operation, sign):
    n, keys = P, [3, 4]
    logits = trig_logits(n, keys, sign)
    a, b = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    labels = (a + sign * b) % n
    train = torch.rand(n, n, generator=torch.Generator().manual_seed(0)) < 0.4
    full = fourier._loss(logits.reshape(n * n, n), labels.flatten())
    restricted, excluded = fourier.restricted_and_excluded_loss(logits, labels, train, keys, sign)
    assert full < 1e-3
    assert restricted == pytest.approx(full, abs=1e-9)  # nothing outside the key frequencies
    assert excluded == pytest.approx(math.log(n), abs=1e-6)  # nothing left: uniform logits
    # The wrong frequencies keep nothing useful: restricted loss is uniform, excluded loss is the full loss.
    wrong_restricted, wrong_excluded = fourier.restricted_and_excluded_loss(logits, labels, train, [1, 2], sign)
    assert wrong_restricted == pytest.approx(math.log(n), abs=1e-6)
    assert wrong_excluded == pytest.approx(fourier._loss(logits[train], labels[train]), abs=1e-9)


def test_key_directions_are_orthonormal_including_nyquist():
    directions = fourier.key_directions(8, [1, 2, 4], sign=1)
    assert directions.shape == (5, 64)  # sin of the Nyquist frequency 4 is identically zero
    torch.testing.assert_close(directions @ directions.T, torch.eye(5, dtype=torch.float64))


def test_discrete_log_view_for_mul_and_div():
    assert fourier.primitive_root(7) == 3
    assert fourier.primitive_root(113) == 3
    view = fourier.GroupView.for_task(7, "mul")
    assert view.basis == "discrete_log" and view.n == 6 and view.sign == 1 and view.meaningful
    assert view.residues == (1, 3, 2, 6, 4, 5)  # 3^i mod 7
    assert sorted(view.residues) == list(range(1, 7))
    assert fourier.GroupView.for_task(7, "div").sign == -1
    composite = fourier.GroupView.for_task(15, "mul")
    assert composite.basis == "additive" and not composite.meaningful and "not meaningful" in composite.note


def test_mul_embedding_on_discrete_log_circle_has_its_key_frequency():
    # Residue g^i is embedded at angle 2π·k·i/(p−1): a circle in the discrete-log basis only.
    model = hand_built_model(P, [3], operation="mul")
    view = fourier.GroupView.for_task(P, "mul")
    keys, _, sparse = fourier.key_frequencies(torch.tensor(fourier.spectrum_measures(model, view).embedding_freq_norms))
    assert keys == [3] and sparse
    additive = fourier.GroupView.for_task(P, "add")
    keys_additive, _, _ = fourier.key_frequencies(
        torch.tensor(fourier.spectrum_measures(model, additive).embedding_freq_norms))
    assert keys_additive != [3]  # in the additive basis the same embedding is not a single frequency


def test_mul_restricted_loss_on_discrete_log_logits():
    p = P
    view = fourier.GroupView.for_task(p, "mul")
    n, keys = view.n, [2, 5]
    group_logits = trig_logits(n, keys, 1)  # over (log a, log b, log c)
    index = torch.tensor(view.residues)
    grid_logits = torch.full((n, n, p), -30.0, dtype=torch.float64)  # the residue 0 is never the answer
    grid_logits[:, :, index] = group_logits
    labels = (index[:, None] * index[None, :]) % p
    train = torch.ones(n, n, dtype=torch.bool)
    restricted, excluded = fourier.restricted_and_excluded_loss(grid_logits, labels, train, keys, view.sign)
    assert restricted < 1e-3
    assert excluded > 1.0
