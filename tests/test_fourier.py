"""Fourier progress measures on hand-built weights and logits whose key frequencies are known."""

from __future__ import annotations

import math

import pytest
import torch

from grokking_tracked import fourier
from grokking_tracked.config import preset
from grokking_tracked.measures import ProgressMeasures
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
    assert float(fourier.gini(torch.ones(4))) == pytest.approx(0.0)
    assert float(fourier.gini(torch.tensor([0.0, 0.0, 0.0, 1.0]))) == pytest.approx(0.75)
    assert float(fourier.gini(torch.tensor([1.0, 2.0, 3.0, 4.0]))) == pytest.approx(0.25)
    assert float(fourier.gini(torch.tensor([-4.0, 3.0, -2.0, 1.0]))) == pytest.approx(0.25)  # of |values|
    assert float(fourier.gini(torch.zeros(5))) == 0.0


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


def read(model, operation: str = "add"):
    p = model.config.p
    return ProgressMeasures(p, operation, torch.zeros(0, 3, dtype=torch.long)).read(model)


def test_embedding_spectrum_finds_known_key_frequencies():
    model = hand_built_model(P, [2, 5])
    reading = read(model)
    norms = torch.tensor(reading.embedding_freq_norms)
    assert norms.shape == (P // 2,)
    assert set(torch.nonzero(norms > 1e-6).flatten().add(1).tolist()) == {2, 5}
    # |cos|^2 + |sin|^2 over the 13 residues of the circle of radius 3 (k=2) and 2 (k=5)
    assert norms[1] == pytest.approx(3 * math.sqrt(P), rel=1e-5) and norms[4] == pytest.approx(2 * math.sqrt(P), rel=1e-5)
    keys, explained, sparse = fourier.key_frequencies(norms)
    assert keys == [2, 5] and sparse and explained == pytest.approx(1.0)
    assert reading.key_frequencies == [2, 5] and reading.metrics["n_key_frequencies"] == 2
    # 4 non-zero basis rows out of 13: a sparse Fourier representation has a high Gini coefficient.
    assert reading.metrics["gini_embedding"] > 0.6
    assert reading.metrics["total_weight_norm"] == pytest.approx(
        float(torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in model.parameters()]))))


def spectrum(floor_seed: int = 0, size: int = 56) -> torch.Tensor:
    """A noise floor of norms in [0.7, 1.3] over ``size`` frequencies."""
    return torch.rand(size, generator=torch.Generator().manual_seed(floor_seed), dtype=torch.float64) * 0.6 + 0.7


def with_peaks(norms: torch.Tensor, peaks: dict[int, float]) -> torch.Tensor:
    norms = norms.clone()
    for k, value in peaks.items():
        norms[k - 1] = value
    return norms


def test_key_rule_takes_the_peaks_that_stand_out_of_the_floor():
    # The spectrum of issue 12: five peaks of norm 4.9-6.7, the next frequency at 2.2, a floor near 1. The old
    # 80 %-of-energy rule answered 10 frequencies (the floor's 50 small norms add up); the peaks are the answer.
    norms = with_peaks(spectrum(), {24: 6.7, 36: 4.9, 39: 5.5, 41: 6.0, 54: 5.2, 19: 2.2})
    keys, explained, sparse = fourier.key_frequencies(norms)
    assert keys == [24, 36, 39, 41, 54] and sparse
    assert explained == pytest.approx(float((norms[[23, 35, 38, 40, 53]] ** 2).sum() / (norms ** 2).sum()))
    # A grokked p=59 run of the default preset at step 1950: three peaks, then a decaying tail (17, 20, 2, …) over
    # a floor near 0.3. The largest gap is after the third peak.
    tail = {21: 3.36, 10: 2.95, 19: 2.35, 17: 1.01, 20: 0.69, 2: 0.65, 11: 0.55, 28: 0.49}
    assert fourier.key_frequencies(with_peaks(spectrum(1, 29) * 0.3, tail))[0] == [10, 19, 21]
    # The nanda2023 run at step 7,000, mid clean-up: the floor has fallen to ~0.4 and frequencies the circuit is
    # abandoning (35, 5, 31, 48) form a second tier above it; the keys are the top cluster above the first drop.
    second_tier = {41: 6.69, 39: 5.54, 24: 5.45, 54: 5.01, 36: 4.91, 35: 2.66, 5: 1.62, 31: 1.61, 48: 1.51, 17: 0.77}
    assert fourier.key_frequencies(with_peaks(spectrum(7) * 0.4, second_tier))[0] == [24, 36, 39, 41, 54]


@pytest.mark.parametrize("norms", [
    torch.ones(56),  # flat
    spectrum(2),  # noise only
    torch.randn(56, 256, generator=torch.Generator().manual_seed(3)).norm(dim=-1),  # a random embedding's spectrum
    with_peaks(spectrum(4), {10: 2.5, 20: 2.4}),  # bumps of 2.5x the floor do not stand out
    with_peaks(spectrum(5), {k: 5.0 for k in range(1, 30)}),  # half the spectrum high: no floor to stand out of
    torch.zeros(56),
])
def test_key_rule_finds_no_keys_without_peaks(norms):
    keys, explained, sparse = fourier.key_frequencies(norms)
    assert keys == [] and not sparse and explained == 0.0


