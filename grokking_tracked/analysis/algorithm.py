"""Which algorithm a network learned: Zhong et al. 2023's "clock" or "pizza", and how much of its logits
Nanda et al. 2023's key-frequency form explains.

Zhong et al. ("The Clock and the Pizza", public code ``fjzzq2002/pizza``) tell the two apart with two measures:

- **Gradient symmetricity** (the paper's definition): over triples (a, b, c), the cosine between ∂Q_abc/∂E_a and
  ∂Q_abc/∂E_b, Q_abc the output logit of c and E_a, E_b the input embeddings of a and b (before the positional
  embedding). A pizza reads E_a + E_b, so both gradients are one vector: symmetricity ≈ 1. A clock multiplies
  the two circles, and the gradients point along the circle's tangents at a and at b.
- **Distance irrelevance** (``code/train-main.py`` computes it after training: ``np.std(oo, axis=0)``): the correct
  answer's logit in a table L[a + b, a − b]; the mean over columns (a − b fixed) of the within-column standard
  deviation, divided by the standard deviation of the whole table (numpy's population std). A pizza's logit
  depends on |cos(w(a − b)/2)|, i.e. on the column: low. A clock's does not depend on a − b: near 1 (0.85).
  (train-main.py fills its stored table with the largest *wrong* logit, ``oo = np.array(oc)``; we follow the
  paper's definition, the correct logit.)

Gradient symmetricity is averaged over ``GRADIENT_TRIPLES`` seeded uniform random triples, not all n³ (the cell of
Zhong's ``code/eval-main.ipynb`` that samples them was not located in its 700 kB of outputs; a public
reproduction samples 100 uniform triples: we take 1,000 for a steadier mean).

- **Variance explained by the key frequencies** (Nanda et al. 2023: ~95 % on their main run): least-squares fit of
  the logits over all (a, b, c) by Σ_k α_k cos(w_k(a + b − c)) over the key frequencies k, after removing each
  (a, b)'s mean logit (softmax ignores it). Over the full grid these terms are orthogonal, so each α_k is one
  projection, computed on the n × n sums over pairs with the same a + b (as ``fourier.py``'s restricted loss).

Every operation is read in ``fourier.GroupView``'s group order: ``sub`` swaps the roles of a + b and a − b, and
``mul``/``div`` with prime p use the discrete-log re-indexing (Z_p^* ≅ Z_{p−1}; 0 is left out). Where the view is
not meaningful (``mul`` with composite p) the class is "undetermined".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformer_lens.utilities import get_act_name

from .. import fourier
from ..measure_registry import Measure, MeasureInput, register

GRADIENT_TRIPLES = 1000
GRADIENT_SEED = 0
# Thresholds, set between the two models Zhong et al. publish (pizza: symmetricity 0.994, distance irrelevance
# 0.17; clock: 0.33 and 0.85, as GUIDE.md quotes the paper; the pizza band is the one a public reproduction,
# ostenloo/clockandpizzarepro, labels with). Between the bands, and for a checkpoint that has not generalised
# (a memorising network's logits have no structure, so its distance irrelevance is near 1 too): "undetermined".
PIZZA_MIN_SYMMETRICITY = 0.98
PIZZA_MAX_DISTANCE_IRRELEVANCE = 0.4
CLOCK_MIN_DISTANCE_IRRELEVANCE = 0.7
CLOCK_MAX_SYMMETRICITY = 0.98
MIN_TEST_ACCURACY = 0.99
CLASSES = ("clock", "pizza", "undetermined")
RULE = (f"pizza: gradient symmetricity >= {PIZZA_MIN_SYMMETRICITY} and distance irrelevance < "
        f"{PIZZA_MAX_DISTANCE_IRRELEVANCE}; clock: distance irrelevance >= {CLOCK_MIN_DISTANCE_IRRELEVANCE} and "
        f"symmetricity < {CLOCK_MAX_SYMMETRICITY}; otherwise, or test accuracy < {MIN_TEST_ACCURACY}, or no "
        "meaningful group view: undetermined (thresholds between Zhong et al. 2023's published pizza and clock)")


def classify_algorithm(symmetricity: float, distance_irrelevance: float, *,
                       test_accuracy: float | None = None) -> str:
    """"clock" | "pizza" | "undetermined" by ``RULE``. ``test_accuracy`` below ``MIN_TEST_ACCURACY``: undetermined."""
    if not (math.isfinite(symmetricity) and math.isfinite(distance_irrelevance)):
        return "undetermined"
    if test_accuracy is not None and not test_accuracy >= MIN_TEST_ACCURACY:
        return "undetermined"
    if symmetricity >= PIZZA_MIN_SYMMETRICITY and distance_irrelevance < PIZZA_MAX_DISTANCE_IRRELEVANCE:
        return "pizza"
    if distance_irrelevance >= CLOCK_MIN_DISTANCE_IRRELEVANCE and symmetricity < CLOCK_MAX_SYMMETRICITY:
        return "clock"
    return "undetermined"


# ---------------------------------------------------------------------------------------------- distance irrelevance
def _pair_indices(grid: fourier.TaskGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Group index of each grid row's answer s = i ± j and of its "distance" d = i ∓ j (rows i·n + j)."""
    n = grid.view.n
    rows = torch.arange(n * n, device=grid.s_index.device)
    i, j = rows // n, rows % n
    return grid.s_index, (i - grid.view.sign * j) % n


