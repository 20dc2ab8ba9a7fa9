"""How far the early warning can be trusted: the ``onset`` event over many runs.

``onset_quality({run: events})`` classifies each run by whether ``onset`` and ``generalization`` fired:

- hit: both; the lead time is generalization step − onset step (onset fires before generalisation, or at the
  same evaluation at the latest), and its share of the grokking delay (generalization − memorization);
- false alarm: onset without generalization (within the run's budget: a run stopped early counts here too);
- miss: generalization without onset;
- quiet: neither.

Pure Python plus a Figure; events are the dicts of ``events.json`` (``{"event", "step", …}``).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..detect import step_of
from ..figures import colors, new_figure, styled

OUTCOMES = ("hit", "false_alarm", "miss", "quiet")


@dataclass
class OnsetQuality:
    rows: list[dict]  # one per run: run, memorization, onset, generalization, lead, lead_fraction, outcome
    summary: dict  # counts per outcome, precision, recall, lead statistics

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["run", "outcome", "memorization", "onset", "generalization", "lead",
                                                "lead_fraction"])


def onset_quality(runs: Mapping[str, Sequence[Mapping]]) -> OnsetQuality:
    rows = []
    for run, events in runs.items():
        memorized, onset, general = (step_of(events, n) for n in ("memorization", "onset", "generalization"))
        lead = general - onset if onset is not None and general is not None else None
        delay = general - memorized if general is not None and memorized is not None else None
        outcome = ("hit" if onset is not None and general is not None else "false_alarm" if onset is not None
                   else "miss" if general is not None else "quiet")
        rows.append({"run": run, "outcome": outcome, "memorization": memorized, "onset": onset,
                     "generalization": general, "lead": lead,
                     "lead_fraction": lead / delay if lead is not None and delay else None})
    counts = {outcome: sum(r["outcome"] == outcome for r in rows) for outcome in OUTCOMES}
    leads = [r["lead"] for r in rows if r["lead"] is not None]
    fractions = [r["lead_fraction"] for r in rows if r["lead_fraction"] is not None]
    alarms, grokked = counts["hit"] + counts["false_alarm"], counts["hit"] + counts["miss"]
    summary = {
        "n_runs": len(rows), **counts,
        "precision": counts["hit"] / alarms if alarms else None,  # an onset was followed by generalisation
        "recall": counts["hit"] / grokked if grokked else None,  # a generalising run was warned of
        "lead_median": statistics.median(leads) if leads else None,
        "lead_min": min(leads) if leads else None, "lead_max": max(leads) if leads else None,
        "lead_fraction_median": statistics.median(fractions) if fractions else None,
    }
    return OnsetQuality(rows, summary)


@styled
def onset_quality_figure(quality: OnsetQuality, title: str = "Early warning (onset) over runs"):
    """Left: per run, memorization → onset → generalization on a step axis (hits and misses); right: counts."""
    rows = sorted(quality.rows, key=lambda r: (OUTCOMES.index(r["outcome"]), r["generalization"] or r["onset"] or 0,
                                               r["onset"] or 0))
    fig, ((ax_runs, ax_counts),) = new_figure(1, 2, figsize=(12, max(3.5, 0.28 * len(rows) + 1.5)),
                                              width_ratios=[3, 1])
    palette = dict(zip(OUTCOMES, colors(len(OUTCOMES))))
    for y, row in enumerate(rows):
        start = row["memorization"] if row["memorization"] is not None else 0
        end = max(s for s in (row["onset"], row["generalization"], start) if s is not None)
        ax_runs.plot([start, end], [y, y], color=palette[row["outcome"]], linewidth=2, alpha=0.6)
        if row["memorization"] is not None:
            ax_runs.plot(start, y, marker="|", color=palette[row["outcome"]], markersize=9)
        if row["onset"] is not None:
            ax_runs.plot(row["onset"], y, marker="v", color=palette[row["outcome"]], markersize=7)
        if row["generalization"] is not None:
            ax_runs.plot(row["generalization"], y, marker="o", color=palette[row["outcome"]], markersize=6)
    ax_runs.set_yticks(range(len(rows)), [str(r["run"]) for r in rows], fontsize=7 if len(rows) > 25 else 8)
    ax_runs.set(xlabel="optimizer step", title="memorization (|) — onset (▼) — generalization (●)")
    ax_runs.invert_yaxis()  # hits first, from the top
    ax_runs.grid(axis="y", visible=False)
    counts = [quality.summary[o] for o in OUTCOMES]
    bars = ax_counts.bar([o.replace("_", " ") for o in OUTCOMES], counts, color=[palette[o] for o in OUTCOMES])
    ax_counts.bar_label(bars)
    ax_counts.set(ylabel="runs", title="outcomes")
    ax_counts.yaxis.get_major_locator().set_params(integer=True)
    ax_counts.tick_params(axis="x", rotation=30)
    lead = quality.summary["lead_median"]
    fig.suptitle(title + (f" — median lead {lead:,.0f} steps" if lead is not None else ""))
    return fig
