"""``analyze_checkpoints``: every analysis over every checkpoint, figures (PNG) and ``summary.json``.

One pass, checkpoint by checkpoint (tqdm), keeping only the previous checkpoint's weights and attention
grid: time is linear and memory constant in the number of checkpoints. Key frequencies are fixed first
from the last checkpoint (the trained circuit), so restricted/excluded losses of every checkpoint measure
the same directions (Nanda et al.; the live measures use each step's own keys, see ``measures.py``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from ..data import make_dataset
from ..detect import GrokDetector, detect_events, phase_events, step_of
from .. import figures as run_figures
from ..measure_registry import MeasureInput, compute_all, measures as registered_measures
from ..measures import PROGRESS_METRICS, ProgressMeasures
from .. import fourier
from . import algorithm, mechanics, plots
from ..checkpoints import CheckpointError, config_from_checkpoint, load_checkpoint, model_from_checkpoint

SUMMARY_VERSION = 2
DROP_RULE = ("drop step of a series = first step, at or after its maximum, where it is <= drop_fraction x that "
             "maximum; restricted loss falls before test loss iff its drop step (a checkpoint step) is strictly "
             "smaller than test loss's (from the history when given, else from the checkpoints)")
# Nanda et al. 2023, main run (p = 113, 30 % of pairs, full batch, AdamW lr 1e-3 wd 1): phase boundaries in steps.
PAPER_PHASES = {"memorization_end": 1400, "circuit_formation_end": 9400, "cleanup_end": 14000}

History = list[tuple[int, Mapping[str, float]]]


# ---------------------------------------------------------------------------------------------- helpers
def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def first_drop_step(series: Iterable[tuple[int, float]], drop_fraction: float = 0.5) -> int | None:
    """First step at or after the series' maximum where the value is <= drop_fraction x the maximum."""
    points = [(int(s), float(v)) for s, v in series if v is not None and math.isfinite(float(v))]
    if not points:
        return None
    peak_index = max(range(len(points)), key=lambda i: points[i][1])
    peak = points[peak_index][1]
    return next((s for s, v in points[peak_index:] if v <= drop_fraction * peak), None)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).to(torch.float64).mean()) if labels.numel() else float("nan")


