"""The study's parent run: counts, the best trial, Optuna's figures and ours, the trials table."""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from .. import figures, learning_phases
from . import plots
from .dashboard import metric_names
from ..tracking.fetch import fetch_history
from ..tracking.runs import PRESET_TAG, ROLE_TAG, TrackedRun
from ..tracking.store import quote_filter_value
from .spec import StudySpec
from .storage import sweep_stale_trials
from .trial import RUN_ID_ATTR
from ..messages import short_error

BEST_TRIAL_TAG = "optuna.best_trial_number"
BEST_PARAMS_TAG = "optuna.best_params"
BEST_RUN_TAG = "optuna.best_run_id"
FIGURE_SKIPPED_TAG = "figure_skipped.{name}"


def finalize(study: optuna.Study, spec: StudySpec, parent: TrackedRun, grace: int, interval: int) -> dict:
    """Sweep stale trials, then log counts, the best trial, figures and the trials table on the parent run."""
    deadline = time.monotonic() + (grace + 2 * interval if interval else 0)
    while True:
        sweep_stale_trials(study)
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) or time.monotonic() >= deadline:
            break
        time.sleep(1)
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING,
                            TrialState.WAITING)}
    step = counts["complete"] + counts["pruned"]
    parent.log_values({f"n_{k}": v for k, v in counts.items()}, step)
    summary: dict[str, Any] = {"counts": counts, "parent_run_id": parent.run_id}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete and len(spec.directions) == 1:
        best = study.best_trial
        summary.update(best_value=best.value, best_params=best.params, best_trial=best.number)
        numeric = {f"best_{k}": v for k, v in best.params.items() if isinstance(v, (int, float))}
        parent.log_values({"best_value": best.value, "best_trial_number": best.number, **numeric}, step)
        tags = {BEST_TRIAL_TAG: str(best.number), BEST_PARAMS_TAG: str(best.params)}
        if best.user_attrs.get(RUN_ID_ATTR):
            tags[BEST_RUN_TAG] = best.user_attrs[RUN_ID_ATTR]
        parent.set_tags(tags)
    _log_figures(study, spec, parent, complete)
    _log_onset_quality(study, parent)
    try:
        parent.log_text(study.trials_dataframe().to_csv(index=False), "trials.csv")
    except Exception:  # noqa: BLE001 - the table is a convenience; the trials are in the storage
        pass
    return summary


def _log_onset_quality(study: optuna.Study, parent: TrackedRun) -> None:
    """How far the early warning (onset) can be trusted over this study's finished trials: lead time before
    generalisation, false alarms, misses -- a table and a figure on the parent run."""
    from ..analysis.detection import onset_quality, onset_quality_figure

    runs = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        events = trial.user_attrs.get("events")
        if events is not None:
            runs[f"trial {trial.number}"] = events
    if not runs:
        return
    quality = onset_quality(runs)
    parent.log_text(quality.to_frame().to_csv(index=False), "detection/onset_quality.csv")
    parent.log_dict(quality.summary, "detection/onset_quality.json")
    parent.log_figure(plots.redacted(onset_quality_figure(quality, f"study {study.study_name}: the onset warning "
                                                                  f"over {len(runs)} trials")),
                      "detection/onset_quality.png")
    parent.log_values({f"onset_{key}": value for key, value in quality.summary.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool)}, len(runs))


