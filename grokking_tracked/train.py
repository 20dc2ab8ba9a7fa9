"""The training loop: AdamW on the full batch or on shuffled minibatches (``batch_size``), device-resident
data, no tracking imports.

Between evaluations the loop never reads a value back to the host: the loss stays a device tensor,
evaluation metrics are gathered into one tensor and read with a single ``tolist()``. Everything a
tracker, a study or a notebook wants arrives through ``Callback`` methods.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from .checkpoints import checkpoint_state  # the format lives in the core checkpoint module
from .config import Config, ConfigError, TrainingStopped  # noqa: F401 - beside the user-facing errors
from .data import MinibatchSampler, ModularData, curriculum_order, make_dataset, sampler_seed
from .detect import GrokDetector, detector_for, step_of
from . import fastpath
from .measures import ProgressMeasures
from .metrics import (EVAL_METRICS, cross_entropy_high_precision, per_example_loss, split_metrics,
                      weight_and_grad_norms)
from .model import GrokkingTransformer
from .optim import GrokfastEMA, make_optimizer, make_scheduler, weight_decay_at
from .stability import STABILITY_METRICS, stability_measures, training_loss_per_example

THREADS_ENV = "GROKKING_TORCH_THREADS"
# Why a training ended: it generalised (and trained its stop margin), it used its step budget, or a callback
# stopped it on purpose (TrainingStopped, e.g. a pruned Optuna trial; lockstep members only: Trainer raises).
STOP_REASONS = ("generalized", "max_steps", "stopped")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:  # e.g. an index past int64 ("cuda:99999999999999999999")
        raise ConfigError(f"device {name!r}: {' '.join(str(exc).split())[:120]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} asked for, but this torch build has no MPS support")
    return device


def total_memory_bytes(device: torch.device) -> int | None:
    """Memory of the device training runs on (physical RAM for the CPU); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_runnable(config: Config) -> torch.device:
    """The device ``config`` trains on, after refusing (one line) a device this machine lacks or a size that
    cannot fit in its memory: called before any run or study is created."""
    device = resolve_device(config.validate().device)
    needed, available = config.estimated_memory_bytes(), total_memory_bytes(device)
    if available is not None and needed > available:
        raise ConfigError(f"p={config.p}, d_model={config.d_model}, d_mlp={config.d_mlp} needs about "
                          f"{needed / 2**30:.1f} GiB while training; {device.type} has {available / 2**30:.1f} GiB")
    return device


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Multiply-adds per training step below which a lone run keeps one thread (benchmarks/speed.py --only threads). On an
# idle 2-core machine two threads gained at every size (`default` ~55 M: 1.35x, `seed` ~220 M: 1.48x, `nanda2023`
# ~810 M: 1.65x); with other jobs on the cores they collapsed ~20x. The small `default` (the README's first command)
# does not risk that collapse for its small gain.
MIN_STEP_WORK_FOR_THREADS = 100_000_000


def step_work(config: Config) -> int:
    """Rough multiply-adds of one full-batch training step: the training examples times the weights each meets."""
    n_train = round(config.train_frac * config.p ** 2)
    return n_train * config.d_model * (2 * config.d_mlp + config.p + 4 * config.d_model) * config.n_layers


def default_threads(device: torch.device, config: Config | None = None, lone: bool = False) -> int | None:
    """torch intra-op threads for training: $GROKKING_TORCH_THREADS if set; else, on the CPU, every available core
    for a ``lone`` training (``run``: nothing else of ours wants the cores) whose step is big enough to gain, and 1
    otherwise (a study runs one worker per core; a library call without a choice keeps to one core; a small model's
    threads wait on each other more than they compute); None off the CPU (leave as is)."""
    threads = os.environ.get(THREADS_ENV)
    if threads:
        return int(threads)
    if device.type != "cpu":
        return None
    if lone and (config is None or step_work(config) >= MIN_STEP_WORK_FOR_THREADS):
        return available_cores()
    return 1


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op thread count for the block only; the caller's setting is restored afterwards."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(before)


class TrainingState(Protocol):
    """What callbacks see of a training: a ``Trainer``, or one member of a ``LockstepTrainer``."""

    config: Config
    model: GrokkingTransformer
    detector: GrokDetector
    history: list[tuple[int, dict[str, float]]]
    step: int
    device: torch.device
    threads: int | None

    def state_dict(self) -> dict[str, Any]: ...


class Callback:
    """Hooks a tracker, a study or a notebook can implement; every method is optional.

    ``run`` is the ``Trainer`` (or the ``LockstepTrainer`` member) being trained. A callback may raise
    ``TrainingStopped`` to end training early; ``on_train_stopped`` then reports how it ended."""

    def on_train_start(self, run: TrainingState) -> None: ...

    def on_eval(self, run: TrainingState, step: int, metrics: dict[str, float], events: list[dict]) -> None: ...

    def on_checkpoint(self, run: TrainingState, step: int, reasons: list[str]) -> None: ...

    def on_train_end(self, run: TrainingState, result: "TrainResult") -> None: ...

    def on_train_stopped(self, run: TrainingState, error: BaseException) -> None:
        """Training ended by an exception: a callback's TrainingStopped, an error, Ctrl-C or SIGTERM."""


