"""The checkpoint format, in the core: what training writes, and what analysis and tracking read back.

A checkpoint is one dict of tensors and plain containers (``checkpoint_state``, version ``CHECKPOINT_FORMAT``),
saved as ``checkpoint_name(step)``. Loading is ``torch.load(weights_only=True)`` only, with one-line errors.

Checkpoints may come from a tracking server, i.e. from anyone: a full unpickle would run whatever a
crafted file asks for. ``weights_only=True`` makes torch's restricted unpickler refuse every global that
is not a tensor or a plain container, before anything is called.
"""

from __future__ import annotations

import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config import UserError

CHECKPOINT_FORMAT = 1
_STEP_FILE = re.compile(r"step_(\d+)\.pt$")
_REFUSED_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message is one line fit for stderr."""


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint at ``step`` (``find_checkpoints`` and the tracking side read it back)."""
    return f"step_{step:07d}.pt"


def checkpoint_state(config, step: int, model: torch.nn.Module, optimizer_state: dict, detector,
                     scheduler_state: dict | None = None, grokfast_ema: list[torch.Tensor] | None = None,
                     sampler_state: dict | None = None) -> dict[str, Any]:
    """One checkpoint: everything needed to continue bit-for-bit; only tensors and plain containers, so it loads
    with ``torch.load(weights_only=True)``. Written by Trainer and LockstepTrainer alike."""
    return {
        "format": CHECKPOINT_FORMAT, "config": config.to_dict(), "step": step, "model": model.state_dict(),
        "optimizer": optimizer_state, "scheduler": scheduler_state, "detector": detector.state(),
        "grokfast_ema": grokfast_ema, "sampler": sampler_state,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if next(model.parameters()).is_cuda else []},
    }


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# torch.load(weights_only=True) could still run code before torch 2.6 (CVE-2025-32434) and had a memory-corruption
# bug before 2.10 (CVE-2026-24747): the promise "never unpickles code" holds from 2.10 on.
SAFE_LOADING_TORCH = (2, 10)


def check_safe_loading(version: str | None = None) -> None:
    """Refuse, in one line, to load checkpoints on a torch whose weights_only loading is not safe."""
    version = version or torch.__version__
    numbers = tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:2])
    if numbers < SAFE_LOADING_TORCH:
        raise CheckpointError(f"torch {version} cannot load checkpoints safely (weights_only loading is safe from "
                              f"torch {'.'.join(map(str, SAFE_LOADING_TORCH))} on): upgrade torch")


def _not_a_file(path: Path) -> str:
    """What ``path`` is instead of a regular file, as a phrase: a FIFO is not "missing" (reading one blocks)."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return f"is {kind}, not a regular file"
    return "is not a regular file"


def safe_load(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` of any file: tensors and plain containers only, one-line errors."""
    check_safe_loading()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} {_not_a_file(path)}")
    try:
        with warnings.catch_warnings():  # torch warns about legacy pickles before refusing them: one line is ours
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's restricted unpickler names any global it refuses (e.g. "GLOBAL posix.system"); other
        # unpickling errors (e.g. "Unsupported operand") mean the bytes are not a pickle at all.
        refused = _REFUSED_GLOBAL.search(str(error))
        if refused:
            raise CheckpointError(
                f"{what} {path.name} refused: it asks to unpickle {refused.group(1)}, which needs unsafe "
                "loading (only tensors and plain containers are accepted)") from None
        raise CheckpointError(f"{what} {path.name} is corrupt: not a torch checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, KeyError,
            IndexError, TypeError, struct.error) as error:
        raise CheckpointError(f"{what} {path.name} is corrupt or truncated: {_one_line(error)}") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict written by ``torch.save(trainer.state_dict(), path)`` without unsafe unpickling."""
    path = Path(path)
    state = safe_load(path)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or not isinstance(
            state.get("config"), dict):
        raise CheckpointError(f"checkpoint {path.name} is not a grokking-tracked checkpoint "
                              "(expected a dict with 'config' and 'model')")
    return state


def config_from_checkpoint(state: dict[str, Any]):
    """The checkpoint's config, checked as a whole (``config.stored_config``: fields, domains, a model that fits
    in memory) before any model is built from it."""
    from .config import ConfigError, stored_config

    try:
        return stored_config(state["config"], "its config")
    except ConfigError as error:
        raise CheckpointError(f"checkpoint has an invalid config: {error}") from None


def model_from_checkpoint(state: dict[str, Any], config=None):
    """Rebuild a ``GrokkingTransformer`` (CPU, eval mode) from a loaded checkpoint.

    ``config`` (optional): the config the caller expects (e.g. the run's ``config.json`` or the first
    checkpoint's); a checkpoint of another model shape is refused with ``CheckpointError``.
    """
    from .model import GrokkingTransformer

    own = config_from_checkpoint(state)
    if config is not None:
        for name in ("p", "d_model", "n_layers", "n_heads", "d_mlp", "normalization", "operation"):
            if getattr(own, name) != getattr(config, name):
                raise CheckpointError(f"checkpoint at step {state.get('step', '?')} has another model shape: "
                                      f"{name}={getattr(own, name)!r}, expected {getattr(config, name)!r}")
    model = GrokkingTransformer(own)
    expected = model.state_dict()
    weights = state["model"]
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint at step {state.get('step', '?')} does not match its config: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(expected[name].shape):
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise CheckpointError(f"checkpoint at step {state.get('step', '?')} has another model shape than "
                                  f"its config: {name} is {shape}, config expects {tuple(expected[name].shape)}")
    model.load_state_dict(weights)
    return model.eval()


def find_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the ``step_NNNNNN.pt`` files in a directory, sorted by step."""
    found = []
    for path in Path(directory).rglob("step_*.pt"):
        match = _STEP_FILE.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)
