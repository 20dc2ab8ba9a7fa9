"""Figures of ``analyze_checkpoints`` and ``compare``: ``Figure`` objects in the package style (``figures.py``).

Where a panel has more lines than the 8-colour palette (activation hooks, parameters), every line gets its own
hue from ``colors(n)`` and a line style cycling over three, and the figure has one legend beside the panels.
Detection and phase events are drawn on every time axis of the progress-measure figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import cycle
from pathlib import Path

from matplotlib.figure import Figure

from ..figures import SPLIT_COLORS, event_style, colors, mark_events, new_figure, save_figure, styled
from ..fourier import FLOOR_RATIO

LINE_STYLES = ("-", "--", ":")
PROGRESS_PANELS = ("restricted_loss", "excluded_loss", "gini_embedding", "gini_neuron_logit", "total_weight_norm")


def save(fig: Figure, path: Path) -> str:
    save_figure(fig, path)
    return Path(path).name


def _steps(records) -> list[int]:
    return [r["step"] for r in records]


def _many_lines(ax, steps, series: Mapping[str, Sequence[float]], log: bool = False) -> None:
    """One line per series, each its own colour; styles cycle so neighbours in hue still differ."""
    for (name, values), color, style in zip(series.items(), colors(len(series)), cycle(LINE_STYLES)):
        points = [(s, v) for s, v in zip(steps, values)
                  if v is not None and math.isfinite(v) and (not log or v > 0)]
        ax.plot([s for s, _ in points], [v for _, v in points], linestyle=style, color=color, marker="o",
                markersize=2.5, label=name)
    if log:
        ax.set_yscale("log")


def _legend_beside(fig: Figure, ax, title: str | None = None, palette: Mapping[str, object] | None = None) -> None:
    """One legend right of the panels: of ``ax``'s lines, or one entry per ``palette`` name."""
    if palette is None:
        handles, labels = ax.get_legend_handles_labels()
    else:
        from matplotlib.lines import Line2D

        handles, labels = [Line2D([], [], color=c) for c in palette.values()], list(palette)
    fig.legend(handles, labels, loc="outside right upper", title=title, fontsize=7)


def _event_legend(fig: Figure, events: Sequence[dict]) -> None:
    if events:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=event_style(e["event"])[0], linestyle=event_style(e["event"])[1],
                          label=f"{e['event'].replace('_', ' ')} @ {e['step']:,}") for e in events]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(6, len(handles)), fontsize=8)


@styled
def progress_figure(records, history, keys, events: Sequence[dict] = ()) -> Figure:
    """Nanda's progress measures over the checkpoints, the learning curves, and the detected events."""
    fig, axes = new_figure(2, 2, figsize=(13, 8.5))
    (ax_loss, ax_gini), (ax_norm, ax_keys) = axes
    steps = _steps(records)
    if history:
        for split, color in SPLIT_COLORS.items():
            points = [(s, m[f"{split}_loss"]) for s, m in history if (m.get(f"{split}_loss") or 0) > 0]
            ax_loss.plot([s for s, _ in points], [v for _, v in points], color=color, alpha=0.8, label=f"{split} loss")
    else:
        for split, color in SPLIT_COLORS.items():
            ax_loss.plot(steps, [r[f"{split}_loss"] for r in records], "o-", color=color, label=f"{split} loss")
    ax_loss.plot(steps, [r["restricted_loss"] for r in records], "s-", color="#009E73", label="restricted loss")
    ax_loss.plot(steps, [r["excluded_loss"] for r in records], "^-", color="#CC79A7", label="excluded loss")
    ax_loss.set(yscale="log", xlabel="step", ylabel="cross-entropy",
                title=f"Restricted / excluded loss (key frequencies {keys or 'none'})")
    ax_loss.legend(loc="best")
    ax_gini.plot(steps, [r["gini_embedding"] for r in records], "o-", label="W_E (embedding)")
    ax_gini.plot(steps, [r["gini_neuron_logit"] for r in records], "s-", label="W_L = W_out W_U")
    ax_gini.set(xlabel="step", ylabel="Gini", title="Gini of the Fourier-basis norms", ylim=(0, 1))
    ax_gini.legend(loc="best")
    ax_norm.plot(steps, [r["total_weight_norm"] for r in records], "o-", color="#8c564b")
    ax_norm.set(xlabel="step", ylabel="‖θ‖₂", title="Total weight norm")
    ax_keys.step(steps, [r["n_key_frequencies"] for r in records], where="post", color="#444444")
    ax_keys.set(xlabel="step", ylabel="frequencies", title="Key frequencies standing out of W_E at each checkpoint")
    ax_keys.yaxis.get_major_locator().set_params(integer=True)
    for ax in axes.flat:
        mark_events(ax, events)
    _event_legend(fig, events)
    return fig


