"""Analysis flows back: fetch a run's checkpoints from the tracking server, analyse, log into the same run.

Nothing is ever deleted. Each analysis goes to its own folder ``analysis/<n>/`` and only once all of it is
stored does the tag ``analysis.latest`` name it, so a failed upload leaves the previous analysis intact and a
server (or a misconfigured one) can never make us remove a path of its choosing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from mlflow.entities import Metric

from .fetch import RunArtifacts, fetch_history
from .provenance import command_line, versions
from .runs import TrackedRun
from .store import TrackingError, connect

ANALYSIS_DIR = "analysis"
LATEST_ANALYSIS_TAG = "analysis.latest"
SUMMARY_FILE = "summary.json"


def latest_analysis(artifacts: RunArtifacts) -> str | None:
    """Artifact path of the run's newest analysis summary, if it has one."""
    latest = artifacts.run.data.tags.get(LATEST_ANALYSIS_TAG)
    if latest is not None and latest.isdigit():
        return f"{ANALYSIS_DIR}/{int(latest)}/{SUMMARY_FILE}"
    legacy = f"{ANALYSIS_DIR}/{SUMMARY_FILE}"  # written by versions before analyses were numbered
    if any(info.path == legacy for info in artifacts.list(ANALYSIS_DIR)):
        return legacy
    return None


def _log_step_images(run: TrackedRun, directory: Path) -> None:
    """Per-checkpoint snapshots as MLflow images with a step (``images/`` in the run), so the UI's step slider
    shows how attention and the Fourier spectrum change over training."""
    from PIL import Image

    for path in sorted(directory.glob("*_step_*.png")):
        key, _, step = path.stem.rpartition("_step_")
        with Image.open(path) as image:
            run.log_image(image.convert("RGB"), key=key, step=int(step))


def _checkpoint_metrics(summary: dict) -> list[Metric]:
    """The registered measures' metrics (``summary["measures"]``, from ``measure_registry``) as ``analysis/<name>``
    metrics at each checkpoint's step (the run page groups them in an "analysis" section)."""
    names = [name for metrics in summary.get("measures", {}).values() for name in metrics]
    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    return [Metric(f"{ANALYSIS_DIR}/{name}", float(record[name]), now, int(record["step"]))
            for record in summary["checkpoints"] for name in names if record.get(name) is not None]


def _next_analysis_number(artifacts: RunArtifacts) -> int:
    numbers = [int(info.path.rsplit("/", 1)[-1]) for info in artifacts.list(ANALYSIS_DIR)
               if info.is_dir and info.path.rsplit("/", 1)[-1].isdigit()]
    latest = artifacts.run.data.tags.get(LATEST_ANALYSIS_TAG, "")
    return max([0, *numbers, int(latest) if latest.isdigit() else 0]) + 1


def analyze_run(run_id: str, tracking_uri: str | None = None, output: str | Path | None = None,
                progress: bool = True) -> dict:
    """Fetch a run's config, metric history and checkpoints from the tracking server, analyse every checkpoint,
    and log figures + ``summary.json`` into ``analysis/<n>/`` of the same run.

    Everything is computed before anything is logged, so a bad checkpoint leaves the run untouched."""
    from ..analysis import analyze_checkpoints

    client = connect(tracking_uri)
    artifacts = RunArtifacts(client, run_id)  # every transfer below goes through this checked repository
    with tempfile.TemporaryDirectory(prefix="grokking-analyze-") as scratch:
        scratch = Path(scratch)
        config = artifacts.config(scratch)  # fails early and clearly on a run that is not ours
        checkpoints = artifacts.checkpoints()
        if not checkpoints:
            raise TrackingError(f"run {run_id} has no checkpoints to analyse")
        local = [(step, artifacts.download(path, scratch / "download")) for step, path in checkpoints]
        out_dir = scratch / ANALYSIS_DIR
        events = artifacts.events(scratch)
        step_images = scratch / "steps"
        summary = analyze_checkpoints(local, out_dir, history=fetch_history(client, run_id), progress=progress,
                                      expected_config=config, events=events, step_images=step_images)
        number = _next_analysis_number(artifacts)
        summary["analysis_path"] = f"{ANALYSIS_DIR}/{number}"
        fourier = summary["fourier"]
        provenance = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command_line(),
                      "versions": versions(), "checkpoints": len(checkpoints)}
        with TrackedRun.append(artifacts.client, run_id) as run:  # the run's own checked, spooled write path
            run.log_directory(out_dir, f"{ANALYSIS_DIR}/{number}")
            _log_step_images(run, step_images)
            if not run.deliver():  # analysis.latest names an analysis only once all of it is stored
                raise TrackingError(f"the analysis of run {run_id} did not all reach the server; "
                                    f"{LATEST_ANALYSIS_TAG} still names the previous one")
            run.set_tags({
                f"analysis.{number}.provenance": json.dumps(provenance, sort_keys=True)[:5000],
                LATEST_ANALYSIS_TAG: str(number),
                "analysis.key_frequencies": json.dumps(fourier["key_frequencies"]),
                "analysis.restricted_loss_falls_before_test_loss":
                    str(summary["restricted_loss_falls_before_test_loss"]["answer"]).lower(),
                "analysis.phases": json.dumps({k: v for k, v in summary.get("phases", {}).items()
                                               if k not in ("rule", "order", "paper", "source")}),
                "analysis.algorithm": summary["algorithm"]["class"]})
            run.log_metrics(_checkpoint_metrics(summary))
        if output is not None:
            shutil.copytree(out_dir, Path(output), dirs_exist_ok=True)
    return summary


