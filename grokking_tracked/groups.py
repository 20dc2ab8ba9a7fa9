"""Runs of one configuration that differ only by their seeds: the name of their group, and the numbers a grouped
comparison draws (median and band of a metric over the group's runs, the event steps per group).

Pure: the standard library and numpy. ``figures.grouped_curves`` / ``figures.event_step_table`` draw and tabulate
these; ``tracking.reanalysis.compare_groups`` fetches the runs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .config import Config
from .detect import main_events, step_of

CONFIG_GROUP_TAG = "grokking_tracked.config_group"
# A configuration's seeds: model initialisation and the train/test split. Runs differing only here are one group.
SEED_FIELDS = ("seed", "data_seed")
# Fields that say where a run trains and when it stops watching, not what it trains: the curves of two runs that
# differ only here agree wherever both were trained (a run resumed with a larger --max-steps stays in its group).
# eval_every stays in: it sets the steps at which events can be detected, so it changes the event table.
RUNTIME_FIELDS = ("device", "max_steps", "stop_on_grok", "stop_margin", "stop_after", "checkpoint_every",
                  "progress_every")
GROUP_EXCLUDED_FIELDS = SEED_FIELDS + RUNTIME_FIELDS
BANDS = {"iqr": (25.0, 75.0), "minmax": (0.0, 100.0)}  # percentiles of the band's edges
BAND_LABELS = {"iqr": "interquartile range", "minmax": "min-max"}


def config_group(config: Config) -> str:
    """``add59-f0.3-lr0.01-wd1-<8 hex>``: a readable prefix (task and the usual knobs) and a digest of every field
    except ``GROUP_EXCLUDED_FIELDS``, so two configs share the name iff they differ only in seeds and runtime.
    Only fields that differ from ``Config()``'s defaults enter the digest: a new field (at its default) leaves every
    existing group's name as it was, and a run logged before that field existed stays in its group."""
    defaults = Config().to_dict()
    values = {k: v for k, v in config.to_dict().items() if k not in GROUP_EXCLUDED_FIELDS and v != defaults[k]}
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]
    return (f"{config.operation}{config.p}-f{config.train_frac:g}-lr{config.lr:g}-wd{config.weight_decay:g}"
            f"-{digest}")


@dataclass(frozen=True)
class Aggregate:
    """A metric over a group's runs, step by step: the median, the band's edges and how many runs had a value."""

    steps: np.ndarray
    median: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: np.ndarray


def aligned(histories: Sequence[Sequence[tuple[int, Mapping]]], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values[run, step]) on the union of the runs' evaluation steps. A run's value at a step is its last
    evaluation at or before it: a run that stopped early (stop_on_grok stops after generalising) keeps its last
    value, so the median is not left to the slow runs; before a run's first evaluation it has none (NaN)."""
    series = []
    for history in histories:
        points = sorted((int(step), float(metrics[metric])) for step, metrics in history
                        if metrics.get(metric) is not None and math.isfinite(metrics[metric]))
        series.append((np.array([s for s, _ in points], dtype=np.int64), np.array([v for _, v in points])))
    steps = np.unique(np.concatenate([s for s, _ in series])) if series else np.array([], dtype=np.int64)
    values = np.full((len(series), len(steps)), np.nan)
    for row, (run_steps, run_values) in enumerate(series):
        if len(run_steps):
            index = np.searchsorted(run_steps, steps, side="right") - 1
            values[row, index >= 0] = run_values[index[index >= 0]]
    return steps, values


def aggregate(histories: Sequence[Sequence[tuple[int, Mapping]]], metric: str, band: str = "iqr") -> Aggregate:
    """The group's median of ``metric`` and its band (``iqr``: 25th-75th percentile, ``minmax``), per step."""
    if band not in BANDS:
        raise ValueError(f"unknown band {band!r}; choose one of {', '.join(BANDS)}")
    steps, values = aligned(histories, metric)
    present = ~np.isnan(values)
    keep = present.any(axis=0)
    steps, values = steps[keep], values[:, keep]
    if not len(steps):
        empty = np.array([])
        return Aggregate(steps, empty, empty, empty, np.array([], dtype=int))
    low, median, high = np.nanpercentile(values, [BANDS[band][0], 50.0, BANDS[band][1]], axis=0)
    return Aggregate(steps, median, low, high, (~np.isnan(values)).sum(axis=0))


def event_steps(events: Sequence[Mapping] | None) -> dict[str, int]:
    """Each event's (first) step in one run's events list (``events.json``); None (no list) reached nothing."""
    names = dict.fromkeys(e.get("event") for e in events or () if isinstance(e, Mapping))
    steps = {name: step_of(events, name) for name in names if isinstance(name, str)}
    return {name: step for name, step in steps.items() if step is not None}


def event_step_rows(groups: Mapping[str, Sequence[Sequence[Mapping] | None]]) -> list[dict]:
    """Per group and event: the median step over all the group's runs, a run that never reached the event counting
    as later than any step (so the median is None when half or more never did); the min and max over the runs that
    reached it; how many did (``reached``) of how many (``runs``). The main events always have a row; other events
    appear where some run of any group reached them (main events: ``detect.main_events()``)."""
    per_run = {name: [event_steps(events) for events in runs] for name, runs in groups.items()}
    main = main_events()
    others = sorted({event for runs in per_run.values() for steps in runs for event in steps} - set(main))
    rows = []
    for name, runs in per_run.items():
        for event in (*main, *others):
            reached = [steps[event] for steps in runs if event in steps]
            median = float(np.median(reached + [math.inf] * (len(runs) - len(reached)))) if runs else math.inf
            rows.append({"group": name, "event": event, "median": median if math.isfinite(median) else None,
                         "min": min(reached) if reached else None, "max": max(reached) if reached else None,
                         "reached": len(reached), "runs": len(runs)})
    return rows
