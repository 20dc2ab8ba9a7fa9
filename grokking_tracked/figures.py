"""Figures of a training run, and the one style and saving helper every figure of the package uses.

Every figure is a ``matplotlib.figure.Figure`` built directly (no ``pyplot``): nothing here touches
matplotlib's global state, so ``import grokking_tracked`` in a notebook keeps inline plotting and its
backend. The style is applied with ``matplotlib.rc_context`` around building and saving only
(``@styled``), never process-wide.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
from cycler import cycler
from matplotlib.figure import Figure

from .detect import EVENTS

SPLIT_COLORS = {"train": "#0072B2", "test": "#D55E00"}
DPI = 110

# Okabe-Ito: distinguishable with the common colour-vision deficiencies; 8 colours.
_BASE_COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]

STYLE = {
    "figure.facecolor": "white", "axes.facecolor": "white", "savefig.facecolor": "white",
    "axes.edgecolor": "#444444", "axes.linewidth": 0.8, "axes.grid": True, "grid.color": "#dddddd",
    "grid.linewidth": 0.6, "axes.spines.top": False, "axes.spines.right": False,
    "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
    "legend.fontsize": 8, "legend.frameon": False, "figure.titlesize": 12, "lines.linewidth": 1.5,
    "lines.markersize": 4, "axes.prop_cycle": cycler(color=_BASE_COLORS),
    "figure.dpi": DPI, "savefig.dpi": DPI, "image.cmap": "viridis",
    # a title sits above its axes at a fixed place; by default (None) matplotlib measures every tick label of
    # the axes at each draw to lift the title over top ticks we never have: the same pixels, ~15 % of a study
    # trial's figure time
    "axes.titley": 1.0,
}


@contextlib.contextmanager
def style():
    """The package's one figure style, for the duration of the block only."""
    with matplotlib.rc_context(STYLE):
        yield


