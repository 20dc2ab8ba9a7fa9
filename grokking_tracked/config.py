"""Experiment configuration: one flat dataclass, presets as plain overrides (nanoGPT style).

A flat config keeps three things trivial: logging every field as an MLflow param, overriding any
field from the command line or a study spec, and round-tripping through ``config.json``.
This module imports nothing heavy so that the CLI can validate input before torch or mlflow load.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from typing import Any

from .detect import EVENTS, stop_events  # pure Python: the event registry

OPERATIONS = ("add", "sub", "mul", "div")
LR_SCHEDULES = ("constant", "warmup", "cyclic", "plateau")
WD_SCHEDULES = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda", "mps")
NORMALIZATIONS = ("none", "ln")
ACTIVATIONS = ("relu", "gelu")
# "orthoadamw": ⊥AdamW of Prieto et al. 2025 (optim.OrthoAdamW; their orthograd.py wrapping AdamW).
# "sgd" / "orthosgd": SGD with momentum sgd_momentum, and ⊥SGD (their orthograd.py wrapping SGD; Figure 6's last run).
OPTIMIZERS = ("adamw", "adam", "orthoadamw", "sgd", "orthosgd")
# The training loss (stability.py): float64 softmax cross-entropy (ours), float32 softmax cross-entropy (Prieto et
# al. 2025's default, utils.cross_entropy_float32), StableMax cross-entropy in float64 (their stablemax_cross_entropy).
LOSSES = ("softmax", "softmax32", "stablemax")
DTYPES = ("float32", "float64")  # the model's parameters and activations (their --train_precision 32 | 64)
# The fields that fix the task and the model's parameter shapes: a checkpoint fits a config iff these agree,
# and trials trained in one lockstep stack must share them (and attention_rate, which changes the forward, not a shape).
TASK_FIELDS = ("p", "operation")
MODEL_SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "d_mlp", "normalization", "attention_rate")
STOP_EVENTS = stop_events()  # what stop_after may name: the events registered with can_stop (detect.EVENTS)


class UserError(Exception):
    """Base of every error a user can cause and fix; the CLI prints its message as one line.

    It lives here because config.py imports nothing heavy: the CLI can catch it without loading torch."""


class TrainingStopped(Exception):
    """Raised by a callback to end training on purpose before its budget (e.g. a pruned Optuna trial). Here, beside
    the user-facing errors, so the tracking layer can catch it without importing training (and torch)."""


class ConfigError(UserError, ValueError):
    """A user-facing configuration problem; its message is one line fit for stderr."""


@dataclass(frozen=True)
class Domain:
    """The values a numeric field accepts: a type and an interval (``None``: unbounded on that side)."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def _format(self, bound: float) -> str:
        return f"{int(bound):,}" if self.kind is int else f"{bound:g}"

    def __str__(self) -> str:
        low = "-inf" if self.low is None else self._format(self.low)
        high = "inf" if self.high is None else self._format(self.high)
        return f"{'(' if self.low_open or self.low is None else '['}{low}, {high}{')' if self.high_open or self.high is None else ']'}"

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is refused (a phrase to put after the field name), or None."""
        noun = "an integer" if self.kind is int else "a finite number"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                self.kind is int and not isinstance(value, int)) or not math.isfinite(value):
            return f"must be {noun} in {self}, got {value!r}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"must be {noun} in {self}, got {value!r}" if too_low or too_high else None


MAX_CUDA_INDEX = 10_000  # cuda:N beyond this is a typo (torch.device overflows past 2^63 with a RuntimeError)
_CUDA_INDEX = re.compile(r"cuda:(0|[1-9]\d{0,3})", re.A)  # ASCII digits only: str.isdigit() also takes '²'
BIG = 10 ** 9  # step counts beyond this are typos, not experiments
FIELD_DOMAINS: dict[str, Domain] = {
    "p": Domain(int, 3, 5000), "train_frac": Domain(float, 0, 1, True, True), "data_seed": Domain(int, 0, 2 ** 63 - 1),
    "d_model": Domain(int, 1, 16384), "n_layers": Domain(int, 1, 128), "n_heads": Domain(int, 1, 1024),
    "d_mlp": Domain(int, 1, 65536), "attention_rate": Domain(float, 0, 1), "seed": Domain(int, 0, 2 ** 63 - 1),
    "lr": Domain(float, 0, 10, low_open=True), "weight_decay": Domain(float, 0, 1e4),
    "beta1": Domain(float, 0, 1, high_open=True), "beta2": Domain(float, 0, 1, high_open=True),
    "max_steps": Domain(int, 1, BIG), "eval_every": Domain(int, 1, BIG), "batch_size": Domain(int, 0, BIG),
    "checkpoint_every": Domain(int, 0, BIG),
    "warmup_steps": Domain(int, 1, BIG), "cyclic_period": Domain(int, 2, BIG),
    "cyclic_min_ratio": Domain(float, 0, 1, low_open=True), "plateau_factor": Domain(float, 0, 1, True, True),
    "plateau_patience": Domain(int, 0, BIG), "wd_final": Domain(float, 0, 1e4), "wd_schedule_steps": Domain(int, 1, BIG),
    "curriculum_start_frac": Domain(float, 0, 1, low_open=True), "curriculum_steps": Domain(int, 0, BIG),
    "grokfast_alpha": Domain(float, 0, 1, high_open=True), "grokfast_lambda": Domain(float, 0, 1000),
    "memorization_threshold": Domain(float, 0, 1, low_open=True),
    "generalization_threshold": Domain(float, 0, 1, low_open=True),
    "onset_loss_drop": Domain(float, 0, 1, True, True), "stop_margin": Domain(int, 0, BIG),
    "progress_every": Domain(int, 0, BIG), "sgd_momentum": Domain(float, 0, 1, high_open=True),
}


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
    activation: str = "relu"  # "relu" or "gelu" (the MLP's; Grokfast's model uses GELU)
    # Zhong et al. 2023's "attention rate": 1 = learned attention, 0 = constant (uniform) attention; in between
    # pattern = rate * softmax + (1 - rate), their blend (model.py). Uniform attention tends to learn "pizza".
    attention_rate: float = 1.0
    seed: int = 999  # model initialisation seed
    # --- optimisation: AdamW, full batch unless batch_size > 0 ---
    optimizer: str = "adamw"  # "adamw" (decoupled weight decay) or "adam" (weight decay as an L2 gradient term)
    # or "orthoadamw": AdamW on the gradient with its component along each weight tensor removed, rescaled to the
    # gradient's norm (Prieto et al. 2025's ⊥AdamW, orthograd.py); "sgd", or "orthosgd" (⊥SGD, the same projection)
    loss: str = "softmax"  # softmax | softmax32 | stablemax (stability.py; Prieto et al. 2025's utils.py)
    dtype: str = "float32"  # float32 | float64: the model in double precision (Prieto et al. 2025's --train_precision)
    lr: float = 1e-2
    weight_decay: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.98
    sgd_momentum: float = 0.2  # sgd / orthosgd only: Prieto et al.'s utils.get_optimizer (SGD momentum 0.2)
    max_steps: int = 5000
    eval_every: int = 10
    batch_size: int = 0  # examples per optimizer step, reshuffled every epoch; 0 (or >= the train set): full batch
    checkpoint_every: int = 1000
    # As the papers' loops: train loss and accuracy from the minibatches trained since the last evaluation (each
    # batch's own forward, before its update), and only the held-out split evaluated at eval_every. Needs batch_size.
    train_metrics_from_batches: bool = False
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
        """Refuse, with one line naming the field, any value outside its domain (``FIELD_DOMAINS``), any choice
        that is not one of its options, and combinations that cannot train."""
        for name, domain in FIELD_DOMAINS.items():
            problem = domain.problem(getattr(self, name))
            if problem:
                raise ConfigError(f"{name} {problem}")

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        for name, options in (("operation", OPERATIONS), ("lr_schedule", LR_SCHEDULES), ("wd_schedule", WD_SCHEDULES),
                              ("normalization", NORMALIZATIONS), ("stop_after", stop_events()),
                              ("activation", ACTIVATIONS), ("optimizer", OPTIMIZERS), ("loss", LOSSES),
                              ("dtype", DTYPES)):
            need(getattr(self, name) in options,
                 f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(options)}")
        need(self.operation != "div" or is_prime(self.p),
             f"operation 'div' needs a prime p (b must be invertible mod p); {self.p} is not prime")
        pairs = self.p * self.p  # the split of data.make_dataset: round(train_frac * p^2) training pairs, at least 1
        n_train = max(1, int(round(self.train_frac * pairs)))
        need(n_train < pairs, f"train_frac {self.train_frac:g} of p^2 = {pairs} pairs leaves no test pair "
                              f"({n_train} for training): lower train_frac or raise p")
        need(self.d_model % self.n_heads == 0,
             f"d_model ({self.d_model}) must be a positive multiple of n_heads ({self.n_heads})")
        # AdamW's decoupled decay multiplies the weights by (1 - lr * weight_decay) each step: at >= 1 they flip
        # sign or vanish every step and training turns to NaN.
        for decay in ("weight_decay", "wd_final"):
            need(self.lr * getattr(self, decay) < 1,
                 f"lr x {decay} must be < 1 (AdamW multiplies the weights by 1 - lr*{decay} each step), got "
                 f"{self.lr:g} x {getattr(self, decay):g}")
        # A curriculum grows a prefix of an ordered set; an epoch's shuffle would undo that order.
        need(not (self.curriculum and self.batch_size), "curriculum and batch_size > 0 cannot be combined")
        # Grokfast amplifies the slow gradient and ⊥AdamW removes the radial one: neither paper defines the order.
        need(not (self.optimizer in ("orthoadamw", "orthosgd") and self.grokfast_lambda),
             f"optimizer {self.optimizer} cannot be combined with the Grokfast filter (grokfast_lambda > 0)")
        need(not (self.dtype == "float64" and self.device == "mps"), "dtype float64 is not supported on device mps")
        need(not self.train_metrics_from_batches or self.batch_size > 0,
             "train_metrics_from_batches needs minibatches (batch_size > 0)")
        need(not EVENTS[self.stop_after].needs_progress or self.progress_every > 0,
             f"stop_after = {self.stop_after} needs the progress measures (progress_every > 0)")
        need(isinstance(self.device, str) and (self.device in DEVICES or _CUDA_INDEX.fullmatch(self.device)),
             f"unknown device {_shown(self.device)}; choose one of {', '.join(DEVICES)} or cuda:N (N < {MAX_CUDA_INDEX})")
        return self

    @property
    def parameter_count(self) -> int:
        """Parameters of the HookedTransformer this config builds (embeddings, attention with biases, MLP, unembed)."""
        d_model, d_mlp, ln = self.d_model, self.d_mlp, 2 * self.d_model * (self.normalization == "ln")
        layer = 4 * d_model * d_model + 2 * d_model * d_mlp + d_mlp + d_model + 2 * ln  # W_QKVO, MLP, its biases
        return (self.d_vocab + self.n_ctx) * d_model + self.n_layers * layer + ln + d_model * self.p  # + W_U

    def estimated_memory_bytes(self) -> int:
        """A generous estimate of peak memory while training, in float32: the parameters 4 times (weights,
        gradients, AdamW's two moments; 5 with Grokfast's EMA of the gradients; one more for a checkpoint's copy),
        plus the activations of evaluating all p^2 pairs at once (logits plus the float64 log-softmax, ~20 bytes per
        (pair, class); the residual stream, attention and MLP per pair, kept for the backward pass). Activations
        alone measured 2-3x lower (benchmarks/scale.py), so refusing above it only refuses what cannot fit."""
        copies = 4 + (self.grokfast_lambda > 0) + 1
        pairs = self.p * self.p
        activations = pairs * (20 * self.p + 8 * self.d_mlp * self.n_layers + 48 * self.d_model * self.n_layers)
        width = 2 if self.dtype == "float64" else 1  # float64: every float32 byte above counted twice
        return int(width * (4 * copies * self.parameter_count + activations))

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
            raise ConfigError(f"unknown config field(s): {', '.join(k if k.isprintable() and len(k) <= 40 else _shown(k, 40) for k in unknown[:5])}")
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
    if isinstance(value, bool) and kind in ("int", "float"):  # a TOML `true` is an int to Python: refuse it
        raise ConfigError(f"{name} expects a {kind}, got {value!r}")
    if kind == "bool" and not isinstance(value, (bool, str)) and value not in (0, 1):
        raise ConfigError(f"{name} expects true or false, got {value!r}")
    if kind in ("int", "float") and isinstance(value, str) and (not value.isascii() or "_" in value):
        # int() and float() also take '٢٣' (Arabic-Indic digits) and '2_0' (digit groups): a value that reads
        # as another number than it looks, refused as names are (name_problem)
        raise ConfigError(f"{name} expects a {kind} written with ASCII digits 0-9 and no '_' (e.g. 97, 1e-3), "
                          f"got {_shown(value)}")
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
    except (TypeError, ValueError, OverflowError):  # OverflowError: float(10 ** 400) from a JSON file
        raise ConfigError(f"{name} expects a {kind}, got {_shown(value)}") from None


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to one short line (a value read from a file may be megabytes long)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def physical_memory_bytes() -> int | None:
    """This machine's RAM; None where unknown."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def loading_memory_bytes(config: Config) -> int:
    """Memory to build ``config``'s model and evaluate it on every pair (what loading and analysing take): the
    float32 weights twice (the file's tensors and the model's) plus ``estimated_memory_bytes``'s activations."""
    weights = 4 * config.parameter_count
    return config.estimated_memory_bytes() - (4 + (config.grokfast_lambda > 0) + 1) * weights + 2 * weights


MAX_CONFIG_FILE_BYTES = 1 << 20  # a config.json is ~1.5 KB; a bigger one is not ours (and is not read whole)


def config_file(path, source: str) -> Config:
    """``stored_config`` of a ``config.json`` file: at most ``MAX_CONFIG_FILE_BYTES``, UTF-8 JSON."""
    import json
    from pathlib import Path

    path = Path(path)
    if path.stat().st_size > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"{source} is {path.stat().st_size:,} bytes; a config is at most {MAX_CONFIG_FILE_BYTES:,}")
    try:
        values = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; RecursionError: [[[[...
        raise ConfigError(f"{source} is not JSON: {' '.join(str(exc).split())[:100]}") from None
    return stored_config(values, source)


def stored_config(values: Any, source: str, available: int | None = -1) -> Config:
    """A config read from a file someone else wrote (a run's or a logged model's ``config.json``, a checkpoint's
    config), checked as a whole before anything is built from it: a JSON object, of known fields, with in-domain
    values (``Config.validate``), whose model fits this machine's memory (``available`` bytes; default: its RAM).
    ``source`` names the file in the one-line ``ConfigError``."""
    if not isinstance(values, dict):
        kind = {type(None): "null", bool: "a boolean", str: "a string", list: "a list", int: "a number",
                float: "a number"}.get(type(values), type(values).__name__)
        raise ConfigError(f"{source} is {kind}, not an object of config fields")
    if not all(isinstance(key, str) for key in values):
        raise ConfigError(f"{source} has a field name that is not a string")
    try:
        config = Config.from_dict(values)
    except (ConfigError, TypeError) as exc:  # TypeError: e.g. a field whose value is an object
        raise ConfigError(f"{source}: {exc}") from None
    available = physical_memory_bytes() if available == -1 else available
    needed = loading_memory_bytes(config)
    if available is not None and needed > available:
        raise ConfigError(f"{source} describes a model of {config.parameter_count:,} parameters (p={config.p}, "
                          f"d_model={config.d_model}, d_mlp={config.d_mlp}, n_layers={config.n_layers}): about "
                          f"{needed / 2**30:.1f} GiB to load, this machine has {available / 2**30:.1f} GiB")
    return config


MAX_NAME_CHARS = 250


def name_problem(name: Any) -> str | None:
    """Why an experiment, run or study name is refused (a phrase), or None. A name is printable text: no control
    characters (they break the one-line output and terminals), digits only ASCII 0-9 (a name with the Arabic-Indic
    '٣' looks like one with '3' and sorts apart from it), other letters of any script are fine, at most 250
    characters."""
    import unicodedata

    if not isinstance(name, str) or not name.strip():
        return f"must be a non-empty string, got {name!r}"
    if len(name) > MAX_NAME_CHARS:
        return f"is {len(name)} characters long; at most {MAX_NAME_CHARS}"
    for char in name:
        category = unicodedata.category(char)
        if category.startswith("C"):
            return f"contains the control character {char!r}"
        if category == "Nd" and not "0" <= char <= "9":
            return f"contains the non-ASCII digit {char!r} ({unicodedata.name(char, '?')}); use 0-9"
    return None


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
    # Power et al. 2022, "Grokking: generalization beyond overfitting on small algorithmic datasets": its headline
    # task x / y mod 97 (b != 0) on 50 % of the pairs (Fig. 1). Sources: openai/grok grok/training.py (n_layers 2,
    # n_heads 4, d_model 128, dropout 0, non_linearity relu, warmup_steps 10, max_lr 1e-3, CustomAdamW betas
    # (0.9, 0.98)), grok/transformer.py (FFN 4 x d_model, LayerNorm), grok/data.py (batch min(512, n_train / 2)
    # = 512 here, reshuffled every epoch, last batch shorter), and the paper's "AdamW, weight decay 1" for most
    # experiments (quoted in ironjr/grokfast main.py; grok's own --weight_decay default is 0).
    "power2022": dict(p=97, operation="div", train_frac=0.5, n_layers=2, d_model=128, n_heads=4, d_mlp=512,
                      normalization="ln", activation="relu", optimizer="adamw", lr=1e-3, weight_decay=1.0,
                      beta1=0.9, beta2=0.98, lr_schedule="warmup", warmup_steps=10, batch_size=512,
                      train_metrics_from_batches=True, max_steps=100_000, eval_every=100, checkpoint_every=5000),
    # Power et al. 2022's Figure 1 itself (x / y mod 97, 50 %): "Adam optimizer with no weight decay" and a budget of
    # 10^6 optimization steps (the paper's appendix A.1.2, last paragraph; openai/grok's --weight_decay default 0;
    # Sea-Snell/grokking issue #4). Everything else as `power2022` (the appendix's default setting, AdamW wd 1).
    # Our "adam" puts weight decay in the gradient (L2); at weight_decay 0 it is plain Adam.
    "power2022_fig1": dict(p=97, operation="div", train_frac=0.5, n_layers=2, d_model=128, n_heads=4, d_mlp=512,
                           normalization="ln", activation="relu", optimizer="adam", lr=1e-3, weight_decay=0.0,
                           beta1=0.9, beta2=0.98, lr_schedule="warmup", warmup_steps=10, batch_size=512,
                           train_metrics_from_batches=True, max_steps=1_000_000, eval_every=100,
                           checkpoint_every=50_000),
    # Lee et al. 2024, "Grokfast: accelerated grokking by amplifying slow gradients", its baseline command
    # (`python main.py`); the EMA run adds --grokfast-lambda 2 --weight-decay 0.005 (its README).
    # Source: ironjr/grokfast main.py: x * y mod 97 on half of the pairs, Decoder(dim 128, num_layers 2,
    # num_heads 4) with LayerNorm, a 4 x dim GELU MLP, torch.optim.Adam (its --optimizer default; weight decay
    # as L2) lr 1e-3, betas (0.9, 0.98), weight_decay 0, LambdaLR warm-up over 10 updates, batch_size 512
    # reshuffled every epoch (torch.split: the last batch shorter), --alpha 0.98 in the README's EMA command; its
    # README's criterion: 95 % validation accuracy.
    # eval_every 10 = one evaluation per epoch, as its loop does.
    "grokfast2024": dict(p=97, operation="mul", train_frac=0.5, n_layers=2, d_model=128, n_heads=4, d_mlp=512,
                         normalization="ln", activation="gelu", optimizer="adam", lr=1e-3, weight_decay=0.0,
                         beta1=0.9, beta2=0.98, lr_schedule="warmup", warmup_steps=10, batch_size=512,
                         grokfast_alpha=0.98, grokfast_lambda=0.0, generalization_threshold=0.95,
                         train_metrics_from_batches=True, max_steps=100_000, eval_every=10, checkpoint_every=1000),
    # Prieto et al. 2025, "Grokking at the edge of numerical stability": their 1-layer transformer on modular addition
    # (Figure 6's first three commands in run_main_experiments.sh: --use_transformer --train_fraction 0.4 --lr 0.001
    # --num_epochs 5000, full batch), the softmax baseline without weight decay. Sources (their repository):
    # utils.py parse_args (modulo 113, add_mod, AdamW, weight_decay 0, beta2 0.99, softmax_precision 32 -> our
    # loss softmax32, seed 42), utils.get_optimizer (AdamW betas (0.9, beta2)), utils.get_model (Transformer
    # d_model 128, 4 heads, 1 layer), models.py (torch's TransformerEncoderLayer: feed-forward 2048, ReLU,
    # LayerNorm). Their other runs: --orthogonal_gradients (our optimizer = "orthoadamw"), --weight_decay 1.5.
    # progress_every = their log_frequency 200, so the collapse fraction and the Fourier measures are read there.
    "prieto2025": dict(p=113, operation="add", train_frac=0.4, n_layers=1, d_model=128, n_heads=4, d_mlp=2048,
                       normalization="ln", activation="relu", optimizer="adamw", loss="softmax32", lr=1e-3,
                       weight_decay=0.0, beta1=0.9, beta2=0.99, seed=42, max_steps=5000, eval_every=50,
                       progress_every=200, checkpoint_every=1000),
}


def preset(name: str, **overrides: Any) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Config().replace(**PRESETS[name]).replace(**overrides)
