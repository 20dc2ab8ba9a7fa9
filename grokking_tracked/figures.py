"""Figures of a training run (matplotlib / seaborn). Each function returns a Figure; the caller saves or logs it."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files, never a window: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

EVENT_STYLE = {"memorization": ("tab:orange", "--"), "onset": ("tab:purple", ":"), "generalization": ("tab:green", "-.")}


def _series(history: Sequence[tuple[int, dict]], key: str) -> tuple[list[int], list[float]]:
    points = [(step, metrics[key]) for step, metrics in history if key in metrics]
    return [s for s, _ in points], [v for _, v in points]


def _mark_events(ax, events: Sequence[dict]) -> None:
    for event in events:
        color, style = EVENT_STYLE.get(event["event"], ("gray", "--"))
        ax.axvline(event["step"], color=color, linestyle=style, linewidth=1.2,
                   label=f"{event['event']} @ {event['step']}")


def learning_curves(history: Sequence[tuple[int, dict]], events: Sequence[dict] = (), title: str = "") -> plt.Figure:
    """Loss (log scale) and accuracy of train and test, with the detection events marked."""
    sns.set_theme(style="whitegrid")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for split, color in (("train", "tab:blue"), ("test", "tab:red")):
        steps, losses = _series(history, f"{split}_loss")
        ax_loss.plot(steps, [max(v, 1e-12) for v in losses], color=color, label=f"{split} loss")
        steps, accs = _series(history, f"{split}_acc")
        ax_acc.plot(steps, accs, color=color, label=f"{split} accuracy")
    ax_loss.set_yscale("log")
    ax_loss.set(xlabel="optimizer step", ylabel="cross-entropy loss", title="Loss")
    ax_acc.set(xlabel="optimizer step", ylabel="accuracy", title="Accuracy", ylim=(-0.02, 1.02))
    for ax in (ax_loss, ax_acc):
        _mark_events(ax, events)
        ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def norm_curves(history: Sequence[tuple[int, dict]], events: Sequence[dict] = ()) -> plt.Figure:
    """Total weight norm and gradient norm over training (weight decay's clean-up shows as a falling weight norm)."""
    sns.set_theme(style="whitegrid")
    fig, (ax_w, ax_g) = plt.subplots(1, 2, figsize=(12, 4))
    steps, values = _series(history, "weight_norm")
    ax_w.plot(steps, values, color="tab:brown")
    ax_w.set(xlabel="optimizer step", ylabel="L2 norm of all parameters", title="Weight norm")
    steps, values = _series(history, "grad_norm")
    ax_g.plot(steps, [max(v, 1e-12) for v in values], color="tab:gray")
    ax_g.set_yscale("log")
    ax_g.set(xlabel="optimizer step", ylabel="L2 norm of the gradient", title="Gradient norm")
    for ax in (ax_w, ax_g):
        _mark_events(ax, events)
        if events:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def attention_heatmap(model, p: int, layer: int = 0) -> plt.Figure:
    """Attention paid by the "=" position to operand a, per head, over the whole (a, b) grid.

    Read from ``blocks.{layer}.attn.hook_pattern`` with ``run_with_cache``: a generalising model shows
    periodic stripes (Nanda et al. 2023), a memorising one noise."""
    import torch
    from einops import rearrange

    from .data import all_pairs

    tokens, _ = all_pairs(p, "add")  # every (a, b) pair in row-major order, whatever the model's task
    device = next(model.parameters()).device
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(device), names_filter=f"blocks.{layer}.attn.hook_pattern")
    to_a = cache[f"blocks.{layer}.attn.hook_pattern"][:, :, -1, 0].cpu()  # (pairs, head): "=" attends to a
    grid = rearrange(to_a, "(a b) head -> head a b", a=p, b=p)
    n_heads = grid.shape[0]
    fig, axes = plt.subplots(1, n_heads, figsize=(3.6 * n_heads, 3.4), squeeze=False)
    for head, ax in enumerate(axes[0]):
        sns.heatmap(grid[head].numpy(), ax=ax, vmin=0, vmax=1, cmap="viridis", cbar=head == n_heads - 1,
                    xticklabels=False, yticklabels=False)
        ax.set(title=f"head {head}", xlabel="b", ylabel="a" if head == 0 else "")
    fig.suptitle(f"Layer {layer}: attention from '=' to a")
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)
