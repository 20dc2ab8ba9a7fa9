"""Experiment configuration: one flat dataclass, presets as plain overrides (nanoGPT style).

A flat config keeps three things trivial: logging every field as an MLflow param, overriding any
field from the command line or a study spec, and round-tripping through ``config.json``.
This module imports nothing heavy so that the CLI can validate input before torch or mlflow load.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

OPERATIONS = ("add", "sub", "mul", "div")
LR_SCHEDULES = ("constant", "warmup", "cyclic", "plateau")
WD_SCHEDULES = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda", "mps")
STOP_EVENTS = ("generalization", "cleanup_end")


class UserError(Exception):
    """Base of every error a user can cause and fix; the CLI prints its message as one line.

    It lives here because config.py imports nothing heavy: the CLI can catch it without loading torch."""


class ConfigError(UserError, ValueError):
    """A user-facing configuration problem; its message is one line fit for stderr."""


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, math.isqrt(n) + 1))


@dataclass
class Config:
    # --- task (Power et al. 2022; Nanda et al. 2023) ---
    p: int = 59
    operation: str = "add"
    train_frac: float = 0.3
    data_seed: int = 598
    # --- model: attention + MLP, ReLU, no LayerNorm (Nanda et al. 2023) ---
    d_model: int = 64
    n_layers: int = 1
    n_heads: int = 4
    d_mlp: int = 256
    normalization: str = "none"  # "none" or "ln"
    seed: int = 999  # model initialisation seed
    # --- optimisation: full-batch AdamW ---
    lr: float = 1e-2
    weight_decay: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.98
    max_steps: int = 5000
    eval_every: int = 10
    checkpoint_every: int = 1000
    # --- earlier project's strategies, all off by default ---
    lr_schedule: str = "constant"  # constant | warmup | cyclic | plateau
    warmup_steps: int = 10
    cyclic_period: int = 1000  # steps per full triangle cycle
    cyclic_min_ratio: float = 0.1  # base lr = lr * ratio
    plateau_factor: float = 0.5
    plateau_patience: int = 20  # in evaluations
    wd_schedule: str = "constant"  # constant | linear | cosine (from weight_decay to wd_final)
    wd_final: float = 0.1
    wd_schedule_steps: int = 5000
    curriculum: bool = False
    curriculum_start_frac: float = 0.25  # fraction of the training set used at step 0
    curriculum_steps: int = 500  # steps to grow to the whole training set
    grokfast_alpha: float = 0.98
    grokfast_lambda: float = 0.0  # 0 turns the Grokfast EMA gradient filter off
    # --- detection ---
    memorization_threshold: float = 0.99
    generalization_threshold: float = 0.99
    onset_loss_drop: float = 0.5  # onset: test loss fell to this fraction of its post-memorisation peak
    stop_on_grok: bool = True
    stop_margin: int = 200  # steps trained after the stop event before stopping
    stop_after: str = "generalization"  # the event that stops training: generalization | cleanup_end
    # --- live progress measures (Nanda et al. 2023), measures.py ---
    progress_every: int = 0  # read at the first evaluation in every progress_every steps; 0: off
    # --- runtime ---
    device: str = "auto"

    # ------------------------------------------------------------------ derived
    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_vocab(self) -> int:
        return self.p + 1  # residues 0..p-1 and the "=" token

    @property
    def n_ctx(self) -> int:
        return 3  # a, b, =

    # ------------------------------------------------------------------ validation
    def validate(self) -> "Config":
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(isinstance(self.p, int) and self.p >= 3, f"p must be an integer >= 3, got {self.p!r}")
        need(self.operation in OPERATIONS,
             f"unknown operation {self.operation!r}; choose one of {', '.join(OPERATIONS)}")
        need(self.operation != "div" or is_prime(self.p),
             f"operation 'div' needs a prime p (b must be invertible mod p); {self.p} is not prime")
        need(0.0 < self.train_frac < 1.0, f"train_frac must lie strictly between 0 and 1, got {self.train_frac!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must lie in [0, 1)")
        need(self.d_model >= 1 and self.n_heads >= 1 and self.d_model % self.n_heads == 0,
             f"d_model ({self.d_model}) must be a positive multiple of n_heads ({self.n_heads})")
        need(self.n_layers >= 1 and self.d_mlp >= 1, "n_layers and d_mlp must be >= 1")
        need(self.normalization in ("none", "ln"), "normalization must be 'none' or 'ln'")
        need(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps!r}")
        need(self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every!r}")
        need(self.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0: only event and final checkpoints)")
        need(self.lr_schedule in LR_SCHEDULES,
             f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        need(self.wd_schedule in WD_SCHEDULES,
             f"unknown wd_schedule {self.wd_schedule!r}; choose one of {', '.join(WD_SCHEDULES)}")
        need(0 < self.curriculum_start_frac <= 1, "curriculum_start_frac must lie in (0, 1]")
        need(0 <= self.grokfast_alpha < 1, "grokfast_alpha must lie in [0, 1)")
        need(self.grokfast_lambda >= 0, "grokfast_lambda must be >= 0")
        need(0 < self.memorization_threshold <= 1 and 0 < self.generalization_threshold <= 1,
             "detection thresholds must lie in (0, 1]")
        need(0 < self.onset_loss_drop < 1, "onset_loss_drop must lie strictly between 0 and 1")
        need(self.progress_every >= 0, f"progress_every must be >= 0 (0: off), got {self.progress_every!r}")
        need(self.stop_after in STOP_EVENTS,
             f"unknown stop_after {self.stop_after!r}; choose one of {', '.join(STOP_EVENTS)}")
        need(self.stop_after != "cleanup_end" or self.progress_every > 0,
             "stop_after = cleanup_end needs the progress measures (progress_every > 0)")
        need(self.device in DEVICES or self.device.startswith("cuda:"),
             f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)} or cuda:N")
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**{k: coerce(k, v) for k, v in values.items()}).validate()

    def replace(self, **overrides: Any) -> "Config":
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        coerced = {k: coerce(k, v) for k, v in overrides.items()}
        return dataclasses.replace(self, **coerced).validate()


_FIELD_TYPES = {f.name: f.type for f in fields(Config)}


def coerce(name: str, value: Any) -> Any:
    """Turn a string or number into the field's type, with a one-line error on failure."""
    kind = _FIELD_TYPES[name]
    try:
        if kind == "bool":
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes")
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} expects a {kind}, got {value!r}") from None


# Presets are overrides on the defaults. `default` is CPU-sized with a visible grokking delay.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The earlier single-file project (../shared/seed): its model and optimiser.
    "seed": dict(p=113, d_model=64, d_mlp=256, n_heads=4, train_frac=0.3, lr=1e-3, weight_decay=1.0,
                 beta1=0.9, beta2=0.98, max_steps=25000, eval_every=100, checkpoint_every=2500),
    # Nanda et al. 2023, "Progress measures for grokking via mechanistic interpretability".
    # Trained until the end of clean-up (detect.py's cleanup_end), at most the paper's 40,000 full-batch steps.
    "nanda2023": dict(p=113, d_model=128, d_mlp=512, n_heads=4, train_frac=0.3, lr=1e-3, weight_decay=1.0,
                      beta1=0.9, beta2=0.98, max_steps=40000, eval_every=100, checkpoint_every=500,
                      lr_schedule="warmup", warmup_steps=10, progress_every=100, stop_after="cleanup_end"),
}


def preset(name: str, **overrides: Any) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Config().replace(**PRESETS[name]).replace(**overrides)