def styled(build):
    """Decorator: build a figure inside ``style()`` (rc parameters are read when artists are created)."""

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        with style():
            return build(*args, **kwargs)

    return wrapper


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (8, 4.5),
               margins: dict | None = None, **subplot_kw):
    """A ``Figure`` and its (nrows, ncols) array of axes; call inside ``style()``/``@styled``.

    By default the layout is constrained (colour bars, legends and labels never cover their neighbours).
    ``margins`` (``subplots_adjust`` arguments) fixes the layout by hand instead: the run figures drawn for every
    study trial use it, because constrained layout doubles their drawing time (~0.15 s a figure here)."""
    fig = Figure(figsize=figsize, layout=None if margins else "constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    if margins:
        fig.subplots_adjust(**margins)
    return fig, axes


def colors(n: int) -> list:
    """``n`` distinct colours: the 8-colour base palette, then evenly spaced hues (never a repeated colour)."""
    if n <= len(_BASE_COLORS):
        return _BASE_COLORS[:n]
    import seaborn as sns

    return list(sns.color_palette("husl", n))


def log_ticks(axis) -> None:
    """A few plainly labelled ticks on a log axis (1-2-5, 1-3 or decades by the span) and no minor labels:
    matplotlib labels minor ticks when the span is under a decade, and ``1.45×10³ 1.5×10³`` collide."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.axes.autoscale_view()
    low, high = sorted(axis.get_view_interval())
    if not (low > 0 and high > low):
        return
    decades = math.log10(high / low)
    subs = (1.0, 2.0, 5.0) if decades < 1.5 else (1.0, 3.0) if decades < 3 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG in the package style; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with style():
        fig.savefig(path, dpi=DPI)
    return path


def _series(history: Sequence[tuple[int, dict]], key: str, positive: bool = False) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; ``positive`` drops values <= 0 (they have no place on a log axis)."""
    points = [(step, metrics[key]) for step, metrics in history
              if key in metrics and metrics[key] is not None and (not positive or metrics[key] > 0)]
    return [s for s, _ in points], [v for _, v in points]


def event_style(name: str) -> tuple[str, object]:
    """(colour, line style) of an event, from its registry entry (``detect.EVENTS``); grey dashes if unknown."""
    event = EVENTS.get(name)
    return (event.color, event.linestyle) if event is not None else ("gray", "--")


def mark_events(ax, events: Sequence[dict]) -> None:
    for event in events:
        color, linestyle = event_style(event["event"])
        ax.axvline(event["step"], color=color, linestyle=linestyle, linewidth=1.2,
                   label=f"{event['event'].replace('_', ' ')} @ {event['step']:,}")


@styled
def learning_curves(history: Sequence[tuple[int, dict]], events: Sequence[dict] = (), title: str = "") -> Figure:
    """Loss (log scale) and accuracy of train and test, with the detection events marked."""
    fig, ((ax_loss, ax_acc),) = new_figure(1, 2, figsize=(12, 4.5), margins=dict(
        left=0.07, right=0.98, bottom=0.12, top=0.86 if title else 0.9, wspace=0.22))
    for split, color in SPLIT_COLORS.items():
        steps, losses = _series(history, f"{split}_loss", positive=True)
        ax_loss.plot(steps, losses, color=color, label=f"{split} loss")
        steps, accs = _series(history, f"{split}_acc")
        ax_acc.plot(steps, accs, color=color, label=f"{split} accuracy")
    ax_loss.set_yscale("log")
    ax_loss.set(xlabel="optimizer step", ylabel="cross-entropy loss", title="Loss")
    ax_acc.set(xlabel="optimizer step", ylabel="accuracy", title="Accuracy", ylim=(-0.02, 1.02))
    for ax in (ax_loss, ax_acc):
        mark_events(ax, events)
        ax.legend(loc="best")
    if title:
        fig.suptitle(title)
    return fig


@styled
def norm_curves(history: Sequence[tuple[int, dict]], events: Sequence[dict] = ()) -> Figure:
    """Total weight norm and gradient norm over training (weight decay's clean-up shows as a falling weight norm).

    The gradient norm at step 0 is 0 (no backward yet): it is left off the log axis rather than drawn at 1e-12."""
    fig, ((ax_w, ax_g),) = new_figure(1, 2, figsize=(12, 4), margins=dict(left=0.07, right=0.98, bottom=0.13,
                                                                           top=0.9, wspace=0.22))
    steps, values = _series(history, "weight_norm")
    ax_w.plot(steps, values, color="#8c564b")
    ax_w.set(xlabel="optimizer step", ylabel="L2 norm of all parameters", title="Weight norm")
    steps, values = _series(history, "grad_norm", positive=True)
    ax_g.plot(steps, values, color="#444444")
    ax_g.set_yscale("log")
    ax_g.set(xlabel="optimizer step", ylabel="L2 norm of the gradient", title="Gradient norm")
    for ax in (ax_w, ax_g):
        mark_events(ax, events)
        if events:
            ax.legend()
    return fig


def attention_grid(model, p: int, layer: int = 0):
    """(heads, a, b) numpy array: attention paid by the "=" position to operand a over the whole (a, b) grid,
    read from ``blocks.{layer}.attn.hook_pattern`` with ``run_with_cache``."""
    import torch
    from transformer_lens.utilities import get_act_name

    from .data import all_pairs
    from .model import attention_from_equals

    tokens, _ = all_pairs(p, "add")  # every (a, b) pair in row-major order, whatever the model's task
    device = next(model.parameters()).device
    with torch.no_grad():
        # last_only: only the "=" position's queries are computed in the last block (the pattern is the same;
        # on p = 59 the grid costs a third of a full forward, paid per trial on a study worker's critical path)
        _, cache = model.run_with_cache(tokens.to(device), last_only=True,
                                        names_filter=get_act_name("pattern", layer))
    return attention_from_equals(cache, p, layer)[:, 0].cpu().numpy()  # "=" attends to a


@styled
def attention_at_step_figure(grid, layer: int = 0, title: str = "") -> Figure:
    """Per head, the attention from "=" to a over the (a, b) grid: a generalising model shows periodic stripes
    (Nanda et al. 2023), a memorising one noise."""
    n_heads = grid.shape[0]
    fig, axes = new_figure(1, n_heads, figsize=(3.2 * n_heads + 1, 3.6), margins=dict(
        left=0.05, right=0.88, bottom=0.14, top=0.8, wspace=0.25))
    for head, ax in enumerate(axes[0]):
        image = ax.imshow(grid[head], vmin=0, vmax=1, origin="lower", interpolation="nearest")
        ax.set(title=f"head {head}", xlabel="b", ylabel="a" if head == 0 else "")
        ax.grid(False)
    fig.colorbar(image, cax=fig.add_axes((0.9, 0.14, 0.015, 0.66)), label='attention "=" → a')
    fig.suptitle(f"Layer {layer}: attention from '=' to a" + (f", {title}" if title else ""))
    return fig


@styled
def spectrum_at_step_figure(norms: Sequence[float], keys: Sequence[int], step: int) -> Figure:
    """The embedding's norm per Fourier frequency at one checkpoint, the run's key frequencies highlighted."""
    fig, ((ax,),) = new_figure(1, 1, figsize=(8, 3.4), margins=dict(left=0.08, right=0.98, bottom=0.16, top=0.86))
    frequencies = range(1, len(norms) + 1)
    ax.bar(frequencies, norms, color=[SPLIT_COLORS["test"] if k in keys else "#999999" for k in frequencies])
    ax.set(xlabel="frequency k", ylabel="norm of W_E's component",
           title=f"Embedding Fourier spectrum at step {step:,} (key frequencies {list(keys)} in colour)")
    ax.grid(axis="x", visible=False)
    return fig


@styled
def stability_curves(history: Sequence[tuple[int, dict]], events: Sequence[dict] = ()) -> Figure:
    """Prieto et al. 2025's view of the run (stability.py): the softmax-collapse fraction of the training pairs, the
    NLM cosine cos(-g, theta) and the logit scale (mean largest logit), read on the progress cadence."""
    fig, ((ax_c, ax_n, ax_s),) = new_figure(1, 3, figsize=(15, 4), margins=dict(left=0.05, right=0.98, bottom=0.13,
                                                                                top=0.9, wspace=0.25))
    for ax, key, color, label, title in (
            (ax_c, "softmax_collapse", "#d62728", "share of training pairs", "Softmax collapse (float32)"),
            (ax_n, "nlm_cosine", "#9467bd", "cos(-gradient, weights)", "Naive loss minimisation"),
            (ax_s, "logit_scale", "#8c564b", "mean largest logit", "Logit scale")):
        steps, values = _series(history, key)
        ax.plot(steps, values, color=color, marker="." if len(steps) < 50 else None)
        ax.set(xlabel="optimizer step", ylabel=label, title=title)
        mark_events(ax, events)
    ax_c.set_ylim(-0.02, 1.02)
    ax_n.set_ylim(-1.02, 1.02)
    if events:
        ax_c.legend(loc="best")
    return fig


def save_run_figures(directory: str | Path, history: Sequence[tuple[int, dict]], events: Sequence[dict],
                     title: str, grid) -> list[Path]:
    """The three figures of a run as PNG files in ``directory`` (matplotlib only: a figure process can draw them
    from the history, the events and the attention grid, without torch or the model); a fourth, ``stability``,
    where the run read the live measures (progress_every > 0)."""
    directory = Path(directory)
    figures = [("learning_curves", learning_curves(history, events, title)), ("norms", norm_curves(history, events)),
               ("attention", attention_at_step_figure(grid))]
    if any("softmax_collapse" in metrics for _, metrics in history):
        figures.append(("stability", stability_curves(history, events)))
    return [save_figure(figure, directory / f"{name}.png") for name, figure in figures]


METRIC_LABELS = {"test_acc": "test accuracy", "train_acc": "train accuracy", "test_loss": "test loss",
                 "train_loss": "train loss"}


@styled
def grouped_curves(groups: dict[str, list[list[tuple[int, dict]]]], metrics=("test_acc",), band="iqr") -> Figure:
    """Per group (name -> its runs' histories), the median of each metric with its band (``iqr`` or ``minmax``,
    ``groups.aggregate``) on shared axes, one panel per metric; steps on a log axis (step 0 left off), losses too."""
    from .groups import BAND_LABELS, aggregate

    fig, axes = new_figure(1, len(metrics), figsize=(6.2 * len(metrics), 4.4))
    palette = dict(zip(groups, colors(len(groups))))
    for ax, metric in zip(axes[0], metrics):
        is_loss = metric.endswith("_loss")
        for name, histories in groups.items():
            curve = aggregate(histories, metric, band)
            keep = (curve.steps > 0) & ((curve.low > 0) if is_loss else True)
            steps = curve.steps[keep]
            ax.fill_between(steps, curve.low[keep], curve.high[keep], color=palette[name], alpha=0.22, linewidth=0)
            ax.plot(steps, curve.median[keep], color=palette[name], label=f"{name} (n={len(histories)})")
        ax.set_xscale("log")
        if is_loss:
            ax.set_yscale("log")
        log_ticks(ax.xaxis)
        ax.set(xlabel="optimizer step (log)", ylabel=METRIC_LABELS.get(metric, metric),
               title=f"{METRIC_LABELS.get(metric, metric)}: median, band {BAND_LABELS[band]}")
        if not is_loss and metric.endswith("_acc"):
            ax.set_ylim(-0.02, 1.02)
    axes[0][0].legend(loc="best")
    return fig


def event_step_table(groups: dict[str, list[list[dict]]]):
    """Per group (name -> its runs' events lists) and event: the median step (a run that never reached it counts as
    later than any), min and max over the runs that reached it, ``reached`` of ``runs`` (``groups.event_step_rows``)
    as a pandas DataFrame."""
    import pandas as pd

    from .groups import event_step_rows

    return pd.DataFrame(event_step_rows(groups), columns=["group", "event", "median", "min", "max", "reached", "runs"])
