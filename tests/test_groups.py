"""Seeds grouped: the config-group tag (a config without its seeds), the median and band a grouped comparison draws,
the event-step table, and `compare --group-by` against a real MLflow server."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import run_cli
from grokking_tracked.config import preset
from grokking_tracked.figures import event_step_table, grouped_curves
from grokking_tracked.groups import CONFIG_GROUP_TAG, aggregate, config_group


def test_config_group_ignores_seeds_and_runtime_but_not_the_experiment():
    base = preset("default")
    name = config_group(base)
    assert name.startswith("add59-f0.3-lr0.01-wd1-")
    assert config_group(base.replace(seed=1, data_seed=2)) == name
    assert config_group(base.replace(max_steps=90000, device="cpu", checkpoint_every=0, stop_on_grok=False)) == name
    assert config_group(base.replace(lr=3e-3)) != name
    assert config_group(base.replace(grokfast_lambda=2.0)) != name  # outside the readable prefix: the digest says
    assert config_group(base.replace(eval_every=20)) != name  # where events can be detected
    assert f"`{name}`" in (Path(__file__).resolve().parents[1] / "docs" / "commands.md").read_text()  # the docs example


def history(values: dict[int, float], metric: str = "test_acc") -> list[tuple[int, dict]]:
    return [(step, {metric: value}) for step, value in values.items()]


def test_median_and_band_over_runs():
    runs = [history({10: v, 20: 10 * v}) for v in (1.0, 2.0, 3.0, 4.0, 5.0)]
    iqr = aggregate(runs, "test_acc", "iqr")
    assert iqr.steps.tolist() == [10, 20]
    assert iqr.median.tolist() == [3.0, 30.0]
    assert (iqr.low.tolist(), iqr.high.tolist()) == ([2.0, 20.0], [4.0, 40.0])
    assert iqr.n.tolist() == [5, 5]
    minmax = aggregate(runs, "test_acc", "minmax")
    assert (minmax.low.tolist(), minmax.high.tolist()) == ([1.0, 10.0], [5.0, 50.0])


def test_a_run_that_stopped_keeps_its_last_value_and_one_that_starts_later_has_none_before():
    stopped = history({0: 0.0, 10: 1.0})  # stop_on_grok ended it after generalising
    slow = history({0: 0.0, 10: 0.2, 20: 0.4, 30: 0.6})
    late = history({20: 0.5, 30: 0.7})  # evaluated on another grid, from step 20
    curve = aggregate([stopped, slow, late], "test_acc", "minmax")
    assert curve.steps.tolist() == [0, 10, 20, 30]
    assert curve.n.tolist() == [2, 2, 3, 3]
    assert np.allclose(curve.median, [0.0, 0.6, 0.5, 0.7])
    assert np.allclose(curve.low, [0.0, 0.2, 0.4, 0.6]) and np.allclose(curve.high, [0.0, 1.0, 1.0, 1.0])


def test_the_figure_draws_each_groups_median_and_band():
    groups = {"a": [history({10: v, 100: 2 * v}) for v in (0.1, 0.2, 0.4)], "b": [history({10: 0.5, 100: 0.9})]}
    fig = grouped_curves(groups, metrics=("test_acc",), band="iqr")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert np.allclose(lines["a (n=3)"].get_ydata(), [0.2, 0.4])
    assert ax.get_xscale() == "log"
    band = ax.collections[0].get_paths()[0].vertices[:, 1]  # fill_between's polygon: low edge and high edge
    assert np.isclose(band.min(), 0.15) and np.isclose(band.max(), 0.6)  # 25th/75th percentiles of (.2, .4, .8)


def test_event_table_counts_runs_that_never_reached_an_event():
    def events(**steps):
        return [{"event": name, "step": step} for name, step in steps.items()]

    table = event_step_table({
        "fast": [events(memorization=100, generalization=400), events(memorization=120, generalization=800),
                 events(memorization=90, generalization=500)],
        "stuck": [events(memorization=200), None],  # None: a run without events.json
        "slow": [events(generalization=1000), events(generalization=3000), events()]})
    row = table.set_index(["group", "event"])
    assert row.loc[("fast", "generalization"), ["median", "min", "max", "reached", "runs"]].tolist() == [
        500, 400, 800, 3, 3]
    assert row.loc[("fast", "memorization"), "median"] == 100
    # a run that never generalised counts as later than any step: the median of (1000, 3000, never) is 3000
    assert row.loc[("slow", "generalization"), ["median", "min", "max", "reached"]].tolist() == [3000, 1000, 3000, 2]
    assert pd.isna(row.loc[("stuck", "memorization"), "median"])  # half never memorised: no median
    assert row.loc[("stuck", "generalization"), "reached"] == 0 and row.loc[("stuck", "generalization"), "runs"] == 2
    assert row.loc[("stuck", "memorization"), "reached"] == 1
    assert row.loc[("fast", "onset"), "reached"] == 0  # the main events always have a row


@pytest.fixture(scope="module")
def grouped_runs(mlflow_server):
    """Two seeds of one tiny configuration, one run of another lr, and a run from before the tag existed."""
    from grokking_tracked.tracking import ensure_experiment, run_experiment

    tiny = preset("default", p=23, train_frac=0.5, max_steps=120, eval_every=10, checkpoint_every=0)
    runs = [run_experiment(config, tracking_uri=mlflow_server, experiment="groups", progress=False).run_id
            for config in (tiny, tiny.replace(seed=7, data_seed=8), tiny.replace(lr=3e-3))]
    client = MlflowClient(mlflow_server)
    old = client.create_run(ensure_experiment(client, "groups")).info.run_id
    client.log_dict(old, tiny.replace(seed=3).to_dict(), "config.json")
    for step, acc in ((10, 0.1), (20, 0.3)):
        client.log_metric(old, "test_acc", acc, step=step)
    client.set_terminated(old)
    return tiny, runs, old


def test_every_training_run_is_tagged_with_its_config_group(mlflow_server, grouped_runs):
    tiny, runs, _ = grouped_runs
    tags = [MlflowClient(mlflow_server).get_run(run_id).data.tags[CONFIG_GROUP_TAG] for run_id in runs]
    assert tags == [config_group(tiny)] * 2 + [config_group(tiny.replace(lr=3e-3))]


def test_compare_group_by_draws_and_tabulates_each_group(mlflow_server, grouped_runs, tmp_path):
    tiny, runs, old = grouped_runs
    result = run_cli("compare", "--experiment", "groups", "--output", "groups.png", "--group-by",
                     "--log-to", runs[0], "--tracking-uri", mlflow_server, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "groups.png").read_bytes().startswith(b"\x89PNG")
    client = MlflowClient(mlflow_server)
    assert {a.path for a in client.list_artifacts(runs[0], "comparisons")} == {
        "comparisons/groups.png", "comparisons/groups.csv"}
    reached = {}  # what events.json says, per group
    for run_id in runs:
        group = client.get_run(run_id).data.tags[CONFIG_GROUP_TAG]
        events = json.load(open(client.download_artifacts(run_id, "events.json", str(tmp_path))))
        reached.setdefault(group, []).append({e["event"] for e in events})
    reached[config_group(tiny)].append(set())  # the old run: no events.json, grouped by its config.json
    rows = {(row["group"], row["event"]): row for row in csv.DictReader(open(tmp_path / "groups.csv"))}
    for group, per_run in reached.items():
        for event in ("memorization", "onset", "generalization"):
            row = rows[(group, event)]
            assert (int(row["reached"]), int(row["runs"])) == (sum(event in r for r in per_run), len(per_run))
    assert {group for group, _ in rows} == set(reached)
    assert config_group(tiny) in result.stdout


def test_compare_by_a_key_no_run_has_is_one_line(mlflow_server, grouped_runs, tmp_path):
    _, runs, _ = grouped_runs
    result = run_cli("compare", *runs, "--group-by", "params.no_such_param", "--tracking-uri", mlflow_server,
                     cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "grokking-tracked: error: no selected run has a tag or param 'params.no_such_param'"]
    unknown = run_cli("compare", "--experiment", "no-such-experiment", "--group-by", "--tracking-uri", mlflow_server,
                      cwd=tmp_path)
    assert unknown.returncode != 0 and unknown.stderr.strip().splitlines() == [
        f"grokking-tracked: error: no experiment named 'no-such-experiment' at {mlflow_server}"]
    nothing = run_cli("compare", "--group-by", cwd=tmp_path)
    assert nothing.returncode != 0 and nothing.stderr.strip().splitlines() == [
        "grokking-tracked: error: give run ids, or --experiment NAME"]
    assert not list(tmp_path.iterdir())  # nothing written
