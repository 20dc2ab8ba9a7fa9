"""The onset table over many runs, on synthetic events whose answers are known."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure

from grokking_tracked.analysis.detection import onset_quality, onset_quality_figure


def events(**steps):
    return [{"event": name, "step": step} for name, step in steps.items()]


RUNS = {
    "hit-early": events(memorization=50, onset=400, generalization=1000),  # lead 600 of a 950 delay
    "hit-late": events(memorization=100, onset=900, generalization=1000),  # lead 100 of 900
    "same-eval": events(memorization=100, onset=500, generalization=500),  # lead 0: warned at the last moment
    "false-alarm": events(memorization=80, onset=700),
    "miss": events(memorization=60, generalization=300),
    "quiet": events(memorization=70),
    "nothing": [],
}


def test_outcomes_leads_and_rates():
    quality = onset_quality(RUNS)
    by_run = {row["run"]: row for row in quality.rows}
    assert {run: row["outcome"] for run, row in by_run.items()} == {
        "hit-early": "hit", "hit-late": "hit", "same-eval": "hit", "false-alarm": "false_alarm", "miss": "miss",
        "quiet": "quiet", "nothing": "quiet"}
    assert by_run["hit-early"]["lead"] == 600 and by_run["hit-early"]["lead_fraction"] == pytest.approx(600 / 950)
    assert by_run["hit-late"]["lead"] == 100 and by_run["same-eval"]["lead"] == 0
    assert by_run["false-alarm"]["lead"] is None and by_run["miss"]["lead"] is None
    s = quality.summary
    assert (s["n_runs"], s["hit"], s["false_alarm"], s["miss"], s["quiet"]) == (7, 3, 1, 1, 2)
    assert s["precision"] == pytest.approx(3 / 4) and s["recall"] == pytest.approx(3 / 4)
    assert (s["lead_median"], s["lead_min"], s["lead_max"]) == (100, 0, 600)
    frame = quality.to_frame()
    assert list(frame["run"]) == list(RUNS) and frame.loc[frame["run"] == "miss", "outcome"].item() == "miss"


def test_no_alarms_and_no_grokking_have_no_rates():
    s = onset_quality({"a": events(memorization=10), "b": []}).summary
    assert s["precision"] is None and s["recall"] is None and s["lead_median"] is None and s["quiet"] == 2


def test_figure_draws_every_run_and_the_counts(tmp_path):
    quality = onset_quality(RUNS)
    fig = onset_quality_figure(quality)
    assert isinstance(fig, Figure)
    runs_ax, counts_ax = fig.axes
    assert [t.get_text() for t in runs_ax.get_yticklabels()] == [
        "same-eval", "hit-early", "hit-late", "false-alarm", "miss", "quiet", "nothing"]  # by outcome, then step
    assert [int(bar.get_height()) for bar in counts_ax.patches] == [3, 1, 1, 2]
    fig.savefig(tmp_path / "onset.png")
