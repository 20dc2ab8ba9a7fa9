"""``analyze_checkpoints``: every analysis over every checkpoint, figures (PNG) and ``summary.json``.

One pass, checkpoint by checkpoint (tqdm), keeping only the previous checkpoint's weights and attention
grid: time is linear and memory constant in the number of checkpoints. Key frequencies are fixed first
from the last checkpoint (the trained circuit), so restricted/excluded losses of every checkpoint measure
the same directions.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ..data import make_dataset  # noqa: E402
from . import fourier, mechanics  # noqa: E402
from .checkpoints import CheckpointError, config_from_checkpoint, load_checkpoint, model_from_checkpoint  # noqa: E402

SUMMARY_VERSION = 1
DROP_RULE = ("drop step of a series = first step, at or after its maximum, where it is <= drop_fraction x that "
             "maximum; restricted loss falls before test loss iff its drop step (a checkpoint step) is strictly "
             "smaller than test loss's (from the history when given, else from the checkpoints)")
KEY_RULE = ("frequencies of the embedding W_E (last checkpoint) sorted by energy (norm^2); the smallest set "
            "explaining >= {fraction:.0%} of the non-constant energy; 'sparse' is false when that needs more than "
            "{max_keys} frequencies (then the top {max_keys} are listed)")

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


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# ---------------------------------------------------------------------------------------------- main
def analyze_checkpoints(checkpoints: list[tuple[int, Path]], out_dir: Path, history: History | None = None,
                        progress: bool = True, *, expected_config=None, key_energy_fraction: float = 0.8,
                        max_key_frequencies: int = 10, drop_fraction: float = 0.5) -> dict:
    """Analyse ``[(step, path)]`` checkpoints of one run; write figures and ``summary.json`` into ``out_dir``.

    ``history``: the run's ``[(step, metrics)]`` (``train_loss``/``test_loss``…) for the learning curves and
    the restricted-vs-test comparison. ``expected_config``: the run's own config (``config.json``); every
    checkpoint must have its model shape. Raises ``CheckpointError`` (one-line message) for unusable input;
    nothing is written to ``out_dir`` before every checkpoint has been analysed.
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
    view = fourier.GroupView.for_task(config.p, config.operation)
    final_spectrum = fourier.spectrum_measures(model_from_checkpoint(last_state, config), view)
    keys, key_energy, sparse = fourier.key_frequencies(torch.tensor(final_spectrum.embedding_freq_norms),
                                                       key_energy_fraction, max_key_frequencies)

    data = make_dataset(config)
    grid_labels, grid_train, grid_index = fourier.grid_tensors(config, view, data.train_tokens)
    train_index = data.train_tokens[:, 0] * config.p + data.train_tokens[:, 1]
    test_index = data.test_tokens[:, 0] * config.p + data.test_tokens[:, 1]
    heatmap_at = sorted({0, len(checkpoints) // 2, len(checkpoints) - 1})

    records: list[dict] = []
    heatmaps: dict[int, torch.Tensor] = {}
    embedding_spectra: list[list[float]] = []
    previous_grid, previous_weights = None, None
    bar = tqdm(checkpoints, desc="analysing checkpoints", unit="ckpt", disable=not progress, dynamic_ncols=True)
    for i, (step, path) in enumerate(bar):
        bar.set_postfix(step=step, refresh=False)
        state = last_state if i == len(checkpoints) - 1 else load_checkpoint(path)
        model = model_from_checkpoint(state, config)
        logits, cache = mechanics.forward_with_cache(model, config.p)
        last = logits[:, -1]  # (p·p, p), row a·p + b
        restricted, excluded = fourier.restricted_and_excluded_loss(
            last[grid_index], grid_labels, grid_train, keys, view.sign)
        spectrum = fourier.spectrum_measures(model, view)
        grid = mechanics.attention_from_equals(cache, config.p)
        if i in heatmap_at:
            heatmaps[step] = grid
        attention = mechanics.attention_summary(grid, previous_grid)
        activations = mechanics.activation_stats(cache)
        del cache, logits
        gradients = mechanics.gradient_flow(model, data.train_tokens, data.train_labels)
        weights, previous_weights = mechanics.weight_evolution(model, previous_weights)
        previous_grid = grid
        embedding_spectra.append(spectrum.embedding_freq_norms)
        records.append({
            "step": step,
            "train_loss": fourier._loss(last[train_index], data.train_labels),
            "test_loss": fourier._loss(last[test_index], data.test_labels),
            "train_acc": _accuracy(last[train_index], data.train_labels),
            "test_acc": _accuracy(last[test_index], data.test_labels),
            "restricted_loss": restricted,
            "excluded_loss": excluded,
            "gini_embedding": spectrum.gini_embedding,
            "gini_neuron_logit": spectrum.gini_neuron_logit,
            "total_weight_norm": spectrum.total_weight_norm,
            "weight_relative_change": weights["relative_change"],
            "weights": weights,
            "attention": attention,
            "activations": activations,
            "gradients": gradients,
            "embedding_freq_norms": spectrum.embedding_freq_norms,
        })
    bar.close()

    comparison = _restricted_vs_test(records, history, drop_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = [
        _figure_progress(records, history, keys, out_dir / "progress_measures.png"),
        _figure_spectrum(records, embedding_spectra, final_spectrum, keys, out_dir / "fourier_spectrum.png"),
        _figure_attention(heatmaps, out_dir / "attention_patterns.png"),
        _figure_attention_change(records, out_dir / "attention_change.png"),
        _figure_activations(records, out_dir / "activation_stats.png"),
        _figure_gradients(records, out_dir / "gradient_flow.png"),
        _figure_weights(records, out_dir / "weight_evolution.png"),
    ]
    summary = {
        "schema_version": SUMMARY_VERSION,
        "p": config.p,
        "operation": config.operation,
        "config": config.to_dict(),
        "n_checkpoints": len(records),
        "steps": [r["step"] for r in records],
        "fourier": {
            "basis": view.basis,
            "group_size": view.n,
            "generator": view.generator,
            "meaningful": view.meaningful,
            "note": view.note,
            "key_frequencies": keys,
            "key_frequency_energy_fraction": key_energy,
            "sparse": sparse,
            "key_frequency_rule": KEY_RULE.format(fraction=key_energy_fraction, max_keys=max_key_frequencies),
            "final_embedding_freq_norms": final_spectrum.embedding_freq_norms,
            "final_neuron_logit_freq_norms": final_spectrum.neuron_logit_freq_norms,
        },
        "restricted_loss_falls_before_test_loss": comparison,
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


# ---------------------------------------------------------------------------------------------- figures
def _steps(records):
    return [r["step"] for r in records]


def _figure_progress(records, history, keys, path: Path) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    if history:
        hs = [s for s, _ in history]
        for name in ("train_loss", "test_loss"):
            if all(name in m for _, m in history):
                ax.plot(hs, [m[name] for _, m in history], label=f"{name} (history)", alpha=0.8)
    else:
        ax.plot(_steps(records), [r["train_loss"] for r in records], "o-", label="train loss")
        ax.plot(_steps(records), [r["test_loss"] for r in records], "o-", label="test loss")
    ax.plot(_steps(records), [r["restricted_loss"] for r in records], "s-", label="restricted loss")
    ax.plot(_steps(records), [r["excluded_loss"] for r in records], "^-", label="excluded loss")
    ax.set(yscale="log", xlabel="step", ylabel="cross-entropy", title=f"Progress measures (key freqs {keys})")
    ax.legend(fontsize=8)
    axes[1].plot(_steps(records), [r["gini_embedding"] for r in records], "o-", label="W_E")
    axes[1].plot(_steps(records), [r["gini_neuron_logit"] for r in records], "s-", label="W_L = W_out W_U")
    axes[1].set(xlabel="step", ylabel="Gini", title="Gini of Fourier-basis norms", ylim=(0, 1))
    axes[1].legend(fontsize=8)
    axes[2].plot(_steps(records), [r["total_weight_norm"] for r in records], "o-")
    axes[2].set(xlabel="step", ylabel="‖θ‖₂", title="Total weight norm")
    return _save(fig, path)


def _figure_spectrum(records, spectra, final, keys, path: Path) -> str:
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    matrix = torch.tensor(spectra).T.numpy()  # (freq, checkpoint)
    freqs = list(range(1, matrix.shape[0] + 1))
    sns.heatmap(matrix, ax=axes[0], cmap="viridis", cbar_kws={"label": "norm"},
                xticklabels=_steps(records), yticklabels=[f if f in keys or f % 5 == 0 else "" for f in freqs])
    axes[0].set(xlabel="checkpoint step", ylabel="frequency k", title="Embedding W_E: norm per Fourier frequency")
    colors = ["tab:red" if f in keys else "tab:blue" for f in freqs]
    axes[1].bar(freqs, final.embedding_freq_norms, color=colors)
    axes[1].set(xlabel="frequency k", ylabel="norm", title=f"Last checkpoint (red: key frequencies {keys})")
    return _save(fig, path)


def _figure_attention(heatmaps: dict[int, torch.Tensor], path: Path) -> str:
    steps = sorted(heatmaps)
    n_heads = next(iter(heatmaps.values())).shape[0]
    fig, axes = plt.subplots(len(steps), n_heads, figsize=(3.2 * n_heads, 3 * len(steps)), squeeze=False)
    for row, step in enumerate(steps):
        for h in range(n_heads):
            ax = axes[row][h]
            image = ax.imshow(heatmaps[step][h, 0].numpy(), vmin=0, vmax=1, cmap="magma", origin="lower")
            ax.set(title=f"step {step}, head {h}", xlabel="b", ylabel="a")
    fig.colorbar(image, ax=axes, shrink=0.6, label='attention "=" → a')
    fig.suptitle('Attention from "=" to a over the (a, b) grid (to b = 1 − to a − to "=")')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _figure_attention_change(records, path: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    heads = list(records[0]["attention"])
    for head in heads:
        axes[0].plot(_steps(records), [r["attention"][head]["to_a"] for r in records], "o-", label=f"{head} → a")
        changes = [(r["step"], r["attention"][head]["change"]) for r in records[1:]]
        axes[1].plot([s for s, _ in changes], [c for _, c in changes], "o-", label=head)
    axes[0].set(xlabel="step", ylabel='mean attention "=" → a', title="Attention to a per head", ylim=(0, 1))
    axes[1].set(xlabel="step", ylabel="mean |Δ pattern|", title="Attention change since previous checkpoint")
    for ax in axes:
        ax.legend(fontsize=7)
    return _save(fig, path)


def _figure_activations(records, path: Path) -> str:
    hooks = list(records[-1]["activations"])
    fig, axes = plt.subplots(2, 2, figsize=(15, 9))
    for ax, stat in zip(axes.flat, ("mean", "std", "sparsity", "norm")):
        for hook in hooks:
            ax.plot(_steps(records), [r["activations"].get(hook, {}).get(stat, float("nan")) for r in records],
                    "o-", markersize=3, label=hook)
        ax.set(xlabel="step", ylabel=stat, title=f"Activation {stat} per hook")
    axes[0][1].legend(fontsize=6, bbox_to_anchor=(1.02, 1), loc="upper left")
    return _save(fig, path)


def _figure_gradients(records, path: Path) -> str:
    names = list(records[0]["gradients"])
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5))
    for name in names:
        axes[0].plot(_steps(records), [r["gradients"][name]["grad_norm"] for r in records], "o-", markersize=3,
                     label=name)
        axes[1].plot(_steps(records), [r["gradients"][name]["ratio"] for r in records], "o-", markersize=3,
                     label=name)
    axes[0].set(yscale="log", xlabel="step", ylabel="‖∇W‖", title="Gradient norm per parameter (training batch)")
    axes[1].set(yscale="log", xlabel="step", ylabel="‖∇W‖ / ‖W‖", title="Gradient / parameter norm ratio")
    axes[1].legend(fontsize=6, bbox_to_anchor=(1.02, 1), loc="upper left")
    return _save(fig, path)


def _figure_weights(records, path: Path) -> str:
    names = list(records[0]["weights"]["norms"])
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5))
    for name in names:
        axes[0].plot(_steps(records), [r["weights"]["norms"][name] for r in records], "o-", markersize=3, label=name)
    axes[0].plot(_steps(records), [r["weights"]["total_norm"] for r in records], "k-", linewidth=2, label="total")
    axes[0].set(xlabel="step", ylabel="‖W‖₂", title="Weight norms")
    axes[0].legend(fontsize=6, bbox_to_anchor=(1.02, 1), loc="upper left")
    changes = [(r["step"], r["weight_relative_change"]) for r in records[1:]]
    axes[1].plot([s for s, _ in changes], [c for _, c in changes], "o-")
    axes[1].set(xlabel="step", ylabel="‖θ_t − θ_prev‖ / ‖θ_prev‖", title="Relative weight change between checkpoints")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- compare
def compare_figure(runs: Mapping[str, History], out_path: Path, progress: Mapping[str, dict] | None = None,
                   metrics: tuple[str, ...] = ("train_loss", "test_loss", "test_acc"),
                   title: str | None = None) -> Path:
    """Learning curves of several runs on shared axes (one panel per metric), and, when ``progress`` maps a
    run name to its ``analyze_checkpoints`` summary, its restricted/excluded loss, Gini and weight norm."""
    out_path = Path(out_path)
    panels = list(metrics) + (["restricted_loss", "excluded_loss", "gini_embedding", "total_weight_norm"]
                              if progress else [])
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.8 * rows), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(list(runs) + [n for n in (progress or {}) if n not in runs])}
    for ax, panel in zip(axes.flat, panels):
        if panel in metrics:
            for name, history in runs.items():
                points = [(s, m[panel]) for s, m in history if m.get(panel) is not None]
                ax.plot([s for s, _ in points], [v for _, v in points], color=colors[name], label=name)
        else:
            for name, summary in (progress or {}).items():
                records = summary.get("checkpoints", [])
                ax.plot([r["step"] for r in records], [r.get(panel) for r in records], "o-", markersize=3,
                        color=colors[name], label=name)
        if panel.endswith("loss"):
            ax.set_yscale("log")
        ax.set(xlabel="step", ylabel=panel.replace("_", " "), title=panel.replace("_", " "))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