def _log_figures(study: optuna.Study, spec: StudySpec, parent: TrackedRun, complete: list) -> None:
    from optuna.visualization import matplotlib as ovm

    def log(name: str, make, from_optuna: bool = True) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with figures.style():
                    result = make()
        except Exception as exc:  # noqa: BLE001 - e.g. importances need >= 2 completed trials with varying params
            parent.set_tags({FIGURE_SKIPPED_TAG.format(name=name):
                             short_error(exc, 250)})
            return
        figure = plots.optuna_figure(result) if from_optuna else result
        try:  # drawn lazily: e.g. a log axis with no positive data fails only when saved
            if from_optuna:  # optuna draws through pyplot in its own style: ours, readable; released from pyplot after
                import matplotlib.pyplot as plt

                parent.log_figure(plots.redacted(plots.tidy(figure)), f"figures/{name}.png")
                plt.close(figure)
            else:
                parent.log_figure(plots.redacted(figure), f"figures/{name}.png")
        except ValueError as exc:
            parent.set_tags({FIGURE_SKIPPED_TAG.format(name=name): short_error(exc, 250)})

    multi = len(spec.directions) > 1
    names = [p.name for p in spec.params]
    target = metric_names(spec)[0].replace("_", " ")
    if not complete:
        parent.set_tags({FIGURE_SKIPPED_TAG.format(name="all"): "no completed trial yet"})
        return
    if multi:
        log("pareto_front", lambda: ovm.plot_pareto_front(study, target_names=[n.replace("_", " ")
                                                                              for n in metric_names(spec)]))
    else:
        log("optimization_history", lambda: ovm.plot_optimization_history(study, target_name=target))
        if len(complete) >= 2:
            log("param_importances", lambda: ovm.plot_param_importances(study))
        else:
            parent.set_tags({FIGURE_SKIPPED_TAG.format(name="param_importances"): "needs >= 2 completed trials"})
        log("slice", lambda: ovm.plot_slice(study, target_name=target))
        if len(names) >= 2 and len(complete) >= 2:
            log("contour", lambda: ovm.plot_contour(study, params=names[:3], target_name=target))
        if spec.pruner != "none":
            log("intermediate_values", lambda: plots.relabel(ovm.plot_intermediate_values(study),
                                                             f"{spec.prune_metric} (reported to the pruner)"))
    if "train_frac" in names:
        log("steps_vs_train_frac", lambda: train_frac_figure(study), from_optuna=False)
    if {"lr", "weight_decay"} <= set(names):
        table = phase_table(study)
        parent.log_text(table.to_csv(index=False), "phase_diagram.csv")
        log("phase_diagram", lambda: phase_diagram_figure(table, study.study_name, phase_rule(spec)), from_optuna=False)
    if spec.seeds > 1:
        _log_seed_groups(study, spec, parent)
    if not multi:
        log("best_vs_baseline", lambda: best_vs_baseline_figure(study, spec, parent), from_optuna=False)


def phase_rule(spec: StudySpec) -> str:
    from .trial import comprehension_delay

    base = spec.base_config()
    return learning_phases.rule(comprehension_delay(spec, base), base.max_steps)


def phase_table(study: optuna.Study):
    """One row per COMPLETE trial: lr, weight decay, its learning phase and its events' steps. A seeded trial
    (``[study] seeds``) adds each seed's phase and delay ("/"-joined, in seed order); its phase is the commonest of
    its seeds' and its delay the median of the generalising seeds' delays."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "lr" not in t.params or "weight_decay" not in t.params:
            continue
        attrs = t.user_attrs
        seed_phases, seed_delays = attrs.get("seed_phases"), attrs.get("seed_grokking_delays")
        delay = attrs.get("grokking_delay")
        if seed_delays is not None:
            generalised = [d for d in seed_delays if d is not None]
            delay = statistics.median(generalised) if generalised else None
        rows.append({"trial": t.number, "lr": t.params["lr"], "weight_decay": t.params["weight_decay"],
                     "phase": attrs.get("phase"), "grokking_delay": delay,
                     "memorization_step": attrs.get("memorization_step"),
                     "generalization_step": attrs.get("generalization_step"), "final_step": attrs.get("final_step"),
                     "seed_phases": "/".join(seed_phases) if seed_phases else None,
                     "seed_grokking_delays": ("/".join("-" if d is None else str(d) for d in seed_delays)
                                              if seed_delays is not None else None)})
    columns = ["trial", "lr", "weight_decay", "phase", "grokking_delay", "memorization_step", "generalization_step",
               "final_step", "seed_phases", "seed_grokking_delays"]
    return pd.DataFrame(rows, columns=columns).sort_values(["lr", "weight_decay"]).reset_index(drop=True)


def _compact(steps) -> str:
    return f"{steps / 1000:.1f}k" if steps >= 1000 else f"{int(steps)}"


@figures.styled
def phase_diagram_figure(table, study_name: str, rule: str = ""):
    """Liu et al. 2022's phase diagram: each trial a square at (weight decay, learning rate), coloured by its
    learning phase; a generalising trial's square carries its delay (generalization - memorization, steps)."""
    fig, ((ax,),) = figures.new_figure(1, 1, figsize=(8, 6.4))
    seeds = [phases.split("/") for phases in table["seed_phases"].dropna()]
    if len(table) and len(seeds) == len(table) and all(len(phases) == 2 for phases in seeds):
        _two_seed_squares(ax, table, seeds)
    else:
        for phase in learning_phases.PHASES:
            group = table[table["phase"] == phase]
            ax.scatter(group["weight_decay"], group["lr"], marker="s", s=420, color=learning_phases.PHASE_COLORS[phase],
                       edgecolors="#444444", linewidths=0.5, label=f"{phase} ({len(group)})")
    for row in table.itertuples():
        if row.grokking_delay is not None and row.grokking_delay == row.grokking_delay:  # not None, not NaN
            ax.annotate(_compact(row.grokking_delay), (row.weight_decay, row.lr), ha="center", va="center",
                        fontsize=6.5, color="black")
    numbers = ("median steps from memorisation to generalisation over the seeds that generalised" if seeds
               else "steps from memorisation to generalisation")
    ax.set(xscale="log", yscale="log", xlabel="weight decay (log scale)", ylabel="learning rate (log scale)",
           title=f"study {study_name}: learning phases (squares: trials)\nnumbers: {numbers}")
    ax.title.set_fontsize(9)
    ax.margins(0.08)
    if ax.get_legend() is None:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="phase")
    if rule:
        fig.supxlabel(rule, fontsize=6.5, wrap=True)
    return fig