def correct_logit_table(logits: torch.Tensor, grid: fourier.TaskGrid) -> torch.Tensor:
    """L[s, d] (n, n, float64): the correct answer's logit of the pair with answer index s and distance index d.

    logits: (n², c) last-position logits in ``grid`` order. For addition L[a + b, a − b], Zhong's table. For even n
    (mul/div: Z_{p−1}) s and d have the same parity, so (s, d) is not a grid: there the rows are a's index instead
    of s, and column d still holds the n pairs at distance d (all distance irrelevance needs)."""
    n = grid.view.n
    s, d = _pair_indices(grid)
    rows = s if n % 2 else torch.arange(n * n, device=s.device) // n
    correct = logits.to(torch.float64).gather(-1, grid.labels[:, None]).squeeze(-1)
    table = torch.empty(n, n, dtype=torch.float64, device=logits.device)
    table[rows, d] = correct
    return table


def distance_irrelevance(table: torch.Tensor) -> float:
    """Mean over columns (fixed distance) of the within-column std, over the whole table's std (population std)."""
    table = table.to(torch.float64)
    overall = table.std(unbiased=False)
    if not overall > 0:
        return float("nan")
    return float(table.std(dim=0, unbiased=False).mean() / overall)


# ---------------------------------------------------------------------------------------------- gradient symmetricity
def sample_triples(n: int, count: int = GRADIENT_TRIPLES, seed: int = GRADIENT_SEED) -> torch.Tensor:
    """(count, 3) group indices (i, j, k) of (a, b, c), uniform over Z_n³ from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (count, 3), generator=generator)


def gradient_symmetricity(model, grid: fourier.TaskGrid, triples: torch.Tensor | None = None) -> float:
    """Mean cosine of ∂logit_c/∂E_a and ∂logit_c/∂E_b over ``triples`` (group indices; default ``sample_triples``).

    The embeddings are replaced at ``hook_embed`` (before the positional embedding is added) by a leaf tensor, so
    a = b still gets two gradients, one per position."""
    triples = sample_triples(grid.view.n) if triples is None else triples
    residues = torch.tensor(grid.view.residues)[triples]  # (T, 3) tokens a, b, c
    p = model.config.p
    tokens = torch.stack([residues[:, 0], residues[:, 1], torch.full_like(residues[:, 0], p)], -1)
    device = next(model.parameters()).device
    tokens, answers = tokens.to(device), residues[:, 2].to(device)
    with torch.enable_grad():
        embedded = model.embed(tokens).detach().requires_grad_(True)
        logits = model.run_with_hooks(tokens, fwd_hooks=[(get_act_name("embed"), lambda value, hook: embedded)])[:, -1]
        (grad,) = torch.autograd.grad(logits.gather(-1, answers[:, None]).sum(), embedded)
    grad = grad.to(torch.float64)
    return float(F.cosine_similarity(grad[:, 0], grad[:, 1], dim=-1).mean())


# ---------------------------------------------------------------------------------------------- variance explained
def key_variance_explained(logits: torch.Tensor, grid: fourier.TaskGrid,
                           keys: list[int]) -> tuple[float, float | None]:
    """(fraction of the logits' variance explained by Σ_k α_k cos(w_k(s − c)), cross-entropy of that fit).

    logits: (n², c) in ``grid`` order; only the n output classes of the group are used, in group order (for the
    discrete-log view, 0 is left out). Each (a, b)'s mean over c is removed first. No keys: (0.0, None)."""
    n = grid.view.n
    residues = torch.tensor(grid.view.residues, device=logits.device)
    y = logits.to(torch.float64)[:, residues]  # (n², n) columns in group order
    y = y - y.mean(-1, keepdim=True)
    total = float(y.pow(2).sum())
    if not keys or not total > 0:
        return 0.0, None
    sums = torch.zeros(n, n, dtype=torch.float64, device=y.device).index_add_(0, grid.s_index, y)  # (s, c)
    x = torch.arange(n, dtype=torch.float64, device=y.device)
    angle = 2 * math.pi * (x[:, None] - x[None, :]) / n  # (s, c): s − c
    fitted = torch.zeros(n, n, dtype=torch.float64, device=y.device)
    explained = 0.0
    for k in keys:
        term = torch.cos(k * angle)
        norm = n * float(term.pow(2).sum())  # each s is the answer of n pairs
        alpha = float((sums * term).sum()) / norm
        fitted += alpha * term
        explained += alpha * alpha * norm
    loss = float(fourier.cross_entropy(fitted[grid.s_index], grid.s_index))
    return explained / total, loss


# ---------------------------------------------------------------------------------------------- one checkpoint
def measure(model, grid: fourier.TaskGrid, logits: torch.Tensor, keys: list[int]) -> dict[str, float | None]:
    """The three measures of one checkpoint. logits: (n², c) last-position logits in ``grid`` order."""
    fraction, fit_loss = key_variance_explained(logits, grid, keys)
    return {
        "gradient_symmetricity": gradient_symmetricity(model, grid),
        "distance_irrelevance": distance_irrelevance(correct_logit_table(logits, grid)),
        "key_variance_explained": fraction,
        "key_fit_loss": fit_loss,
    }


def _measure(given: MeasureInput) -> dict[str, float | None]:
    return measure(given.model, given.grid, given.grid_logits, given.keys)


# gradient symmetricity replaces the embeddings at hook_embed itself (run_with_hooks): no cached activation needed
ALGORITHM = register(Measure(
    "algorithm", ("gradient_symmetricity", "distance_irrelevance", "key_variance_explained"), _measure,
    description="Zhong et al. 2023's clock-or-pizza measures and the key frequencies' share of the logits"))
