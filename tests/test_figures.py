"""Figures a person can read, checked on their data: nothing non-positive on a log axis, a colour per line where
lines outnumber the palette, the study's colour bars beside (not over) the panels, tick labels that do not run
into each other, no line joining study trials. Synthetic inputs; optuna figures from an in-memory study."""

from __future__ import annotations

import itertools
import warnings

import matplotlib
import pytest

from grokking_tracked import figures
from grokking_tracked.analysis import plots as analysis_plots


def log_axes_values(fig):
    """(axes, y values) of every line drawn on a log-scaled y axis of ``fig``."""
    return [(ax, list(line.get_ydata())) for ax in fig.axes if ax.get_yscale() == "log" for line in ax.get_lines()]


def test_grad_norm_of_zero_at_step_zero_stays_off_the_log_axis():
    history = [(0, {"weight_norm": 30.0, "grad_norm": 0.0, "train_loss": 4.0, "test_loss": 4.1}),
               *[(s, {"weight_norm": 30.0 - s / 100, "grad_norm": 1.0 / s, "train_loss": 4.0 / s, "test_loss": 4.0})
                 for s in range(10, 200, 10)]]
    fig = figures.norm_curves(history)
    drawn = log_axes_values(fig)
    assert drawn and all(v > 0 for _, values in drawn for v in values)
    fig.draw_without_rendering()
    assert all(ax.get_ylim()[0] > 1e-4 for ax, _ in drawn)  # not dragged to 1e-12 by a zero


def analysis_records(names, stat_value):
    return [{"step": step, "gradients": {n: {"grad_norm": stat_value(step, i), "ratio": stat_value(step, i)}
                                          for i, n in enumerate(names)},
             "activations": {n: {"mean": stat_value(step, i), "std": 1.0, "sparsity": 0.0, "norm": 1.0}
                             for i, n in enumerate(names)}}
            for step in range(0, 100, 10)]


def test_gradient_flow_skips_non_positive_values_on_its_log_axes():
    names = ["embed.W_E", "blocks.0.attn.W_Q", "blocks.0.mlp.W_in", "unembed.W_U"]
    fig = analysis_plots.gradients_figure(analysis_records(names, lambda step, i: 0.0 if step == 0 else 1.0 / step))
    drawn = log_axes_values(fig)
    assert drawn and all(v > 0 for _, values in drawn for v in values)


def test_fifteen_hooks_of_one_component_get_fifteen_colours_and_a_legend_outside_the_panels():
    names = [f"blocks.0.attn.hook_{i}" for i in range(15)]  # one column (attention) holding 15 lines
    fig = analysis_plots.activations_figure(analysis_records(names, lambda step, i: step * (i + 1)))
    for ax in fig.axes:
        colours = [matplotlib.colors.to_hex(line.get_color()) for line in ax.get_lines()]
        if colours:
            assert len(set(colours)) == len(colours) == 15
    fig.draw_without_rendering()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends
    for legend in legends:  # beside the panels: its box overlaps no panel's plotting area
        box = legend.get_window_extent()
        assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes), "a legend covers a panel"


@pytest.fixture
def study():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="figs", sampler=optuna.samplers.RandomSampler(seed=3))

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-3, 3e-2, log=True)
        wd = trial.suggest_float("weight_decay", 0.3, 3.0, log=True)
        frac = trial.suggest_float("train_frac", 0.3, 0.7)
        steps = int(500 / (lr * 100 * wd * frac))
        trial.set_user_attr("generalized", steps < 3000)
        trial.set_user_attr("generalization_step", steps if steps < 3000 else None)
        trial.set_user_attr("final_step", min(steps, 3000))
        return float(min(steps, 6000))

    study.optimize(objective, n_trials=10)
    return study


def tidied(make):
    import matplotlib.pyplot as plt

    from grokking_tracked.study import plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with figures.style():
            fig = plots.optuna_figure(make())
        plots.tidy(fig)
        fig.draw_without_rendering()
    plt.close(fig)
    return fig


def overlapping_tick_labels(ax) -> list[tuple[str, str]]:
    pairs = []
    for axis in (ax.xaxis, ax.yaxis):
        labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
        boxes = [(t.get_text(), t.get_window_extent()) for t in labels]
        pairs += [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2) if box_a.overlaps(box_b)]
    return pairs


@pytest.mark.parametrize("kind", ["contour", "slice"])
def test_study_figures_keep_colour_bars_beside_the_panels_and_log_ticks_apart(study, kind):
    from optuna.visualization import matplotlib as ovm

    params = ["lr", "weight_decay", "train_frac"]
    fig = tidied(lambda: ovm.plot_contour(study, params=params, target_name="steps to generalize") if kind == "contour"
                 else ovm.plot_slice(study, target_name="steps to generalize"))
    bars = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
    panels = [ax for ax in fig.axes if ax not in bars]
    assert bars and panels
    for bar, panel in itertools.product(bars, panels):
        assert not bar.get_window_extent().overlaps(panel.get_window_extent()), f"{kind}: colour bar over a panel"
    for panel in panels:
        if panel.collections:  # (the contour matrix's empty diagonal is shaded and named instead)
            assert panel.get_facecolor()[:3] == (1.0, 1.0, 1.0)  # our style, not ggplot's grey
        assert not overlapping_tick_labels(panel), overlapping_tick_labels(panel)
    assert any(panel.get_xscale() == "log" for panel in panels)


def test_steps_vs_train_frac_joins_no_trials_with_a_line_and_colours_them_by_lr(study):
    from grokking_tracked.study.report import train_frac_figure

    fig = train_frac_figure(study)
    ax = fig.axes[0]
    assert ax.get_lines() == []  # trials differ in lr and weight decay too: points only
    points = [c for c in ax.collections if len(c.get_offsets())]
    assert sum(len(c.get_offsets()) for c in points) == len(study.trials)
    assert all(c.get_array() is not None for c in points)  # coloured by a value (the learning rate)
    fig.draw_without_rendering()
    assert not overlapping_tick_labels(ax)


@pytest.mark.parametrize("overrides, layer", [({}, 0), ({"n_layers": 2}, 0), ({"n_layers": 2}, 1),
                                              ({"attention_rate": 0.5}, 0)])
def test_attention_grid_is_the_full_forward_pattern_of_the_equals_position(overrides, layer):
    """The grid reads the "=" row from a last-position-only forward: it must equal the full forward's pattern."""
    import torch
    from einops import rearrange

    from grokking_tracked.config import Config
    from grokking_tracked.data import all_pairs
    from grokking_tracked.model import GrokkingTransformer

    config = Config(p=13, d_model=32, d_mlp=64, n_heads=4, **overrides)
    model = GrokkingTransformer(config)
    grid = figures.attention_grid(model, config.p, layer)
    with torch.no_grad():
        _, cache = model.run_with_cache(all_pairs(config.p, "add")[0], names_filter=f"blocks.{layer}.attn.hook_pattern")
    full = rearrange(cache[f"blocks.{layer}.attn.hook_pattern"][:, :, -1, 0], "(a b) h -> h a b", a=config.p)
    assert grid.shape == (config.n_heads, config.p, config.p)
    assert torch.allclose(torch.from_numpy(grid), full, atol=1e-6)
