"""Runs trained elsewhere, as our config and checkpoints: ``load_foreign_run(path)``.

Two kinds are read, both with ``torch.load(weights_only=True)`` only (``checkpoints.safe_load``):

- ``earlier-project``: a run folder of khairul-me/grokking-transformer-analysis: ``config.json`` (``p``,
  ``frac_train``, ``lr``, ``wd``, ``betas``, ``num_epochs``, ``checkpoint_every``, ``data_seed``, ``model_seed``,
  ``model_config`` = the HookedTransformerConfig fields n_layers, n_heads, d_model, d_head, d_mlp, act_fn,
  normalization_type) and ``checkpoints/checkpoint_epoch_N.pt`` dicts (``epoch``, ``model_state_dict``,
  ``optimizer_state_dict``, ``train_loss``, ``test_loss``, ``config``). A single such checkpoint file works too.
- ``hooked-transformer``: a TransformerLens ``HookedTransformer`` state dict (name -> tensor) of our shape.

How the earlier project's numbers map onto ours (read from its code):
- It saved ``checkpoint_epoch_N`` after epoch N's optimizer step, so the weights are those after N + 1 steps.
- Its split was ``torch.randperm(p*p)`` on the global generator seeded with ``model_seed`` (its ``data_seed``
  only seeded numpy), keeping the first ``int(p*p*frac_train)`` pairs, in our pair order: ``data_seed =
  model_seed`` and ``train_frac = int(p*p*frac)/(p*p)`` give the same split (our count is a rounding). A bare
  state dict gets TransformerLens's grokking demo split (seed 598, 30 %) unless told otherwise.
- HookedTransformer has attention biases (b_Q, b_K, b_V, b_O) and an unembedding bias (b_U) that our model has
  not; the earlier project froze every bias at zero, so they are dropped when zero and refused otherwise.
  Its buffers (attention ``mask``, ``IGNORE``) are constants and dropped.
- Its training strategy (curriculum, lr/wd schedules) is not in ``config.json``; those fields keep our defaults.
Imported checkpoints carry no optimizer state: they can be analysed and compared, not resumed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import BIG, Config, ConfigError, preset
from ..checkpoints import CHECKPOINT_FORMAT, CheckpointError, model_from_checkpoint, safe_load

KINDS = ("earlier-project", "hooked-transformer")
_EPOCH_FILE = re.compile(r"checkpoint_epoch_(\d+)\.pt$")
_BIASES_WE_LACK = re.compile(r"^(blocks\.\d+\.attn\.b_[QKVO]|unembed\.b_U)$")
_CONSTANT_BUFFERS = re.compile(r"^blocks\.\d+\.attn\.(mask|IGNORE)$")
_NORMALIZATION = {None: "none", "None": "none", "LN": "ln"}


class ForeignRunError(CheckpointError):
    """A file or folder that cannot be imported; the message is one line."""


@dataclass
class ImportedRun:
    config: Config
    checkpoints: list[tuple[int, dict[str, Any]]]  # (step, our checkpoint dict), by step
    source: str  # the absolute path imported
    kind: str  # one of KINDS
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # losses the source recorded
    notes: list[str] = field(default_factory=list)


def load_foreign_run(path: str | Path, *, operation: str = "add", train_frac: float | None = None,
                     data_seed: int | None = None, step: int | None = None) -> ImportedRun:
    """Read a run folder of the earlier project, one of its checkpoint files, or a HookedTransformer state dict.

    ``operation``/``train_frac``/``data_seed``/``step``: what a bare state dict cannot say (defaults: addition,
    the TransformerLens demo's split, the step in the file name or 0). Raises ``ForeignRunError`` (one line)."""
    path = Path(path).resolve()
    if path.is_dir():
        return _earlier_project_folder(path)
    payload = safe_load(path, "file")
    if isinstance(payload, dict) and "model_state_dict" in payload:
        config = _earlier_project_config(payload.get("config"), path.name)
        epoch = _epoch_of(payload, path)
        return ImportedRun(config, [(epoch + 1, _our_checkpoint(payload["model_state_dict"], config, epoch + 1,
                                                                path.name))],
                           str(path), "earlier-project", _losses(payload, epoch), _EARLIER_NOTES)
    if isinstance(payload, dict) and "format" in payload and "model" in payload:
        raise ForeignRunError(f"{path.name} is already a grokking-tracked checkpoint: nothing to import")
    if not isinstance(payload, dict) or "embed.W_E" not in payload:
        raise ForeignRunError(f"{path.name} is neither an earlier-project run nor a TransformerLens HookedTransformer "
                              "state dict (no 'embed.W_E')")
    _require_tensors(payload, path.name)
    config = _config_from_shapes(payload, path.name, operation, train_frac, data_seed)
    if step is None:
        digits = re.findall(r"\d+", path.stem)
        step = int(digits[-1]) if digits else 0
    if not 0 <= step < BIG:  # bounded like an epoch: MLflow's store takes int64 steps, and no run trains this long
        raise ForeignRunError(f"{path.name}: step {step:,} (from its name) is not a training step; at most "
                              f"{BIG - 1:,}: rename the file")
    notes = ["a bare state dict records no task or split: operation, train_frac and data_seed are assumptions"]
    return ImportedRun(config, [(step, _our_checkpoint(payload, config, step, path.name))], str(path),
                       "hooked-transformer", [], notes)


_EARLIER_NOTES = ["checkpoint_epoch_N holds the weights after N + 1 optimizer steps",
                  "the earlier project's training strategy (curriculum, schedules) is not in its config.json",
                  "history train_loss was measured by the earlier loop before that step's update"]


# ---------------------------------------------------------------------------------------------- earlier project
def _earlier_project_folder(folder: Path) -> ImportedRun:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ForeignRunError(f"{folder} has no config.json: not a run folder of the earlier project")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ForeignRunError(f"{config_file} is not valid JSON: {error.msg if hasattr(error, 'msg') else error}") \
            from None
    config = _earlier_project_config(raw, "config.json")
    files = sorted((int(m.group(1)), f) for f in (folder / "checkpoints").glob("checkpoint_epoch_*.pt")
                   if (m := _EPOCH_FILE.search(f.name)))
    if not files:
        raise ForeignRunError(f"{folder} has no checkpoints/checkpoint_epoch_N.pt files")
    checkpoints, history = [], []
    for _, file in files:
        payload = safe_load(file)
        if not isinstance(payload, dict) or "model_state_dict" not in payload:
            raise ForeignRunError(f"{file.name} is not an earlier-project checkpoint (no 'model_state_dict')")
        epoch = _epoch_of(payload, file)
        checkpoints.append((epoch + 1, _our_checkpoint(payload["model_state_dict"], config, epoch + 1, file.name)))
        history += _losses(payload, epoch)
    return ImportedRun(config, sorted(checkpoints, key=lambda c: c[0]), str(folder), "earlier-project",
                       sorted(history, key=lambda h: h[0]), _EARLIER_NOTES)


def _epoch_of(payload: dict, file: Path) -> int:
    epoch = payload.get("epoch")
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0):
        match = _EPOCH_FILE.search(file.name)
        if not match:
            raise ForeignRunError(f"{file.name} records no epoch")
        epoch = int(match.group(1))
    if epoch >= BIG:  # a step MLflow's store cannot take (int64) would be refused after the run exists
        raise ForeignRunError(f"{file.name} records epoch {epoch:,}; at most {BIG - 1:,} is a training run")
    return epoch


