"""Progress measures of Nanda et al. 2023 ("Progress measures for grokking via mechanistic interpretability").

For ``a + b mod p`` a grokked 1-layer transformer embeds residues on a few circles (key frequencies w_k =
2πk/p), and its logits are a sum over those k of cos(w_k(a + b − c)). The measures here:

- Fourier basis of Z_n: constant, cos(2πkx/n), sin(2πkx/n) for k = 1..n//2, every row normalised.
- Spectrum of the embedding W_E (norm per frequency k) and of the neuron→logit map W_L = W_out W_U.
- Key frequencies: the rule in ``key_frequencies``.
- Restricted loss: logits over the whole (a, b) grid keep only their constant and key-frequency
  cos(w_k(a+b)), sin(w_k(a+b)) components in (a, b) (for each output c); their loss over all pairs.
  Since these directions times c's own dependence are exactly cos(w_k(a+b−c)), this is Nanda's
  "keep only the key frequencies" ablation. It falls before test loss while the circuit forms.
- Excluded loss: training loss after removing those key-frequency components; it rises during circuit
  formation (the memorising part alone no longer fits the training set).
- Gini coefficient of the Fourier-basis norms of W_E and W_L: sparsity of the Fourier representation.
- Total weight norm (falls during clean-up under weight decay).

What carries over to the other operations (``GroupView`` below):

- ``sub``: the same story with a − b: the directions are cos(w_k(a − b)), sin(w_k(a − b)).
- ``mul`` / ``div`` with prime p: Z_p^* is cyclic of order p − 1, so a = g^i, b = g^j turns a·b into
  i + j mod (p − 1) (and a/b into i − j). Every measure is computed in the discrete-log basis: residues
  are re-indexed by their exponent for a generator g, the Fourier basis is that of Z_{p−1}, and 0 (which
  has no logarithm) is left out of the grid, the embedding spectrum and the losses.
- ``mul`` with a composite p: Z_p^* need not be cyclic; the measures fall back to the additive basis
  and the summary says they are not meaningful.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import einsum, rearrange

from ..config import Config, is_prime
from ..data import apply_operation


# ---------------------------------------------------------------------------------------------- group
def primitive_root(p: int) -> int:
    """Smallest generator of Z_p^* (p prime). No torch/einops helper exists; it is a short search."""
    order = p - 1
    factors = {q for q in range(2, order + 1) if order % q == 0 and is_prime(q)}
    for g in range(2, p):
        if all(pow(g, order // q, p) != 1 for q in factors):
            return g
    return 1  # p = 2


@dataclass(frozen=True)
class GroupView:
    """How residues map onto a cyclic group Z_n in which the operation is addition or subtraction.

    ``residues[i]`` is the token whose group index is i; ``sign`` is +1 (a+b, a·b) or −1 (a−b, a/b).
    """

    n: int
    residues: tuple[int, ...]
    sign: int
    basis: str  # "additive" | "discrete_log"
    generator: int | None
    meaningful: bool
    note: str

    @staticmethod
    def for_task(p: int, operation: str) -> "GroupView":
        sign = -1 if operation in ("sub", "div") else 1
        if operation in ("add", "sub"):
            return GroupView(p, tuple(range(p)), sign, "additive", None, True,
                             f"Fourier basis of Z_{p}; directions cos/sin(w(a{'+' if sign > 0 else '-'}b))")
        if is_prime(p):
            g = primitive_root(p)
            residues = tuple(pow(g, i, p) for i in range(p - 1))
            return GroupView(p - 1, residues, sign, "discrete_log", g, True,
                             f"{operation}: residues re-indexed by discrete log base {g} (Z_{p}^* ≅ Z_{p - 1}); "
                             "0 has no logarithm and is left out")
        return GroupView(p, tuple(range(p)), sign, "additive", None, False,
                         f"{operation} with composite p={p}: measures computed in the additive basis, "
                         "not meaningful for this operation")


# ---------------------------------------------------------------------------------------------- basis
def fourier_basis(n: int) -> tuple[torch.Tensor, list[str]]:
    """Orthonormal real Fourier basis of Z_n as rows (n, n) and their names ("const", "cos 1", "sin 1", …).

    Built by hand (torch.fft gives complex coefficients; the real, named basis is what the measures and
    the Gini coefficient are defined on). For even n the Nyquist frequency n/2 has a cosine only.
    """
    x = torch.arange(n, dtype=torch.float64)
    rows, names = [torch.ones(n, dtype=torch.float64)], ["const"]
    for k in range(1, n // 2 + 1):
        rows.append(torch.cos(2 * math.pi * k * x / n))
        names.append(f"cos {k}")
        if 2 * k != n:
            rows.append(torch.sin(2 * math.pi * k * x / n))
            names.append(f"sin {k}")
    basis = torch.stack(rows)
    return basis / basis.norm(dim=-1, keepdim=True), names


def frequencies(n: int) -> list[int]:
    return list(range(1, n // 2 + 1))


def frequency_norms(matrix: torch.Tensor) -> torch.Tensor:
    """Norm per frequency k = 1..n//2 of a (n, d) matrix indexed by group element: sqrt(|cos k|² + |sin k|²)."""
    n = matrix.shape[0]
    basis, names = fourier_basis(n)
    coef = einsum(basis, matrix.to(torch.float64), "f x, x d -> f d")
    energy = coef.pow(2).sum(-1)
    per_freq = torch.zeros(n // 2 + 1, dtype=torch.float64)
    for i, name in enumerate(names):
        per_freq[0 if name == "const" else int(name.split()[1])] += energy[i]
    return per_freq[1:].sqrt()


def basis_norms(matrix: torch.Tensor) -> torch.Tensor:
    """Norm of each Fourier basis component (const, cos 1, sin 1, …) of a (n, d) matrix."""
    basis, _ = fourier_basis(matrix.shape[0])
    return einsum(basis, matrix.to(torch.float64), "f x, x d -> f d").norm(dim=-1)


def gini(values: torch.Tensor) -> float:
    """Gini coefficient of |values|: 0 when all equal, (n−1)/n when one carries everything.

    Nanda et al. use it as the sparsity of the Fourier-basis weights (no torch helper; standard formula
    on sorted values)."""
    x = values.detach().abs().flatten().to(torch.float64).sort().values
    n, total = x.numel(), x.sum()
    if n == 0 or total <= 0:
        return 0.0
    index = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * index - n - 1) * x).sum() / (n * total))