def _two_seed_squares(ax, table, seeds) -> None:
    """Two seeds per grid point: the square's left half is the first seed's phase, its right half the second's, so
    a point where the seeds disagree shows it (matplotlib's split marker fill, ``fillstyle="left"``)."""
    from matplotlib.lines import Line2D

    colors = learning_phases.PHASE_COLORS
    for (wd, lr), (first, second) in zip(zip(table["weight_decay"], table["lr"]), seeds):
        ax.plot([wd], [lr], marker="s", markersize=20, linestyle="none", fillstyle="left", markerfacecolor=colors[first],
                markerfacecoloralt=colors[second], markeredgecolor="#444444", markeredgewidth=0.5)
    counts = {phase: sum(s.count(phase) for s in seeds) for phase in learning_phases.PHASES}
    ax.legend(handles=[Line2D([], [], marker="s", linestyle="none", markersize=9, color=colors[phase],
                              markeredgecolor="#444444", label=f"{phase} ({counts[phase]} seed runs)")
                       for phase in learning_phases.PHASES],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="phase (left: seed 1, right: seed 2)",
              title_fontsize=8)


def _log_seed_groups(study: optuna.Study, spec: StudySpec, parent: TrackedRun) -> None:
    """A seeds study's parent run: each COMPLETE trial's seed runs as one group (median and band of their curves),
    and the event steps per group (``figures.grouped_curves``, ``figures.event_step_table``, as `compare --group-by`)."""
    from .trial import TRIAL_NUMBER_TAG, TRIAL_SEED_ROLE

    client = parent.client
    histories, events = {}, {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if not run_id:
            continue
        seeds = client.search_runs([parent.experiment_id or client.get_run(run_id).info.experiment_id],
                                   f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`{ROLE_TAG}` = '{TRIAL_SEED_ROLE}'"
                                   f" and tags.`{TRIAL_NUMBER_TAG}` = '{trial.number}'")
        name = f"trial {trial.number}"
        histories[name] = [fetch_history(client, r.info.run_id) for r in seeds]
        events[name] = trial.user_attrs.get("seed_events", [])
    if not histories:
        return
    parent.log_figure(plots.redacted(figures.grouped_curves(histories, metrics=("test_acc", "train_acc"), band="iqr")),
                      "figures/seed_groups.png")
    parent.log_text(figures.event_step_table(events).to_csv(index=False), "seed_groups_events.csv")


@figures.styled
def train_frac_figure(study: optuna.Study):
    """Steps to generalize vs train fraction (Power et al. 2022: steep growth as the fraction falls). Each trial
    is a point coloured by its learning rate: trials differ in more than the fraction, so no line joins them."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "train_frac" in t.params]
    fig, ((ax,),) = figures.new_figure(1, 1, figsize=(7.5, 4.8))
    budget = max((t.user_attrs.get("final_step") or 0 for t in done), default=0)
    rates = [t.params.get("lr") for t in done if t.params.get("lr")]
    varies = len(set(rates)) > 1
    points = None
    for generalized, marker, label in ((True, "o", "generalized (test acc ≥ threshold)"),
                                       (False, "^", f"not within the budget (drawn at {budget:,} steps)")):
        group = [t for t in done if bool(t.user_attrs.get("generalized")) == generalized]
        if not group:
            continue
        steps = [t.user_attrs["generalization_step"] if generalized else budget for t in group]
        colour = dict(c=[t.params["lr"] for t in group], cmap="viridis", norm="log", vmin=min(rates),
                      vmax=max(rates)) if varies else dict(color=figures.SPLIT_COLORS["train" if generalized else "test"])
        points = ax.scatter([t.params["train_frac"] for t in group], steps, marker=marker, s=36,
                            edgecolors="#444444", linewidths=0.5, label=label, **colour)
    if varies and points is not None:
        bar = fig.colorbar(points, ax=ax, label="learning rate (colour)")
        figures.log_ticks(bar.ax.yaxis)
    ax.set_yscale("log")
    figures.log_ticks(ax.yaxis)
    ax.set(xlabel="training fraction", ylabel="steps to generalize",
           title=f"study {study.study_name}: steps to generalize vs training fraction")
    ax.legend(loc="best")
    return fig


def _baseline_run(client, spec: StudySpec):
    """The newest FINISHED plain run (not a study's) of the comparison preset on the study's own task."""
    base = spec.base_config()
    preset_name = spec.compare_preset or spec.preset
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    found = client.search_runs(experiments, f"tags.`{PRESET_TAG}` = {quote_filter_value(preset_name)} and "
                                            f"params.p = '{base.p}' and params.operation = '{base.operation}' and "
                                            "attributes.status = 'FINISHED'",
                               order_by=["attributes.start_time DESC"], max_results=20)
    return next((r for r in found if ROLE_TAG not in r.data.tags), None)


@figures.styled
def best_vs_baseline_figure(study: optuna.Study, spec: StudySpec, parent: TrackedRun):
    """The best trial's learning curves beside a plain run of the same task (the comparison preset), both read
    back from MLflow. Without such a run the figure says how to make one (training it here would cost minutes)."""
    client = parent.client
    best = study.best_trial
    curves = []
    # a seeded trial's curves are its seeds' runs: its first seed's
    best_run = (best.user_attrs.get("seed_run_ids") or [best.user_attrs.get(RUN_ID_ATTR)])[0]
    if best_run:
        curves.append((f"best trial {best.number}", fetch_history(client, best_run)))
    baseline = _baseline_run(client, spec)
    preset_name = spec.compare_preset or spec.preset
    if baseline is not None:
        curves.append((f"`{preset_name}` preset ({baseline.info.run_id[:8]})", fetch_history(client, baseline.info.run_id)))
    fig, ((ax_acc, ax_loss),) = figures.new_figure(1, 2, figsize=(12, 4.8))
    for color, (label, history) in zip(figures.colors(2), curves):
        history = [(s, m) for s, m in history if s > 0]  # log-scaled steps
        steps = [s for s, _ in history]
        for ax, key, linestyle in ((ax_acc, "test_acc", "-"), (ax_acc, "train_acc", ":"),
                                   (ax_loss, "test_loss", "-"), (ax_loss, "train_loss", ":")):
            ax.plot(steps, [m.get(key, float("nan")) for _, m in history], linestyle=linestyle, color=color,
                    label=f"{key.replace('_', ' ')}: {label}")
    ax_acc.set(ylabel="accuracy", xscale="log", xlabel="step (log scale)")
    ax_loss.set(ylabel="loss", yscale="log", xscale="log", xlabel="step (log scale)")
    for ax in (ax_acc, ax_loss):
        ax.legend()
    base = spec.base_config()
    if baseline is None:
        fig.supxlabel(f"no FINISHED `{preset_name}` run of {base.operation} mod {base.p} in this store "
                      f"(train one: grokking-tracked run --preset {preset_name} --p {base.p} --operation "
                      f"{base.operation}); only the best trial is shown", fontsize=8, color=figures.SPLIT_COLORS["test"])
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    fig.suptitle(f"study {study.study_name}: best trial {best.number} ({params}) vs `{preset_name}` preset",
                 fontsize=10)
    return fig