def _losses(payload: dict, epoch: int) -> list[tuple[int, dict[str, float]]]:
    losses = {k: float(payload[k]) for k in ("train_loss", "test_loss")
              if isinstance(payload.get(k), (int, float)) and math.isfinite(payload[k])}
    return [(epoch + 1, losses)] if losses else []


def _earlier_project_config(raw: Any, name: str) -> Config:
    if not isinstance(raw, dict) or not isinstance(raw.get("model_config"), dict):
        raise ForeignRunError(f"{name}: not the earlier project's config (no 'model_config')")
    model = raw["model_config"]
    if model.get("act_fn", "relu") != "relu":
        raise ForeignRunError(f"{name}: act_fn {model.get('act_fn')!r} cannot be imported (our model uses relu)")
    if model.get("normalization_type") not in _NORMALIZATION:
        raise ForeignRunError(f"{name}: normalization_type {model.get('normalization_type')!r} cannot be imported "
                              "(ours: none or LN)")
    try:
        p, frac = int(raw["p"]), float(raw.get("frac_train", 0.3))
        betas = raw.get("betas", (0.9, 0.98))
        config = preset("default").replace(
            p=p, train_frac=math.floor(p * p * frac) / (p * p), lr=raw.get("lr", 1e-3), weight_decay=raw.get("wd", 1.0),
            beta1=betas[0], beta2=betas[1], max_steps=raw.get("num_epochs", 25000),
            checkpoint_every=raw.get("checkpoint_every", 5000), data_seed=raw.get("model_seed", 999),
            seed=raw.get("model_seed", 999), n_layers=model["n_layers"], n_heads=model["n_heads"],
            d_model=model["d_model"], d_mlp=model["d_mlp"],
            normalization=_NORMALIZATION[model.get("normalization_type")])
    except (KeyError, TypeError, ValueError, IndexError, ConfigError) as error:
        raise ForeignRunError(f"{name}: cannot read the earlier project's config: {error}") from None
    if model.get("d_head", config.d_head) != config.d_head:
        raise ForeignRunError(f"{name}: d_head {model.get('d_head')} != d_model / n_heads = {config.d_head}, "
                              "which our model assumes")
    return config


