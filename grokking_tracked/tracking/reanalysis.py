"""Analysis flows back: fetch a run's checkpoints from the tracking server, analyse, log into the same run.

Nothing is ever deleted. Each analysis goes to its own folder ``analysis/<n>/`` and only once all of it is
stored does the tag ``analysis.latest`` name it, so a failed upload leaves the previous analysis intact and a
server (or a misconfigured one) can never make us remove a path of its choosing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunTag

from .fetch import download_artifact, fetch_config, fetch_history, list_checkpoints
from .store import TrackingError, connect, get_run

ANALYSIS_DIR = "analysis"
LATEST_ANALYSIS_TAG = "analysis.latest"
SUMMARY_FILE = "summary.json"


def latest_analysis(client: MlflowClient, run) -> str | None:
    """Artifact path of the run's newest analysis summary, if it has one."""
    latest = run.data.tags.get(LATEST_ANALYSIS_TAG)
    if latest is not None and latest.isdigit():
        return f"{ANALYSIS_DIR}/{int(latest)}/{SUMMARY_FILE}"
    legacy = f"{ANALYSIS_DIR}/{SUMMARY_FILE}"  # written by versions before analyses were numbered
    if any(info.path == legacy for info in client.list_artifacts(run.info.run_id, ANALYSIS_DIR)):
        return legacy
    return None


def _next_analysis_number(client: MlflowClient, run) -> int:
    numbers = [int(info.path.rsplit("/", 1)[-1]) for info in client.list_artifacts(run.info.run_id, ANALYSIS_DIR)
               if info.is_dir and info.path.rsplit("/", 1)[-1].isdigit()]
    latest = run.data.tags.get(LATEST_ANALYSIS_TAG, "")
    return max([0, *numbers, int(latest) if latest.isdigit() else 0]) + 1


def analyze_run(run_id: str, tracking_uri: str | None = None, output: str | Path | None = None,
                progress: bool = True) -> dict:
    """Fetch a run's config, metric history and checkpoints from the tracking server, analyse every checkpoint,
    and log figures + ``summary.json`` into ``analysis/<n>/`` of the same run.

    Everything is computed before anything is logged, so a bad checkpoint leaves the run untouched."""
    from ..analysis import analyze_checkpoints

    client = connect(tracking_uri)
    run = get_run(client, run_id)
    with tempfile.TemporaryDirectory(prefix="grokking-analyze-") as scratch:
        scratch = Path(scratch)
        config = fetch_config(client, run_id, scratch)  # fails early and clearly on a run that is not ours
        checkpoints = list_checkpoints(client, run_id)
        if not checkpoints:
            raise TrackingError(f"run {run_id} has no checkpoints to analyse")
        local = [(step, download_artifact(client, run_id, path, scratch / "download")) for step, path in checkpoints]
        out_dir = scratch / ANALYSIS_DIR
        summary = analyze_checkpoints(local, out_dir, history=fetch_history(client, run_id), progress=progress,
                                      expected_config=config)
        number = _next_analysis_number(client, run)
        summary["analysis_path"] = f"{ANALYSIS_DIR}/{number}"
        client.log_artifacts(run_id, str(out_dir), f"{ANALYSIS_DIR}/{number}")
        fourier = summary["fourier"]
        client.log_batch(run_id, tags=[
            RunTag(LATEST_ANALYSIS_TAG, str(number)),
            RunTag("analysis.key_frequencies", json.dumps(fourier["key_frequencies"])),
            RunTag("analysis.restricted_loss_falls_before_test_loss",
                   str(summary["restricted_loss_falls_before_test_loss"]["answer"]).lower())])
        if output is not None:
            shutil.copytree(out_dir, Path(output), dirs_exist_ok=True)
    return summary


def compare_runs(run_ids: list[str], output: str | Path, tracking_uri: str | None = None,
                 log_to: str | None = None) -> Path:
    """Learning curves (and progress measures, where a run has been analysed) of several runs on shared axes."""
    from ..analysis import compare_figure

    client = connect(tracking_uri)
    if log_to:
        get_run(client, log_to)
    histories, progress = {}, {}
    with tempfile.TemporaryDirectory(prefix="grokking-compare-") as scratch:
        for run_id in run_ids:
            run = get_run(client, run_id)
            name = f"{run.info.run_name or run_id[:8]} ({run_id[:8]})"
            histories[name] = fetch_history(client, run_id)
            summary_path = latest_analysis(client, run)
            if summary_path is not None:
                path = download_artifact(client, run_id, summary_path, Path(scratch) / run_id)
                progress[name] = json.loads(path.read_text())
    figure = compare_figure(histories, Path(output), progress=progress or None,
                            title=f"{len(run_ids)} runs compared")
    if log_to:
        client.log_artifact(log_to, str(figure), "comparisons")
    return figure
