"""Progress measures of Nanda et al. 2023 ("Progress measures for grokking via mechanistic interpretability").

For ``a + b mod p`` a grokked 1-layer transformer embeds residues on a few circles (key frequencies w_k =
2πk/p), and its logits are a sum over those k of cos(w_k(a + b − c)). The measures here:

- Fourier basis of Z_n: constant, cos(2πkx/n), sin(2πkx/n) for k = 1..n//2, every row normalised.
- Spectrum of the embedding W_E (norm per frequency k) and of the neuron→logit map W_L = W_out W_U.
- Key frequencies: the rule in ``key_frequency_mask`` (``KEY_RULE``): the top cluster of the sorted spectrum,
  down to its first big drop, standing out of the noise floor. (The first drop, not the largest: while
  clean-up lowers the floor, frequencies the circuit is abandoning form a second tier above it.)
- Restricted loss: logits over the whole (a, b) grid keep only their constant and key-frequency
  cos(w_k(a+b)), sin(w_k(a+b)) components in (a, b) (for each output c); their loss over all pairs.
  Since these directions times c's own dependence are exactly cos(w_k(a+b−c)), this is Nanda's
  "keep only the key frequencies" ablation. It falls before test loss while the circuit forms.
  Those directions depend on (a, b) only through s = a + b, so the projection is computed on the
  n sums over each anti-diagonal s instead of n² × n² directions: O(n² · c) work, cheap enough to run live.
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
import torch.nn.functional as F
from einops import einsum, rearrange

from .config import is_prime
from .data import apply_operation


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
def fourier_basis(n: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, list[str]]:
    """Orthonormal real Fourier basis of Z_n as float64 rows (n, n) and their names ("const", "cos 1", "sin 1", …).

    Built by hand (torch.fft gives complex coefficients; the real, named basis is what the measures and
    the Gini coefficient are defined on). For even n the Nyquist frequency n/2 has a cosine only.
    """
    x = torch.arange(n, dtype=torch.float64, device=device)
    rows, names = [torch.ones(n, dtype=torch.float64, device=device)], ["const"]
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


def per_frequency(row_values: torch.Tensor) -> torch.Tensor:
    """Sum a value per basis row (const, cos 1, sin 1, …) over each frequency's rows: (n//2,), index 0 = k 1."""
    rest = row_values[1:]
    if row_values.shape[0] % 2 == 0:  # the Nyquist frequency has a cosine row only
        rest = F.pad(rest, (0, 1))
    return rearrange(rest, "(k two) -> k two", two=2).sum(-1)