def key_frequencies(freq_norms: torch.Tensor, energy_fraction: float = 0.8,
                    max_keys: int = 10) -> tuple[list[int], float, bool]:
    """Key frequencies from a per-frequency norm spectrum (index 0 = frequency 1).

    Rule: sort frequencies by energy (norm²); take the smallest set explaining ``energy_fraction`` of the
    non-constant energy. If that needs more than ``max_keys`` frequencies the spectrum is not sparse (no
    Fourier circuit yet): the top ``max_keys`` are returned with ``sparse=False``.
    Returns (sorted frequencies, energy fraction they explain, sparse).
    """
    energy = freq_norms.to(torch.float64).pow(2)
    total = energy.sum()
    if total <= 0:
        return [], 0.0, False
    order = torch.argsort(energy, descending=True)
    cumulative = torch.cumsum(energy[order], 0) / total
    needed = int(torch.searchsorted(cumulative, torch.tensor(energy_fraction, dtype=torch.float64))) + 1
    needed = min(needed, len(order))
    sparse = needed <= max_keys
    chosen = order[: min(needed, max_keys)]
    return sorted(int(i) + 1 for i in chosen), float(energy[chosen].sum() / total), sparse


# ---------------------------------------------------------------------------------------------- logits
def key_directions(n: int, keys: list[int], sign: int) -> torch.Tensor:
    """Orthonormal directions over the flattened (a, b) grid: cos(w_k(a ± b)), sin(w_k(a ± b)) per key k.

    Shape (2·len(keys), n·n) (the Nyquist sine, identically 0, is dropped)."""
    i = torch.arange(n, dtype=torch.float64)
    phase = rearrange(i, "a -> a 1") + sign * rearrange(i, "b -> 1 b")
    rows = []
    for k in keys:
        for fn in (torch.cos, torch.sin):
            row = rearrange(fn(2 * math.pi * k * phase / n), "a b -> (a b)")
            if row.norm() > 1e-6:
                rows.append(row / row.norm())
    if not rows:
        return torch.zeros(0, n * n, dtype=torch.float64)
    return torch.stack(rows)