def compare_runs(run_ids: list[str], output: str | Path, tracking_uri: str | None = None,
                 log_to: str | None = None, experiment: str | None = None) -> Path:
    """Learning curves (and progress measures, where a run has been analysed) of several runs on shared axes
    (the given runs, then every training run of ``experiment``)."""
    from ..analysis import compare_figure

    client = connect(tracking_uri)
    destination = RunArtifacts(client, log_to) if log_to else None  # an unknown run fails before any work
    run_ids = select_runs(client, run_ids, experiment)
    histories, progress = {}, {}
    with tempfile.TemporaryDirectory(prefix="grokking-compare-") as scratch:
        for run_id in run_ids:
            artifacts = RunArtifacts(client, run_id)
            name = f"{artifacts.run.info.run_name or run_id[:8]} ({run_id[:8]})"
            histories[name] = fetch_history(client, run_id)
            summary_path = latest_analysis(artifacts)
            if summary_path is not None:
                path = artifacts.download(summary_path, Path(scratch) / run_id)
                progress[name] = json.loads(path.read_text())
    figure = compare_figure(histories, Path(output), progress=progress or None,
                            title=f"{len(run_ids)} runs compared")
    if destination is not None:
        with TrackedRun.append(destination.client, log_to) as run:
            run.log_file(figure, "comparisons")
    return figure


def select_runs(client, run_ids: list[str], experiment: str | None) -> list[str]:
    """The given runs, then every training run of ``experiment`` (not a study's parent run; not one still
    RUNNING, whose curves are partial), oldest first, without repeats."""
    from mlflow.entities import ViewType

    from .runs import ROLE_TAG

    selected = list(dict.fromkeys(run_ids))
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise TrackingError(f"no experiment named {experiment!r} at {client.tracking_uri}")
        runs, token = [], None
        while True:
            page = client.search_runs([found.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                      order_by=["attributes.start_time ASC"], page_token=token)
            runs += page
            token = page.token
            if not token:
                break
        selected += [run.info.run_id for run in runs if run.data.tags.get(ROLE_TAG) != "study"
                     and run.info.status != "RUNNING" and run.info.run_id not in selected]
    if not selected:
        raise TrackingError("no runs to compare: give run ids or an --experiment that has runs")
    return selected


def group_value(artifacts: RunArtifacts, key: str, scratch: Path) -> str | None:
    """The run's value of ``key``: a tag, else a param (``tags.NAME`` / ``params.NAME`` say which). A run from
    before the config-group tag existed gets it computed from its config.json."""
    from ..groups import CONFIG_GROUP_TAG, config_group

    data = artifacts.run.data
    kind, _, name = key.partition(".") if key.startswith(("tags.", "params.")) else ("", "", key)
    value = (data.tags.get(name) if kind != "params" else None) or (data.params.get(name) if kind != "tags" else None)
    if value is None and name == CONFIG_GROUP_TAG:
        value = config_group(artifacts.config(scratch))
    return value


def compare_groups(run_ids: list[str], output: str | Path, tracking_uri: str | None = None,
                   experiment: str | None = None, group_by: str | None = None, band: str = "iqr",
                   log_to: str | None = None, metrics=("test_acc", "test_loss")):
    """Runs grouped by a tag or param (default: the config-group tag, a configuration without its seeds): per group
    the median curve with its band, and the table of event steps. Writes ``output`` (PNG) and the table beside it
    (``.csv``); returns (figure path, table path, table)."""
    from ..figures import event_step_table, grouped_curves, save_figure
    from ..groups import CONFIG_GROUP_TAG

    key = group_by or CONFIG_GROUP_TAG
    client = connect(tracking_uri)
    destination = RunArtifacts(client, log_to) if log_to else None  # an unknown run fails before any work
    histories: dict[str, list] = {}
    events: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="grokking-compare-") as scratch:
        for run_id in select_runs(client, run_ids, experiment):
            artifacts = RunArtifacts(client, run_id)
            value = group_value(artifacts, key, Path(scratch) / run_id)
            group = f"{key} unset" if value is None else value
            histories.setdefault(group, []).append(fetch_history(client, run_id))
            events.setdefault(group, []).append(artifacts.events(Path(scratch) / run_id))
    if set(histories) == {f"{key} unset"}:
        raise TrackingError(f"no selected run has a tag or param {key!r}")
    figure_path = save_figure(grouped_curves(histories, metrics, band), output)
    table = event_step_table(events)
    table_path = Path(output).with_suffix(".csv")
    table.to_csv(table_path, index=False)
    if destination is not None:
        with TrackedRun.append(destination.client, log_to) as run:  # the run's own checked, spooled write path
            run.log_file(figure_path, "comparisons")
            run.log_file(table_path, "comparisons")
    return figure_path, table_path, table
