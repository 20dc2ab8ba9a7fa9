"""Optuna's matplotlib figures brought into the package's style and made readable.

``optuna.visualization.matplotlib`` draws through pyplot in ggplot's style (it calls ``plt.style.use("ggplot")``)
and adds its colour bar with ``fig.colorbar(ax=axs)``; laid out with ``tight_layout`` the bar lands on the panels,
and the minor ticks of its log axes are labelled (``2×10⁻³ 3×10⁻³ 4×10⁻³`` running into each other).
``tidy`` fixes the figure optuna returns: our colours and grid, a constrained layout (colour bars beside the
panels), a few plainly labelled ticks on log axes, no offset on the colour bar, named diagonal panels.
"""

from __future__ import annotations

import math

from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter

from .. import figures
from ..tracking.redact import redact

GRID = figures.STYLE["grid.color"]
EDGE = figures.STYLE["axes.edgecolor"]


def optuna_figure(result):
    """The Figure behind what ``optuna.visualization.matplotlib`` returns (an Axes or an array of them)."""
    if hasattr(result, "figure"):
        return result.figure
    return result.flat[0].figure


def _restyle_axes(ax) -> None:
    ax.set_facecolor("white")
    ax.grid(True, color=GRID, linewidth=0.6)
    ax.set_axisbelow(True)
    for side, spine in ax.spines.items():
        spine.set_visible(side in ("left", "bottom"))
        spine.set_color(EDGE)
        spine.set_linewidth(0.8)
    ax.tick_params(colors=EDGE, labelcolor="black", labelsize=8)
    ax.xaxis.label.set_fontsize(9)
    ax.yaxis.label.set_fontsize(9)
    for title in (ax.title, ax._left_title, ax._right_title):
        title.set_fontsize(10)
    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            figures.log_ticks(axis)


def _colorbar_of(ax):
    return getattr(ax, "_colorbar", None)


def tidy(fig, title: str | None = None, min_size: tuple[float, float] = (9, 5.5)):
    """Bring a figure from ``optuna.visualization.matplotlib`` into the package style, readable; returns it."""
    fig.set_size_inches(max(fig.get_size_inches()[0], min_size[0]), max(fig.get_size_inches()[1], min_size[1]))
    fig.set_facecolor("white")
    grid_axes = []
    for ax in fig.axes:
        colorbar = _colorbar_of(ax)
        if colorbar is not None:  # a colour bar: no offset text ("1e-11+600" when all values are alike)
            colorbar.formatter = FuncFormatter(lambda value, _position: f"{value:.4g}")
            colorbar.update_ticks()
            colorbar.ax.tick_params(labelsize=8)
            colorbar.ax.yaxis.label.set_fontsize(9)
            continue
        grid_axes.append(ax)
        _restyle_axes(ax)
    _name_empty_diagonal(grid_axes)
    if title:
        fig.suptitle(title, fontsize=11)
    elif fig._suptitle is not None:
        fig._suptitle.set_fontsize(11)
    # Colour bars made with ``ax=`` over several panels keep their own place beside them in a constrained layout;
    # one made beside a single panel sits in a gridspec slot of its own, which only a tight layout can lay out.
    in_gridspec = any(_colorbar_of(ax) is not None and ax.get_subplotspec() is not None for ax in fig.axes)
    fig.set_layout_engine("tight" if in_gridspec else "constrained")
    return fig


def _name_empty_diagonal(axes) -> None:
    """The contour matrix's diagonal panels are empty (a parameter against itself): name the parameter there."""
    n = math.isqrt(len(axes))
    if n < 2 or n * n != len(axes):
        return
    for i in range(n):
        ax = axes[i * n + i]
        if ax.collections or ax.lines or ax.images:
            continue
        ax.grid(False)
        ax.set_facecolor("#f4f4f4")
        ax.text(0.5, 0.5, ax.get_xlabel(), transform=ax.transAxes, ha="center", va="center", fontsize=11,
                color=EDGE)


def relabel(result, ylabel: str):
    """Name what optuna's single-panel figure plots on its y axis (e.g. the pruning metric); returns ``result``."""
    result.set_ylabel(ylabel)
    return result


def redacted(fig):
    """``fig`` with every text drawn in it (titles, labels, legends, annotations) redacted: a study's name (and so
    its figures' titles) may carry a secret, as the tags and notes do; returns it."""
    for text in fig.findobj(Text):
        content = text.get_text()
        if content and (clean := redact(content)) != content:
            text.set_text(clean)
    return fig