# ---------------------------------------------------------------------------------------------- state dicts
def _require_tensors(weights: dict, name: str) -> None:
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise ForeignRunError(f"{name}: {key} is a {type(value).__name__}, not a tensor: refused")


def _config_from_shapes(weights: dict, name: str, operation: str, train_frac: float | None,
                        data_seed: int | None) -> Config:
    try:
        d_vocab, d_model = weights["embed.W_E"].shape
        n_heads, _, d_head = weights["blocks.0.attn.W_Q"].shape
        d_mlp = weights["blocks.0.mlp.W_in"].shape[1]
        n_ctx, d_vocab_out = weights["pos_embed.W_pos"].shape[0], weights["unembed.W_U"].shape[1]
    except (KeyError, ValueError, IndexError) as error:
        raise ForeignRunError(f"{name}: not a HookedTransformer of our shape ({error})") from None
    p = d_vocab - 1
    if d_vocab_out != p or n_ctx != 3:
        raise ForeignRunError(f"{name}: another shape: d_vocab {d_vocab}, d_vocab_out {d_vocab_out}, n_ctx {n_ctx}; "
                              "a modular-arithmetic model has d_vocab = p + 1, d_vocab_out = p, n_ctx = 3")
    n_layers = len({key.split(".")[1] for key in weights if key.startswith("blocks.")})
    try:
        config = preset("default").replace(
            p=p, operation=operation, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp, n_layers=n_layers,
            normalization="ln" if "blocks.0.ln1.w" in weights else "none",
            train_frac=train_frac if train_frac is not None else math.floor(p * p * 0.3) / (p * p),
            data_seed=598 if data_seed is None else data_seed)
    except ConfigError as error:
        raise ForeignRunError(f"{name}: {error}") from None
    if d_head != config.d_head:
        raise ForeignRunError(f"{name}: d_head {d_head} != d_model / n_heads = {config.d_head}, which our model assumes")
    return config


def _our_checkpoint(weights: Any, config: Config, step: int, name: str) -> dict[str, Any]:
    """Our checkpoint dict (see ``Trainer.state_dict``) from HookedTransformer weights, checked against ``config``."""
    if not isinstance(weights, dict):
        raise ForeignRunError(f"{name}: the model state is a {type(weights).__name__}, not a state dict")
    _require_tensors(weights, name)
    ours = {}
    for key, tensor in weights.items():
        if _CONSTANT_BUFFERS.match(key):
            continue
        if _BIASES_WE_LACK.match(key):
            if torch.count_nonzero(tensor):
                raise ForeignRunError(f"{name}: {key} is not zero; our model has no such bias and cannot represent it")
            continue
        ours[key] = tensor.detach().to(torch.float32).clone()
    state = {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "step": int(step), "model": ours,
             "optimizer": None, "scheduler": None, "detector": None, "grokfast_ema": None, "rng": None}
    try:
        model_from_checkpoint(state)  # every name and shape must be ours
    except CheckpointError as error:
        raise ForeignRunError(f"{name}: {error}") from None
    return state