def test_key_rule_finds_one_peak():
    assert fourier.key_frequencies(with_peaks(spectrum(6), {17: 4.0}))[0] == [17]
    assert fourier.key_frequencies(torch.tensor([0.0, 3.0, 0.0, 0.0, 0.0]))[0] == [2]  # exact zeros elsewhere


def test_key_frequency_mask_runs_on_the_tensor_without_leaving_it():
    norms = with_peaks(spectrum(), {3: 9.0, 7: 8.0})
    mask = fourier.key_frequency_mask(norms)
    assert mask.dtype == torch.bool and mask.shape == norms.shape
    assert torch.nonzero(mask).flatten().add(1).tolist() == [3, 7]


def trig_logits(n: int, keys: list[int], sign: int, scale: float = 20.0) -> torch.Tensor:
    """logits[a, b, c] = scale · Σ_k cos(w_k (a ± b − c)): the grokked algorithm's logits."""
    i = torch.arange(n, dtype=torch.float64)
    phase = i[:, None, None] + sign * i[None, :, None] - i[None, None, :]
    return scale * sum(torch.cos(2 * math.pi * k * phase / n) for k in keys)


def key_mask(n: int, keys: list[int]) -> torch.Tensor:
    mask = torch.zeros(n // 2, dtype=torch.bool)
    mask[torch.tensor(keys) - 1] = True
    return mask


def random_train_tokens(n: int, fraction: float = 0.4) -> torch.Tensor:
    pairs = torch.cartesian_prod(torch.arange(n), torch.arange(n))
    keep = torch.rand(len(pairs), generator=torch.Generator().manual_seed(0)) < fraction
    return torch.cat([pairs[keep], torch.full((int(keep.sum()), 1), n)], dim=1)


@pytest.mark.parametrize("operation,sign", [("add", 1), ("sub", -1)])
def test_restricted_and_excluded_loss_on_known_logits(operation, sign):
    n, keys = P, [3, 4]
    grid = fourier.TaskGrid.build(n, operation, random_train_tokens(n))
    logits = trig_logits(n, keys, sign).reshape(n * n, n)  # grid order: row i·n + j is (a, b) = (i, j)
    full = float(fourier.cross_entropy(logits, grid.labels))
    restricted, excluded = (float(x) for x in fourier.restricted_and_excluded_loss(logits, grid, key_mask(n, keys)))
    assert full < 1e-3
    assert restricted == pytest.approx(full, abs=1e-9)  # nothing outside the key frequencies
    assert excluded == pytest.approx(math.log(n), abs=1e-6)  # nothing left: uniform logits
    # The wrong frequencies keep nothing useful: restricted loss is uniform, excluded loss is the full loss.
    wrong_restricted, wrong_excluded = (float(x) for x in fourier.restricted_and_excluded_loss(
        logits, grid, key_mask(n, [1, 2])))
    assert wrong_restricted == pytest.approx(math.log(n), abs=1e-6)
    assert wrong_excluded == pytest.approx(float(fourier.cross_entropy(logits[grid.train], grid.labels[grid.train])),
                                           abs=1e-9)


@pytest.mark.parametrize("n,operation", [(8, "add"), (9, "sub")])
def test_anti_diagonal_projection_equals_the_explicit_projection_on_n_squared_directions(n, operation):
    """The projection through the n sums over s = a ± b equals projecting on orthonormalised directions
    cos(w_k s), sin(w_k s) over the n² grid (the textbook construction, built here), Nyquist included."""
    sign = -1 if operation == "sub" else 1
    keys = [1, n // 2]
    grid = fourier.TaskGrid.build(n, operation, random_train_tokens(n))
    logits = torch.randn(n * n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    s = (i[:, None] + sign * i[None, :]).flatten()
    rows = [torch.ones(n * n, dtype=torch.float64)]
    for k in keys:
        rows += [torch.cos(2 * math.pi * k * s / n), torch.sin(2 * math.pi * k * s / n)]
    basis = torch.stack([r / r.norm() for r in rows if r.norm() > 1e-6])
    kept = basis.T @ (basis @ logits)  # constant + key directions
    key_part = kept - logits.mean(0, keepdim=True)
    restricted, excluded = fourier.restricted_and_excluded_loss(logits, grid, key_mask(n, keys))
    assert float(restricted) == pytest.approx(float(fourier.cross_entropy(kept, grid.labels)), rel=1e-10)
    assert float(excluded) == pytest.approx(float(fourier.cross_entropy((logits - key_part)[grid.train],
                                                                         grid.labels[grid.train])), rel=1e-10)


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
    assert read(model, "mul").key_frequencies == [3]
    assert read(model, "add").key_frequencies != [3]  # in the additive basis the same embedding is not one frequency


def test_mul_restricted_loss_on_discrete_log_logits():
    p = P
    grid = fourier.TaskGrid.build(p, "mul", torch.zeros(0, 3, dtype=torch.long))
    n, keys = grid.view.n, [2, 5]
    index = torch.tensor(grid.view.residues)
    logits = torch.full((n, n, p), -30.0, dtype=torch.float64)  # the residue 0 is never the answer
    logits[:, :, index] = trig_logits(n, keys, 1)  # over (log a, log b, log c)
    restricted, _ = fourier.restricted_and_excluded_loss(logits.reshape(n * n, p), grid, key_mask(n, keys))
    assert float(restricted) < 1e-3
    wrong, _ = fourier.restricted_and_excluded_loss(logits.reshape(n * n, p), grid, key_mask(n, [1]))
    assert float(wrong) > 1.0
