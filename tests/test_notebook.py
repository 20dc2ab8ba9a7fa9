"""Notebook use: ``ExperimentResult.plot()`` gives a matplotlib Figure of the learning curves and ``_repr_png_``
the PNG Jupyter shows inline, without touching the process's matplotlib backend, pyplot's figures or rcParams."""

from __future__ import annotations

import matplotlib
import pytest
from matplotlib.figure import Figure

from grokking_tracked.config import preset
from grokking_tracked.tracking.experiment import ExperimentResult
from grokking_tracked.train import Trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result():
    """A real (tiny) training's result, as ``run_experiment`` returns it (no store needed to draw it)."""
    trained = Trainer(preset("default", p=23, d_model=32, d_mlp=64, max_steps=120, eval_every=10, checkpoint_every=0),
                      progress=False).train()
    return ExperimentResult("0123456789abcdef0123456789abcdef", trained, "sqlite:///unused.db", "1")


@pytest.fixture
def svg_backend():
    """A backend that is not the package's Agg, so that a switch to Agg (or to anything) is seen."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    yield "svg"
    matplotlib.use(before)


def test_plot_returns_the_learning_curves_as_a_figure(result, svg_backend):
    import matplotlib.pyplot as plt

    figures_before, rc_before = plt.get_fignums(), dict(matplotlib.rcParams)
    fig = result.plot()
    assert isinstance(fig, Figure)
    loss, accuracy = fig.axes[:2]
    assert loss.get_yscale() == "log"
    lines = {line.get_label(): line for ax in (loss, accuracy) for line in ax.get_lines()}
    assert {"train loss", "test loss", "train accuracy", "test accuracy"} <= set(lines)
    assert list(lines["test accuracy"].get_xdata()) == [s for s, m in result.history if "test_acc" in m]
    assert list(lines["test accuracy"].get_ydata()) == [m["test_acc"] for s, m in result.history if "test_acc" in m]
    assert result.run_id[:8] in fig.get_suptitle()
    # nothing process-wide changed: the backend, pyplot's figures (a notebook would show a stray one), rcParams
    assert matplotlib.get_backend() == svg_backend
    assert plt.get_fignums() == figures_before
    assert dict(matplotlib.rcParams) == rc_before


def test_repr_png_is_the_png_jupyter_shows_inline(result, svg_backend):
    import matplotlib.pyplot as plt

    figures_before = plt.get_fignums()
    png = result._repr_png_()
    assert isinstance(png, bytes) and png.startswith(PNG_MAGIC)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 800 and height > 300  # the two panels at the package's size and dpi, not a thumbnail
    assert matplotlib.get_backend() == svg_backend
    assert plt.get_fignums() == figures_before