def basis_coefficients(matrix: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """Coefficients (n, d) of a (n, d) matrix indexed by group element in the Fourier basis of Z_n."""
    if basis is None:
        basis, _ = fourier_basis(matrix.shape[0], matrix.device)
    return einsum(basis, matrix.to(torch.float64), "f x, x d -> f d")


def frequency_norms(matrix: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """Norm per frequency k = 1..n//2 of a (n, d) matrix indexed by group element: sqrt(|cos k|² + |sin k|²)."""
    return per_frequency(basis_coefficients(matrix, basis).pow(2).sum(-1)).sqrt()


def basis_norms(matrix: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """Norm of each Fourier basis component (const, cos 1, sin 1, …) of a (n, d) matrix."""
    return basis_coefficients(matrix, basis).norm(dim=-1)


def gini(values: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of |values| (a 0-dim float64 tensor): 0 when all equal, (n−1)/n when one carries all.

    Nanda et al. use it as the sparsity of the Fourier-basis weights (no torch helper; standard formula
    on sorted values). Stays on the values' device: no host sync."""
    x = values.detach().abs().flatten().to(torch.float64).sort().values
    n = x.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.float64, device=values.device)
    index = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    total = x.sum()
    return torch.where(total > 0, ((2 * index - n - 1) * x).sum() / (n * total.clamp_min(1e-300)), 0.0)


# ---------------------------------------------------------------------------------------------- key frequencies
MAX_KEYS = 10  # the paper's runs have 3-5 key frequencies
FLOOR_RATIO = 3.0  # every key's norm is >= 3x the floor: it stands out of the noise
MIN_GAP = 1.6  # the cut is a real drop: weakest key >= 1.6x the next frequency (keys differ by less)
KEY_RULE = (f"per-frequency norms of the embedding W_E (group order); floor = their median (keys are few, so the "
            f"median is a noise frequency); sort descending and cut at the first big drop from the top: the "
            f"smallest j with norm_j / norm_(j+1) >= {MIN_GAP:g} and norm_j >= {FLOOR_RATIO:g} x floor, "
            f"j <= min({MAX_KEYS}, (frequencies - 1) // 2); keys = the j largest. No such cut: no "
            "key frequencies and sparse = false. The same rule on the neuron->logit map W_L = W_out W_U (over the "
            "output residue) is the cross-check")


def key_frequency_mask(norms: torch.Tensor, max_keys: int = MAX_KEYS) -> torch.Tensor:
    """Boolean mask over frequencies 1..n//2 of the key frequencies of a norm spectrum (``KEY_RULE``).

    Tensor ops only (no host sync), so the live measures can pick keys on the GPU."""
    norms = norms.to(torch.float64)
    count = norms.numel()
    cuts = min(max_keys, (count - 1) // 2)
    mask = torch.zeros(count, dtype=torch.bool, device=norms.device)
    if cuts < 1:
        return mask
    ordered, order = norms.sort(descending=True)
    floor = norms.median()
    weakest_key, strongest_other = ordered[:cuts], ordered[1:cuts + 1]  # cut after j = 1..cuts
    gaps = weakest_key / strongest_other.clamp_min(torch.finfo(torch.float64).tiny)
    allowed = (weakest_key >= FLOOR_RATIO * floor) & (gaps >= MIN_GAP) & (weakest_key > 0)
    best = allowed.to(torch.int8).argmax()  # index j-1 of the first allowed cut from the top
    keep = (torch.arange(count, device=norms.device) <= best) & allowed.any()
    return mask.scatter(0, order, keep)


def key_frequencies(norms: torch.Tensor, max_keys: int = MAX_KEYS) -> tuple[list[int], float, bool]:
    """(sorted key frequencies, fraction of the non-constant energy (norm²) they carry, sparse) of a spectrum
    (index 0 = frequency 1). ``sparse`` is true iff the rule finds key frequencies at all."""
    norms = torch.as_tensor(norms, dtype=torch.float64)
    mask = key_frequency_mask(norms, max_keys)
    energy = norms.pow(2)
    total = float(energy.sum())
    keys = (torch.nonzero(mask).flatten() + 1).tolist()
    return keys, float(energy[mask].sum()) / total if total > 0 else 0.0, bool(keys)


def key_agreement(embedding_keys: list[int], neuron_logit_keys: list[int]) -> dict:
    """How the key frequencies of W_E and of W_L agree (Jaccard index of the two sets; 1.0 when both are empty)."""
    a, b = set(embedding_keys), set(neuron_logit_keys)
    return {"same": a == b, "jaccard": len(a & b) / len(a | b) if a | b else 1.0,
            "only_embedding": sorted(a - b), "only_neuron_logit": sorted(b - a)}


# ---------------------------------------------------------------------------------------------- logits
@dataclass
class TaskGrid:
    """Every (a, b) pair of the task in group order (row i·n + j is a = residues[i], b = residues[j]) on one
    device: tokens, labels, training mask, the row-major p·p index of each pair, and s = i ± j mod n."""

    view: GroupView
    tokens: torch.Tensor  # (n², 3) [a, b, =]
    labels: torch.Tensor  # (n²,)
    train: torch.Tensor  # (n²,) bool
    flat_index: torch.Tensor  # (n²,) a·p + b
    s_index: torch.Tensor  # (n²,) group index of a ± b
    basis: torch.Tensor  # (n, n) Fourier basis of Z_n, float64

    @classmethod
    def build(cls, p: int, operation: str, train_tokens: torch.Tensor,
              device: torch.device | str = "cpu") -> "TaskGrid":
        view = GroupView.for_task(p, operation)
        residues = torch.tensor(view.residues)
        i, j = torch.cartesian_prod(torch.arange(view.n), torch.arange(view.n)).unbind(-1)
        a, b = residues[i], residues[j]
        in_train = torch.zeros(p, p, dtype=torch.bool)
        in_train[train_tokens[:, 0].cpu(), train_tokens[:, 1].cpu()] = True
        tensors = dict(tokens=torch.stack([a, b, torch.full_like(a, p)], -1), labels=apply_operation(a, b, p, operation),
                       train=in_train[a, b], flat_index=a * p + b, s_index=(i + view.sign * j) % view.n)
        return cls(view, basis=fourier_basis(view.n, device)[0], **{k: v.to(device) for k, v in tensors.items()})


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in float64 (a 0-dim tensor; NaN for no labels)."""
    log_probs = logits.to(torch.float64).log_softmax(dim=-1)
    return -log_probs.gather(-1, labels[:, None]).mean()


def restricted_and_excluded_loss(logits: torch.Tensor, grid: TaskGrid,
                                 key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nanda's restricted loss (all pairs) and excluded loss (training pairs), as 0-dim tensors.

    logits: (n², c) last-position logits in ``grid`` order; key_mask: (n//2,) bool over frequencies.
    The key directions over (a, b) are u_k(s)/√n for the 1-D basis rows u_k of s = a ± b, so projecting onto
    them is projecting the n anti-diagonal sums onto u_k, divided by n."""
    n = grid.view.n
    logits = logits.to(torch.float64)
    sums = torch.zeros(n, logits.shape[-1], dtype=torch.float64, device=logits.device)
    sums.index_add_(0, grid.s_index, logits)  # (n, c): sum over the pairs with the same s
    key_rows = rearrange(torch.stack([key_mask, key_mask]), "two k -> (k two)")[: n - 1]  # cos k, sin k
    key_basis = grid.basis[1:] * key_rows[:, None]
    key_part = (key_basis.T @ (key_basis @ sums) / n)[grid.s_index]  # (n², c)
    constant = logits.mean(0, keepdim=True)  # the constant direction, per output c
    restricted = cross_entropy(constant + key_part, grid.labels)
    excluded = cross_entropy((logits - key_part)[grid.train], grid.labels[grid.train])
    return restricted, excluded


def neuron_logit_map(model) -> torch.Tensor:
    """W_L = W_out @ W_U of the last block: (d_mlp, p), how each neuron writes to each output logit."""
    return einsum(model.blocks[-1].mlp.W_out, model.unembed.W_U, "m d, d c -> m c").detach()