# ---------------------------------------------------------------------------------------------- main
def analyze_checkpoints(checkpoints: list[tuple[int, Path]], out_dir: Path, history: History | None = None,
                        progress: bool = True, *, expected_config=None, events: list[dict] | None = None,
                        drop_fraction: float = 0.5, step_images: Path | None = None) -> dict:
    """Analyse ``[(step, path)]`` checkpoints of one run; write figures and ``summary.json`` into ``out_dir``.

    ``step_images``: a directory for two small PNGs per checkpoint (attention from "=" and the embedding's Fourier
    spectrum, ``<name>_step_NNNNNNN.png``), which the tracking side logs with MLflow's per-step images.
    ``history``: the run's ``[(step, metrics)]`` (``train_loss``/``test_loss``…) for the learning curves and
    the restricted-vs-test comparison. ``events``: the run's ``events.json`` (drawn on the figures; without
    them, events are detected from the history and the checkpoints' progress measures). ``expected_config``:
    the run's own config (``config.json``); every checkpoint must have its model shape. Raises
    ``CheckpointError`` (one-line message) for unusable input; nothing is written to ``out_dir`` before every
    checkpoint has been analysed.
    """
    started = time.perf_counter()
    if not checkpoints:
        raise CheckpointError("no checkpoints to analyse")
    checkpoints = sorted(((int(s), Path(p)) for s, p in checkpoints), key=lambda item: item[0])
    out_dir = Path(out_dir)

    last_state = load_checkpoint(checkpoints[-1][1])
    config = config_from_checkpoint(last_state)
    if expected_config is not None:
        model_from_checkpoint(last_state, expected_config)  # refuses another model shape before any work
    data = make_dataset(config)
    measures = ProgressMeasures(config.p, config.operation, data.train_tokens)
    final = measures.read(model_from_checkpoint(last_state, config))
    keys = final.key_frequencies
    grid_index = measures.grid.flat_index
    train_index = data.train_tokens[:, 0] * config.p + data.train_tokens[:, 1]
    test_index = data.test_tokens[:, 0] * config.p + data.test_tokens[:, 1]
    heatmap_at = sorted({0, len(checkpoints) // 2, len(checkpoints) - 1})
    selected = registered_measures()  # the measure registry (measure_registry.py): Zhong et al.'s, and any added

    records: list[dict] = []
    heatmaps: dict[int, torch.Tensor] = {}
    previous_grid, previous_weights = None, None
    bar = tqdm(checkpoints, desc="analysing checkpoints", unit="ckpt", disable=not progress, dynamic_ncols=True)
    for i, (step, path) in enumerate(bar):
        bar.set_postfix(step=step, refresh=False)
        state = last_state if i == len(checkpoints) - 1 else load_checkpoint(path)
        model = model_from_checkpoint(state, config)
        logits, cache = mechanics.forward_with_cache(model, config.p)
        last = logits[:, -1]  # (p·p, p), row a·p + b
        reading = measures.read(model, keys=keys, logits=last[grid_index])
        extra = compute_all(selected, MeasureInput(model, config, last, cache, measures.grid, keys, step,
                                                   train_rows=train_index))
        grid = mechanics.attention_from_equals(cache, config.p)
        if i in heatmap_at:
            heatmaps[step] = grid
        if step_images is not None:  # per-step snapshots for the MLflow UI's step slider
            run_figures.save_figure(run_figures.attention_at_step_figure(grid[:, 0].numpy(), title=f"step {step:,}"),
                                    Path(step_images) / f"attention_step_{step:07d}.png")
            run_figures.save_figure(run_figures.spectrum_at_step_figure(reading.embedding_freq_norms, keys, step),
                                    Path(step_images) / f"fourier_spectrum_step_{step:07d}.png")
        attention = mechanics.attention_summary(grid, previous_grid)
        activations = mechanics.activation_stats(cache)
        del cache, logits
        gradients = mechanics.gradient_flow(model, data.train_tokens, data.train_labels)
        weights, previous_weights = mechanics.weight_evolution(model, previous_weights)
        previous_grid = grid
        records.append({
            "step": step,
            "train_loss": float(fourier.cross_entropy(last[train_index], data.train_labels)),
            "test_loss": float(fourier.cross_entropy(last[test_index], data.test_labels)),
            "train_acc": _accuracy(last[train_index], data.train_labels),
            "test_acc": _accuracy(last[test_index], data.test_labels),
            **reading.metrics,  # restricted/excluded loss with the final keys; n_key_frequencies of this step
            "key_frequencies": reading.key_frequencies,
            **extra,
            "weight_relative_change": weights["relative_change"],
            "weights": weights,
            "attention": attention,
            "activations": activations,
            "gradients": gradients,
            "embedding_freq_norms": reading.embedding_freq_norms,
        })
    bar.close()

    comparison = _restricted_vs_test(records, history, drop_fraction)
    found_events, events_source = _events(records, history, events, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = [plots.save(fig, out_dir / name) for name, fig in (
        ("progress_measures.png", plots.progress_figure(records, history, keys, found_events)),
        ("fourier_spectrum.png", plots.spectrum_over_checkpoints_figure(records, final, keys)),
        ("attention_patterns.png", plots.attention_over_checkpoints_figure(heatmaps)),
        ("attention_change.png", plots.attention_change_figure(records)),
        ("activation_stats.png", plots.activations_figure(records)),
        ("gradient_flow.png", plots.gradients_figure(records)),
        ("weight_evolution.png", plots.weights_figure(records)),
        *((m.figure_file, (m.figure or plots.measure_figure)(records, m)) for m in selected),
    )]
    key_energy = fourier.key_frequencies(torch.tensor(final.embedding_freq_norms))[1]
    summary = {
        "schema_version": SUMMARY_VERSION,
        "p": config.p,
        "operation": config.operation,
        "config": config.to_dict(),
        "n_checkpoints": len(records),
        "measures": {m.name: list(m.metrics) for m in selected},  # reanalysis logs these as analysis/<metric>
        "steps": [r["step"] for r in records],
        "fourier": {
            "basis": measures.grid.view.basis,
            "group_size": measures.grid.view.n,
            "generator": measures.grid.view.generator,
            "meaningful": measures.grid.view.meaningful,
            "note": measures.grid.view.note,
            "key_frequencies": keys,
            "key_frequency_energy_fraction": key_energy,
            "sparse": bool(keys),
            "key_frequency_rule": fourier.KEY_RULE,
            "neuron_logit_key_frequencies": final.neuron_logit_key_frequencies,
            "key_agreement": fourier.key_agreement(keys, final.neuron_logit_key_frequencies),
            "final_embedding_freq_norms": final.embedding_freq_norms,
            "final_neuron_logit_freq_norms": final.neuron_logit_freq_norms,
        },
        "restricted_loss_falls_before_test_loss": comparison,
        "algorithm": _algorithm(records[-1], measures.grid.view),
        "phases": _phases(found_events, events_source),
        "final": {k: records[-1][k] for k in ("step", "train_loss", "test_loss", "train_acc", "test_acc",
                                              "restricted_loss", "excluded_loss", "gini_embedding",
                                              "gini_neuron_logit", "total_weight_norm")},
        "checkpoints": records,
        "figures": figures,
        "seconds": time.perf_counter() - started,
        "seconds_per_checkpoint": (time.perf_counter() - started) / len(records),
    }
    summary = _clean(summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    return summary


def _algorithm(final: dict, view: fourier.GroupView) -> dict:
    """Zhong et al.'s class of the final checkpoint, its measures and the rule that decided."""
    answer = "undetermined"
    if view.meaningful:
        answer = algorithm.classify_algorithm(final["gradient_symmetricity"], final["distance_irrelevance"],
                                              test_accuracy=final["test_acc"])
    return {"class": answer, "step": final["step"],
            **{k: final[k] for k in algorithm.ALGORITHM.metrics}, "key_fit_loss": final["key_fit_loss"],
            "rule": algorithm.RULE, "gradient_triples": algorithm.GRADIENT_TRIPLES, "basis": view.basis}


def _restricted_vs_test(records: list[dict], history: History | None, drop_fraction: float) -> dict:
    restricted = [(r["step"], r["restricted_loss"]) for r in records]
    source, test = "checkpoints", [(r["step"], r["test_loss"]) for r in records]
    if history:
        from_history = [(s, m["test_loss"]) for s, m in history if m.get("test_loss") is not None]
        if from_history:
            source, test = "history", from_history
    r_step, t_step = first_drop_step(restricted, drop_fraction), first_drop_step(test, drop_fraction)
    answer = None if r_step is None or t_step is None else r_step < t_step
    return {"answer": answer, "restricted_loss_drop_step": r_step, "test_loss_drop_step": t_step,
            "test_loss_source": source, "drop_fraction": drop_fraction, "rule": DROP_RULE}


def _events(records: list[dict], history: History | None, events: list[dict] | None,
            config) -> tuple[list[dict], str]:
    """The run's events as logged, else detected now: on the history merged with the checkpoints' measures."""
    if events is not None:
        return list(events), "events.json"
    timeline = {int(s): dict(m) for s, m in (history or [])}
    measured = PROGRESS_METRICS
    logged_live = any("n_key_frequencies" in m for m in timeline.values())
    for record in records:  # what the history lacks at a checkpoint step, the checkpoint measured
        row = timeline.setdefault(record["step"], {})
        for key in ("train_loss", "train_acc", "test_loss", "test_acc") + (() if logged_live else measured):
            row.setdefault(key, record[key])
    source = "history" if logged_live else ("history+checkpoints" if history else "checkpoints")
    usable = [(s, m) for s, m in sorted(timeline.items()) if {"train_acc", "test_acc", "test_loss"} <= set(m)]
    return detect_events(usable, config), source


def _phases(events: list[dict], source: str) -> dict:
    """The phase boundaries found (the events registered with ``phase``), whether they come in the paper's order,
    and the paper's for comparison."""
    steps = {name: step_of(events, name) for name in phase_events()}
    m, c, k, g, e = (steps.get(name) for name in ("memorization", "circuit_formation", "cleanup", "generalization",
                                                    "cleanup_end"))
    in_order = None if None in (m, c, k, g, e) else m < c <= k <= e and c < g <= e
    return {"source": source, "rule": GrokDetector().rule, **steps,
            "order": "memorization < circuit_formation <= cleanup <= cleanup_end, circuit_formation < "
                     "generalization <= cleanup_end", "in_order": in_order, "paper": PAPER_PHASES}