@dataclass
class TrainResult:
    history: list[tuple[int, dict[str, float]]]
    events: list[dict]
    final_step: int
    train_seconds: float
    stop_reason: str  # one of STOP_REASONS

    def step_of(self, event: str) -> int | None:
        return step_of(self.events, event)

    @property
    def grokked(self) -> bool:
        return self.step_of("generalization") is not None



def planned_stop(config: Config, detector: GrokDetector) -> int:
    """The step training ends at: max_steps, or, with stop_on_grok, stop_margin steps after the ``stop_after``
    event (generalisation; or the end of clean-up, for the nanda2023 preset)."""
    stop_event = detector.step_of(config.stop_after)
    if config.stop_on_grok and stop_event is not None:
        return min(config.max_steps, stop_event + config.stop_margin)
    return config.max_steps


def checkpoint_reasons(config: Config, step: int, events: list[dict], final: bool) -> list[str]:
    """Why a checkpoint is due after ``step`` (empty: none): a detection event fired, the periodic interval, the end."""
    reasons = [event["event"] for event in events]
    if config.checkpoint_every and step % config.checkpoint_every == 0:
        reasons.append("periodic")
    if final:
        reasons.append("final")
    return reasons


class Trainer:
    """Trains one model. ``threads``: torch intra-op threads while training (default: ``default_threads``);
    the caller's setting is restored when ``train()`` returns."""

    def __init__(self, config: Config, callbacks: list[Callback] | tuple = (), progress: bool = True,
                 data: ModularData | None = None, threads: int | None = None):
        self.config = config.validate()
        self.callbacks = list(callbacks)
        self.progress = progress
        self.device = resolve_device(config.device)
        self.threads = threads if threads is not None else default_threads(self.device)
        self.data = (data or make_dataset(config)).to(self.device)
        self.model = GrokkingTransformer(config).to(self.device, getattr(torch, config.dtype))
        self.optimizer = make_optimizer(self.model, config, self.device)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.detector = detector_for(config)
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
        # train_metrics_from_batches: the sums of the losses and of the correct answers of the batches since the last
        # evaluation, on the device (read with the evaluation's one host sync), and how many examples they hold
        self._batch_sums = (torch.zeros(2, dtype=torch.float64, device=self.device)
                            if config.train_metrics_from_batches else None)
        self._batch_examples = 0
        # batch_size >= the train set is the full-batch loop itself (no shuffle), so it is bit-for-bit full batch.
        self.sampler = (MinibatchSampler(self._n_train, config.batch_size, sampler_seed(config.seed))
                        if 0 < config.batch_size < self._n_train else None)
        self._eval_train_mask = torch.arange(len(self._eval_labels), device=self.device) < self._n_train
        # Experimental (GROKKING_CUDA_GRAPH=1, CUDA only): replay the whole step as one CUDA graph.
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_loss: torch.Tensor | None = None
        self._graph_capture_at = self._cuda_graph_start() if os.environ.get("GROKKING_CUDA_GRAPH") == "1" else None

    # ------------------------------------------------------------------ one step, one evaluation
    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of ``config.loss`` (stability.py); the default is the float64 softmax cross-entropy."""
        if self.config.loss == "softmax":
            return cross_entropy_high_precision(logits, labels)
        return training_loss_per_example(logits, labels, self.config.loss).mean()

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
                or self.sampler is not None or self._batch_sums is not None
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
                loss = self.loss(self.model(self._train_tokens, last_only=True), self._train_labels)
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
        if self.sampler is not None:
            index = self.sampler.next_indices().to(self.device)
            tokens, labels = self._train_tokens[index], self._train_labels[index]
        else:
            n = self.active_train_examples(self.step)
            tokens, labels = self._train_tokens[:n], self._train_labels[:n]
        loss, logits = self._loss_and_grads(tokens, labels)
        if self._batch_sums is not None:  # the batch's own forward, before its update: as the papers' loops
            with torch.no_grad():  # loss/train is the float64 softmax cross-entropy whatever the training loss
                batch_loss = (loss.detach() if self.config.loss == "softmax"
                              else cross_entropy_high_precision(logits.detach(), labels))
                self._batch_sums[0] += batch_loss * len(labels)
                self._batch_sums[1] += (logits.argmax(-1) == labels).sum()
                self._batch_examples += len(labels)
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

    def _loss_and_grads(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss and last-position logits; every parameter's ``.grad`` set to the loss's gradient."""
        if fastpath.enabled() and fastpath.supports(self.model):  # same gradients, ~0.6x the CPU time
            return fastpath.loss_and_grads(self.model, tokens, labels, return_logits=True)
        # fastpath.lean_last_logits: the model's function without hooks and without what the loss does not read
        logits = (fastpath.lean_last_logits(self.model, tokens) if fastpath.enabled()
                  else self.model(tokens, last_only=True))
        loss = self.loss(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, logits

    def _last_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        if fastpath.enabled():  # the same logits, no hooks and no autograd bookkeeping
            return fastpath.last_logits(self.model, tokens)
        return self.model(tokens, last_only=True)

    @torch.no_grad()
    def evaluate(self, stability: bool = False) -> dict[str, float]:
        """Loss and accuracy on the whole train and test sets, weight and last-gradient norms: one host sync.
        With ``train_metrics_from_batches`` (and a batch trained since the last evaluation) only the test set is
        evaluated; train loss and accuracy are those of the batches trained since the last evaluation.
        ``stability``: also the STABILITY_METRICS, from the training pairs' logits and the last step's gradients,
        in the same sync."""
        train_logits = None
        if self._batch_sums is not None and self._batch_examples:
            logits = self._last_logits(self.data.test_tokens)
            test_labels = self.data.test_labels
            split = torch.cat([self._batch_sums / self._batch_examples,
                               torch.stack([per_example_loss(logits, test_labels).mean(),
                                            (logits.argmax(-1) == test_labels).to(torch.float64).mean()])])
            self._batch_sums = torch.zeros_like(self._batch_sums)
            self._batch_examples = 0
            if stability:  # the progress cadence reads every training pair, as without batch metrics
                train_logits = self._last_logits(self.data.train_tokens)
        else:
            logits = self._last_logits(self._eval_tokens)
            split = split_metrics(logits, self._eval_labels, self._eval_train_mask)
            train_logits = logits[: self._n_train]
        parameters = list(self.model.parameters())
        parts = [split, weight_and_grad_norms(parameters)]
        if stability:
            parts.append(stability_measures(train_logits, parameters,
                                            getattr(self.optimizer, "last_nlm_cosine", None)))
        values = torch.cat(parts).tolist()
        metrics = dict(zip(EVAL_METRICS + (STABILITY_METRICS if stability else ()), values))
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = checkpoint_state(self.config, self.step, self.model, self.optimizer.state_dict(), self.detector,
                                 None if self.scheduler is None else self.scheduler.state_dict(),
                                 None if self.grokfast is None else self.grokfast.ema,
                                 None if self.sampler is None else self.sampler.state())
        if self._batch_sums is not None:  # a checkpoint between evaluations continues the same window
            state["batch_metrics"] = {"sums": self._batch_sums.clone(), "examples": self._batch_examples}
        return state

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
        if self.sampler is not None and state.get("sampler") is not None:
            self.sampler.load_state(state["sampler"])
        if self._batch_sums is not None and state.get("batch_metrics") is not None:
            self._batch_sums = state["batch_metrics"]["sums"].to(self.device)
            self._batch_examples = int(state["batch_metrics"]["examples"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(state["step"])

    # ------------------------------------------------------------------ the loop
    def _emit(self, name: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, name)(self, *args)

    def _evaluate_and_emit(self) -> list[dict]:
        progress_due = (self.progress_measures is not None
                        and self.step % self.config.progress_every < self.config.eval_every)
        metrics = self.evaluate(stability=progress_due)
        if progress_due:
            metrics.update(self.progress_measures(self.model))
        self.history.append((self.step, metrics))
        events = self.detector.update(self.step, metrics)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metrics["train_loss"])
        self._emit("on_eval", self.step, metrics, events)
        return events

    def train(self) -> TrainResult:
        with torch_threads(self.threads):
            try:
                return self._train()
            except BaseException as error:
                self._emit("on_train_stopped", error)
                raise

    def _train(self) -> TrainResult:
        config = self.config
        self._emit("on_train_start")
        bar = tqdm(total=config.max_steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, desc="training", leave=False)
        started = time.perf_counter()
        stop_at = planned_stop(config, self.detector)
        if self.step == 0:
            self._evaluate_and_emit()
            self._emit("on_checkpoint", 0, ["initial"])  # analysis measures weight evolution from the start
        try:
            while self.step < stop_at:
                self.train_step()
                bar.update(1)
                events = []
                if self.step % config.eval_every == 0 or self.step == stop_at:
                    events = self._evaluate_and_emit()
                    metrics = self.history[-1][1]
                    bar.set_postfix(train_acc=f"{metrics['train_acc']:.3f}", test_acc=f"{metrics['test_acc']:.3f}",
                                    refresh=False)
                    stop_at = min(stop_at, planned_stop(config, self.detector))
                reasons = checkpoint_reasons(config, self.step, events, final=self.step == stop_at)
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