@styled
def spectrum_over_checkpoints_figure(records, final, keys) -> Figure:
    """Embedding norm per frequency over the checkpoints, and the final spectra of W_E and W_L with the rule."""
    import torch

    fig = Figure(figsize=(15, 8), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 1])
    ax_heat = top.subplots()
    matrix = torch.tensor([r["embedding_freq_norms"] for r in records]).T.numpy()  # (freq, checkpoint)
    image = ax_heat.imshow(matrix, aspect="auto", origin="lower", interpolation="nearest",
                           extent=(-0.5, len(records) - 0.5, 0.5, matrix.shape[0] + 0.5))
    ticks = list(range(0, len(records), max(1, len(records) // 12)))
    ax_heat.set_xticks(ticks, [f"{records[i]['step']:,}" for i in ticks], rotation=30)
    ax_heat.set(xlabel="checkpoint step", ylabel="frequency k", title="Embedding W_E: norm per Fourier frequency")
    ax_heat.grid(False)
    top.colorbar(image, ax=ax_heat, label="norm", pad=0.01)
    ax_e, ax_l = bottom.subplots(1, 2)
    for ax, norms, own_keys, title in ((ax_e, final.embedding_freq_norms, keys, "W_E"),
                                       (ax_l, final.neuron_logit_freq_norms, final.neuron_logit_key_frequencies,
                                        "W_L = W_out W_U (cross-check)")):
        freqs = list(range(1, len(norms) + 1))
        ax.bar(freqs, norms, color=["#D55E00" if f in own_keys else "#0072B2" for f in freqs])
        floor = float(torch.tensor(norms).median())
        ax.axhline(floor, color="#444444", linestyle="--", linewidth=1, label=f"floor (median) {floor:.2g}")
        ax.axhline(FLOOR_RATIO * floor, color="#444444", linestyle=":", linewidth=1,
                   label=f"{FLOOR_RATIO:g} x floor: keys stand above it")
        ax.set(xlabel="frequency k", ylabel="norm", title=f"Last checkpoint, {title}: keys (orange) {own_keys or 'none'}")
        ax.legend(loc="upper right")
    return fig


@styled
def attention_over_checkpoints_figure(heatmaps) -> Figure:
    """Attention from "=" to a over the (a, b) grid, per head (columns) at three checkpoints (rows)."""
    steps = sorted(heatmaps)
    n_heads = next(iter(heatmaps.values())).shape[0]
    fig, axes = new_figure(len(steps), n_heads, figsize=(2.9 * n_heads + 1.2, 2.9 * len(steps) + 0.6),
                           sharex=True, sharey=True)
    for row, step in enumerate(steps):
        for head in range(n_heads):
            ax = axes[row][head]
            image = ax.imshow(heatmaps[step][head, 0].numpy(), vmin=0, vmax=1, cmap="magma", origin="lower",
                              interpolation="nearest")
            ax.grid(False)
            ax.set_title(f"step {step:,} · head {head}", fontsize=9)
            if row == len(steps) - 1:
                ax.set_xlabel("b")
            if head == 0:
                ax.set_ylabel("a")
    fig.colorbar(image, ax=axes, shrink=0.8, label='attention "=" → a', pad=0.02)
    fig.suptitle('Attention from "=" to a over the (a, b) grid (to b = 1 − to a − to "=")')
    return fig


@styled
def attention_change_figure(records) -> Figure:
    fig, ((ax_to_a, ax_change),) = new_figure(1, 2, figsize=(12, 4.2))
    heads = list(records[0]["attention"])
    steps = _steps(records)
    _many_lines(ax_to_a, steps, {head: [r["attention"][head]["to_a"] for r in records] for head in heads})
    _many_lines(ax_change, steps[1:], {head: [r["attention"][head]["change"] for r in records[1:]] for head in heads})
    ax_to_a.set(xlabel="step", ylabel='mean attention "=" → a', title="Attention to a per head", ylim=(0, 1))
    ax_change.set(xlabel="step", ylabel="mean |Δ pattern|", title="Attention change since the previous checkpoint")
    _legend_beside(fig, ax_to_a)
    return fig


def component(name: str) -> str:
    """The part of the model a hook or parameter belongs to: one column of the small multiples."""
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "MLP"
    if name.startswith(("embed", "pos_embed", "hook_embed", "hook_pos_embed")):
        return "embedding"
    if name.startswith("unembed"):
        return "unembedding"
    return "residual stream"


def _short(name: str) -> str:
    return name.replace("blocks.", "").replace("hook_", "")


def _small_multiples(records, names: list[str], value, stats: Sequence[str], log_stats: Sequence[str] = (),
                     title: str = "", height: float = 2.6, into=None) -> Figure:
    """Rows: statistics; columns: model components; at most a handful of lines per panel, each its own colour.
    ``into``: a subfigure to draw in (default: a new figure)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(component(name), []).append(name)
    if into is None:
        fig, axes = new_figure(len(stats), len(groups), figsize=(4.2 * len(groups), height * len(stats) + 0.8),
                               sharex=True)
    else:
        fig, axes = into, into.subplots(len(stats), len(groups), squeeze=False, sharex=True)
    steps = _steps(records)
    for col, (group, members) in enumerate(groups.items()):
        for row, stat in enumerate(stats):
            ax = axes[row][col]
            _many_lines(ax, steps, {_short(n): [value(r, n, stat) for r in records] for n in members},
                        log=stat in log_stats)
            ax.set_title(f"{group}: {stat}" if row == 0 else stat, fontsize=10)
            if row == len(stats) - 1:
                ax.set_xlabel("step")
        # the column's legend under its last panel, never over the lines (constrained layout makes room for it)
        axes[-1][col].legend(*axes[0][col].get_legend_handles_labels(), loc="upper center",
                             bbox_to_anchor=(0.5, -0.32), ncols=2, fontsize=7, handlelength=2.5)
    if title:
        fig.suptitle(title)
    return fig


@styled
def activations_figure(records) -> Figure:
    """Mean, std, sparsity and norm of every cached activation, one column per component."""
    return _small_multiples(records, list(records[-1]["activations"]),
                            lambda r, hook, stat: r["activations"].get(hook, {}).get(stat),
                            ("mean", "std", "sparsity", "norm"), title="Activation statistics per hook")


@styled
def gradients_figure(records) -> Figure:
    """Gradient norm and gradient/parameter ratio of every parameter on the whole training set."""
    return _small_multiples(records, list(records[0]["gradients"]),
                            lambda r, name, stat: r["gradients"][name][stat], ("grad_norm", "ratio"),
                            log_stats=("grad_norm", "ratio"), height=3.2,
                            title="Gradient flow: ‖∇W‖ (grad_norm) and ‖∇W‖ / ‖W‖ (ratio) per parameter")


@styled
def weights_figure(records) -> Figure:
    """Per-parameter norms by component (top), the total norm and the relative change between checkpoints."""
    names = list(records[0]["weights"]["norms"])
    fig = Figure(figsize=(4.2 * len({component(n) for n in names}), 8), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1])
    _small_multiples(records, names, lambda r, name, stat: r["weights"]["norms"][name], ("‖W‖₂",),
                     title="Weight norm per parameter", into=top)
    ax_total, ax_change = bottom.subplots(1, 2)
    steps = _steps(records)
    ax_total.plot(steps, [r["weights"]["total_norm"] for r in records], "o-", color="black")
    ax_total.set(xlabel="step", ylabel="‖θ‖₂", title="Total weight norm")
    changes = [(r["step"], r["weight_relative_change"]) for r in records[1:]]
    ax_change.plot([s for s, _ in changes], [c for _, c in changes], "o-", color="#444444")
    ax_change.set(xlabel="step", ylabel="‖θ_t − θ_prev‖ / ‖θ_prev‖", title="Relative weight change between checkpoints")
    return fig


@styled
def measure_figure(records, measure) -> Figure:
    """A registered measure's default figure (``measure_registry.Measure.figure`` None): each of its metrics over
    the checkpoints, one panel each."""
    names = list(measure.metrics)
    fig, axes = new_figure(1, len(names), figsize=(4.6 * len(names), 3.8))
    for ax, name in zip(axes[0], names):
        points = [(r["step"], r.get(name)) for r in records]
        points = [(s, v) for s, v in points if v is not None and math.isfinite(v)]
        ax.plot([s for s, _ in points], [v for _, v in points], "o-", markersize=3)
        ax.set(xlabel="checkpoint step", ylabel=name.replace("_", " "), title=name.replace("_", " "))
    fig.suptitle(f"{measure.name}: {measure.description}" if measure.description else measure.name)
    return fig


# ---------------------------------------------------------------------------------------------- compare
@styled
def compare_runs_figure(runs: Mapping[str, Sequence[tuple[int, Mapping]]], progress: Mapping[str, dict] | None = None,
                        metrics: tuple[str, ...] = ("train_loss", "test_loss", "test_acc"),
                        title: str | None = None) -> Figure:
    """Learning curves of several runs on shared axes (one panel per metric), then their progress measures: from
    ``progress`` (run name -> ``analyze_checkpoints`` summary) where given, else from live measures in the history."""
    progress = progress or {}
    live = {name: [(s, m) for s, m in history if "restricted_loss" in m] for name, history in runs.items()}
    with_measures = set(progress) | {name for name, points in live.items() if points}
    panels = list(metrics) + (list(PROGRESS_PANELS) if with_measures else [])
    cols = min(4, len(panels))
    fig, axes = new_figure(math.ceil(len(panels) / cols), cols, figsize=(4.6 * cols, 3.9 * math.ceil(len(panels) / cols)))
    names = list(runs) + [n for n in progress if n not in runs]
    palette = dict(zip(names, colors(len(names))))
    for ax, panel in zip(axes.flat, panels):
        for name in names:
            if panel in metrics:
                points = [(s, m[panel]) for s, m in runs.get(name, []) if m.get(panel) is not None]
                style = "-"
            elif name in progress:
                points = [(r["step"], r.get(panel)) for r in progress[name].get("checkpoints", [])]
                style = "o-"
            else:
                points = [(s, m.get(panel)) for s, m in live.get(name, [])]
                style = ".-"
            points = [(s, v) for s, v in points if v is not None and (not panel.endswith("loss") or v > 0)]
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], style, markersize=3, color=palette[name],
                        label=name)
        if panel.endswith("loss"):
            ax.set_yscale("log")
        ax.set(xlabel="step", ylabel=panel.replace("_", " "), title=panel.replace("_", " "))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    _legend_beside(fig, axes.flat[0], "run", palette)
    if title:
        fig.suptitle(title)
    return fig


def compare_figure(runs, out_path: Path, progress: Mapping[str, dict] | None = None,
                   metrics: tuple[str, ...] = ("train_loss", "test_loss", "test_acc"), title: str | None = None) -> Path:
    """``compare_runs_figure`` saved as a PNG; returns its path."""
    return save_figure(compare_runs_figure(runs, progress, metrics, title), out_path)