def project(logits_flat: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Component of (n·n, c) logits in the span of orthonormal (m, n·n) directions, per output c."""
    coef = einsum(directions, logits_flat, "m ab, ab c -> m c")
    return einsum(directions, coef, "m ab, m c -> ab c")


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if labels.numel() == 0:
        return float("nan")
    log_probs = logits.to(torch.float64).log_softmax(dim=-1)
    return float(-log_probs.gather(-1, labels[:, None]).mean())


def restricted_and_excluded_loss(grid_logits: torch.Tensor, labels: torch.Tensor, train_mask: torch.Tensor,
                                 keys: list[int], sign: int) -> tuple[float, float]:
    """Nanda's restricted loss (all pairs) and excluded loss (training pairs).

    grid_logits: (n, n, c) last-position logits indexed by group elements (a, b); labels (n, n) token
    labels; train_mask (n, n) bool. Restricted logits = constant (per c) + key-frequency components;
    excluded logits = logits − key-frequency components.
    """
    n = grid_logits.shape[0]
    flat = rearrange(grid_logits.to(torch.float64), "a b c -> (a b) c")
    flat_labels = rearrange(labels, "a b -> (a b)")
    flat_train = rearrange(train_mask, "a b -> (a b)")
    key_part = project(flat, key_directions(n, keys, sign))
    restricted = flat.mean(0, keepdim=True) + key_part  # the constant component of each c's logits
    excluded = flat - key_part
    return _loss(restricted, flat_labels), _loss(excluded[flat_train], flat_labels[flat_train])


def neuron_logit_map(model) -> torch.Tensor:
    """W_L = W_out @ W_U of the last block: (d_mlp, p), how each neuron writes to each output logit."""
    return einsum(model.blocks[-1].mlp.W_out, model.unembed.W_U, "m d, d c -> m c").detach()


@dataclass
class FourierMeasures:
    embedding_freq_norms: list[float]  # per frequency 1..n//2
    neuron_logit_freq_norms: list[float]
    gini_embedding: float
    gini_neuron_logit: float
    total_weight_norm: float


def spectrum_measures(model, view: GroupView) -> FourierMeasures:
    """Weight-only measures of one model (no forward pass)."""
    index = torch.tensor(view.residues)
    embedding = model.embed.W_E.detach()[index]  # (n, d_model), group order
    w_l = rearrange(neuron_logit_map(model)[:, index], "m x -> x m")  # over the output residue c
    total = torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in model.parameters()]))
    return FourierMeasures(
        embedding_freq_norms=frequency_norms(embedding).tolist(),
        neuron_logit_freq_norms=frequency_norms(w_l).tolist(),
        gini_embedding=gini(basis_norms(embedding)),
        gini_neuron_logit=gini(basis_norms(w_l)),
        total_weight_norm=float(total),
    )


def grid_tensors(config: Config, view: GroupView, train_tokens: torch.Tensor):
    """Labels (n, n) and train mask (n, n) over the group grid, plus the (p·p) flat index of each cell."""
    index = torch.tensor(view.residues)
    a = rearrange(index, "a -> a 1").expand(view.n, view.n)
    b = rearrange(index, "b -> 1 b").expand(view.n, view.n)
    labels = apply_operation(a, b, config.p, config.operation)
    train = torch.zeros(config.p, config.p, dtype=torch.bool)
    train[train_tokens[:, 0], train_tokens[:, 1]] = True
    return labels, train[a, b], a * config.p + b
