"""The training loop: full-batch AdamW, device-resident data, no tracking imports.

Between evaluations the loop never reads a value back to the host: the loss stays a device tensor,
evaluation metrics are gathered into one tensor and read with a single ``tolist()``. Everything a
tracker, a study or a notebook wants arrives through ``Callback`` methods.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import Config
from .data import ModularData, curriculum_order, make_dataset
from .detect import GrokDetector
from .measures import ProgressMeasures
from .model import GrokkingTransformer, cross_entropy_high_precision

CHECKPOINT_FORMAT = 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")
    return device


def configure_threads(device: torch.device) -> None:
    """torch intra-op threads: GROKKING_TORCH_THREADS=N if set, else 1 on the CPU.

    This model's ops are small: on 2 cores one thread ran the default preset at 85 steps/s, two threads
    at 10-14 (the threads spin-wait on each other and collapse when any other process wants a core)."""
    threads = os.environ.get("GROKKING_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    elif device.type == "cpu":
        torch.set_num_threads(1)


class TrainingStopped(Exception):
    """Raised by a callback to end training on purpose before its budget (e.g. a pruned Optuna trial)."""


class Callback:
    """Hooks a tracker or notebook can implement; every method is optional."""

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_eval(self, trainer: "Trainer", step: int, metrics: dict[str, float], events: list[dict]) -> None: ...

    def on_checkpoint(self, trainer: "Trainer", step: int, reasons: list[str]) -> None: ...

    def on_train_end(self, trainer: "Trainer", result: "TrainResult") -> None: ...


@dataclass
class TrainResult:
    history: list[tuple[int, dict[str, float]]]
    events: list[dict]
    final_step: int
    train_seconds: float
    stop_reason: str  # "generalized" | "max_steps"

    def step_of(self, event: str) -> int | None:
        return next((e["step"] for e in self.events if e["event"] == event), None)

    @property
    def grokked(self) -> bool:
        return self.step_of("generalization") is not None


@dataclass
class GrokfastEMA:
    """Grokfast (Lee et al. 2024): amplify the slow gradient component, g <- g + lambda * EMA(g).

    No maintained library ships this filter as an optimizer hook; it is three foreach ops."""

    alpha: float
    lamb: float
    ema: list[torch.Tensor] | None = None

    def apply(self, grads: list[torch.Tensor]) -> None:
        if self.ema is None:
            self.ema = [g.detach().clone() for g in grads]
        else:
            torch._foreach_mul_(self.ema, self.alpha)
            torch._foreach_add_(self.ema, grads, alpha=1 - self.alpha)
        torch._foreach_add_(grads, self.ema, alpha=self.lamb)


def weight_decay_at(config: Config, step: int) -> float:
    """Weight-decay schedule (torch.optim has schedulers for lr only)."""
    if config.wd_schedule == "constant":
        return config.weight_decay
    t = min(1.0, step / max(1, config.wd_schedule_steps))
    if config.wd_schedule == "cosine":
        t = 0.5 * (1 - math.cos(math.pi * t))
    return config.weight_decay + t * (config.wd_final - config.weight_decay)


def make_optimizer(model: torch.nn.Module, config: Config, device: torch.device) -> torch.optim.AdamW:
    # fused AdamW runs one kernel per step for all parameters (CPU and CUDA, float32).
    return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                             weight_decay=config.weight_decay, fused=device.type in ("cpu", "cuda"))


def make_scheduler(optimizer: torch.optim.Optimizer, config: Config):
    if config.lr_schedule == "warmup":
        return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / max(1, config.warmup_steps),
                                                 total_iters=config.warmup_steps)
    if config.lr_schedule == "cyclic":
        half = max(1, config.cyclic_period // 2)
        return torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=config.lr * config.cyclic_min_ratio,
                                                 max_lr=config.lr, step_size_up=half, cycle_momentum=False)
    if config.lr_schedule == "plateau":  # stepped at evaluations with the train loss
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=config.plateau_factor,
                                                          patience=config.plateau_patience)
    return None


class Trainer:
    def __init__(self, config: Config, callbacks: list[Callback] | tuple = (), progress: bool = True,
                 data: ModularData | None = None):
        self.config = config.validate()
        self.callbacks = list(callbacks)
        self.progress = progress
        self.device = resolve_device(config.device)
        configure_threads(self.device)
        self.data = (data or make_dataset(config)).to(self.device)
        self.model = GrokkingTransformer(config).to(self.device)
        self.optimizer = make_optimizer(self.model, config, self.device)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.detector = GrokDetector(config.memorization_threshold, config.generalization_threshold,
                                     config.onset_loss_drop)
        self.grokfast = GrokfastEMA(config.grokfast_alpha, config.grokfast_lambda) if config.grokfast_lambda else None
        self.history: list[tuple[int, dict[str, float]]] = []
        self.step = 0
        self.progress_measures = (ProgressMeasures(config.p, config.operation, self.data.train_tokens, self.device)
                                  if config.progress_every else None)
        if config.curriculum:
            order = curriculum_order(self.data.train_tokens.cpu()).to(self.device)
            self._train_tokens, self._train_labels = self.data.train_tokens[order], self.data.train_labels[order]
        else:
            self._train_tokens, self._train_labels = self.data.train_tokens, self.data.train_labels
        self._eval_tokens = self.data.all_tokens
        self._eval_labels = torch.cat([self.data.train_labels, self.data.test_labels])
        self._n_train = len(self.data.train_labels)
        # Experimental (GROKKING_CUDA_GRAPH=1, CUDA only): replay the whole step as one CUDA graph.
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_loss: torch.Tensor | None = None
        self._graph_capture_at = self._cuda_graph_start() if os.environ.get("GROKKING_CUDA_GRAPH") == "1" else None

    # ------------------------------------------------------------------ one step, one evaluation
    def active_train_examples(self, step: int) -> int:
        if not self.config.curriculum:
            return self._n_train
        grow = min(1.0, step / max(1, self.config.curriculum_steps))
        frac = self.config.curriculum_start_frac + (1 - self.config.curriculum_start_frac) * grow
        return max(1, math.ceil(frac * self._n_train))

    def _cuda_graph_start(self) -> int | None:
        """The step at which the whole training step can be captured, or None where it cannot: every replay
        must do the same work with the same constants (full batch, constant lr and weight decay)."""
        c = self.config
        if (self.device.type != "cuda" or c.curriculum or c.grokfast_lambda or c.wd_schedule != "constant"
                or c.lr_schedule not in ("constant", "warmup")):
            return None
        return self.step + 3 + (c.warmup_steps if c.lr_schedule == "warmup" else 0)  # eager warm-up first

    def _capture_cuda_graph(self) -> None:
        """Capture forward, backward and the fused AdamW step (PyTorch's "whole network capture" recipe).
        Capturing records without executing, so the captured step is then replayed once. On failure training
        goes on eagerly."""
        try:
            torch.cuda.synchronize(self.device)
            self.optimizer.zero_grad(set_to_none=True)  # the graph owns the gradient tensors from here on
            for group in self.optimizer.param_groups:
                group["capturable"] = True  # fused AdamW keeps its step counters on the device already
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = cross_entropy_high_precision(self.model(self._train_tokens, last_only=True), self._train_labels)
                loss.backward()
                self.optimizer.step()
            self._graph, self._graph_loss = graph, loss
        except Exception as exc:  # noqa: BLE001 - any capture failure: fall back to the eager step
            warnings.warn(f"CUDA graph capture failed, training eagerly: {exc}")
            self._graph = None
            self.optimizer.zero_grad(set_to_none=True)
            for group in self.optimizer.param_groups:
                group["capturable"] = False
        self._graph_capture_at = None

    def train_step(self) -> torch.Tensor:
        if self._graph_capture_at is not None and self.step >= self._graph_capture_at:
            self._capture_cuda_graph()
        if self._graph is not None:
            self._graph.replay()
            if self.scheduler is not None:
                self.scheduler.step()  # past the warm-up: the lr it sets is the constant one captured
            self.step += 1
            return self._graph_loss
        if self._graph_capture_at is not None:  # warm-up before capture runs on a side stream (CUDA docs)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                loss = self._eager_step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            return loss
        return self._eager_step()

    def _eager_step(self) -> torch.Tensor:
        n = self.active_train_examples(self.step)
        logits = self.model(self._train_tokens[:n], last_only=True)
        loss = cross_entropy_high_precision(logits, self._train_labels[:n])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grokfast is not None:
            self.grokfast.apply([p.grad for p in self.model.parameters()])
        if self.config.wd_schedule != "constant":
            for group in self.optimizer.param_groups:
                group["weight_decay"] = weight_decay_at(self.config, self.step)
        self.optimizer.step()
        if self.scheduler is not None and self.config.lr_schedule != "plateau":
            self.scheduler.step()
        self.step += 1
        return loss

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on the whole train and test sets, weight and last-gradient norms: one host sync."""
        logits = self.model(self._eval_tokens, last_only=True)
        log_probs = logits.to(torch.float64).log_softmax(dim=-1)
        losses = -log_probs.gather(-1, self._eval_labels[:, None]).squeeze(-1)
        correct = (logits.argmax(dim=-1) == self._eval_labels).to(torch.float64)
        n = self._n_train
        params = list(self.model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        values = torch.stack([
            losses[:n].mean(), correct[:n].mean(), losses[n:].mean(), correct[n:].mean(),
            torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params))).to(torch.float64),
            torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).to(torch.float64) if grads else zero,
        ]).tolist()
        metrics = dict(zip(("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm", "grad_norm"), values))
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit; only tensors and plain containers (weights_only-safe)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "detector": self.detector.state(),
            "grokfast_ema": None if self.grokfast is None else self.grokfast.ema,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # a CUDA-graph run saved capturable=True; recaptured on demand
            group["capturable"] = False
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.detector.load_state(state["detector"])
        if self.grokfast is not None and state["grokfast_ema"] is not None:
            self.grokfast.ema = [t.to(self.device) for t in state["grokfast_ema"]]
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(state["step"])

    # ------------------------------------------------------------------ the loop
    def _emit(self, name: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, name)(self, *args)

    def _evaluate_and_emit(self) -> list[dict]:
        metrics = self.evaluate()
        if self.progress_measures is not None and self.step % self.config.progress_every < self.config.eval_every:
            metrics.update(self.progress_measures(self.model))
        self.history.append((self.step, metrics))
        events = self.detector.update(self.step, metrics)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metrics["train_loss"])
        self._emit("on_eval", self.step, metrics, events)
        return events

    def train(self) -> TrainResult:
        config = self.config
        self._emit("on_train_start")
        bar = tqdm(total=config.max_steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, desc="training")
        started = time.perf_counter()
        stop_at = config.max_steps
        stop_event = self.detector.step_of(config.stop_after)
        if config.stop_on_grok and stop_event is not None:
            stop_at = min(stop_at, stop_event + config.stop_margin)
        if self.step == 0:
            self._evaluate_and_emit()
            self._emit("on_checkpoint", 0, ["initial"])  # analysis measures weight evolution from the start
        try:
            while self.step < stop_at:
                self.train_step()
                bar.update(1)
                reasons = []
                if self.step % config.eval_every == 0 or self.step == stop_at:
                    events = self._evaluate_and_emit()
                    reasons += [e["event"] for e in events]
                    metrics = self.history[-1][1]
                    bar.set_postfix(train_acc=f"{metrics['train_acc']:.3f}", test_acc=f"{metrics['test_acc']:.3f}",
                                    refresh=False)
                    if config.stop_on_grok and any(e["event"] == config.stop_after for e in events):
                        stop_at = min(stop_at, self.step + config.stop_margin)
                if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    reasons.append("periodic")
                if self.step == stop_at:
                    reasons.append("final")
                if reasons:
                    self._emit("on_checkpoint", self.step, reasons)
        finally:
            bar.close()
        if self.step >= stop_at and (not self.history or self.history[-1][0] != self.step):
            self._evaluate_and_emit()  # resumed exactly at the end: make sure the last state is measured
        result = TrainResult(self.history, list(self.detector.events), self.step, time.perf_counter() - started,
                             "generalized" if self.detector.step_of("generalization") is not None else "max_steps")
        self._emit("on_train_end", result)
        return result
