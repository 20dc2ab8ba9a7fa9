"""Many trials at once: K models trained in lockstep in one process, each exactly as ``Trainer`` would.

Each trial has its own ``Config`` (lr, weight decay, train fraction, data seed, model seed, thresholds, budget);
they share the task and the architecture. Design:

- Each model's parameters stay separate leaf tensors, initialised by ``GrokkingTransformer(config)`` exactly as
  ``Trainer`` does, and each model is its own param group of one fused AdamW: per-model lr and weight decay are
  exact, and a model whose gradients are ``None`` is left untouched by the step.
- The forward stacks the active models' parameters and runs the ordinary ``GrokkingTransformer`` training path
  (``last_only=True``) under ``torch.func.vmap(functional_call(...))``: one batched computation for K models,
  no second implementation of the model to keep in sync.
- Different train fractions and data seeds: each model's training set is gathered from all p² pairs and padded
  to the largest; the loss is a weighted sum whose weights are 1/n_train on real examples, 0 on padding, so
  each model's gradient is the gradient of its own mean loss.
- Evaluation: every active model on all pairs at once, per-model train/test metrics from membership masks,
  read back with ONE host sync; per-model histories and ``GrokDetector`` events; a model stops on its own
  (generalised + stop_margin, its max_steps, or ``stop(k)`` e.g. a pruned Optuna trial) and leaves the stack.

Results are one ``TrainResult`` per model, so a study can log each as its own MLflow run.

    trainer = LockstepTrainer([preset("default", lr=lr, train_frac=f) for lr, f in grid], progress=False)
    results = trainer.train()          # list[TrainResult], in the order of the configs
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from .config import Config
from .data import all_pairs, make_dataset
from .detect import GrokDetector
from .model import GrokkingTransformer
from .train import CHECKPOINT_FORMAT, TrainResult, resolve_device, configure_threads

SHARED_FIELDS = ("p", "operation", "d_model", "n_layers", "n_heads", "d_mlp", "normalization", "device",
                 "eval_every")
METRIC_NAMES = ("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm", "grad_norm")


class LockstepCallback:
    """Per-model hooks; every method is optional. ``trainer.stop(index)`` ends one model (e.g. pruning)."""

    def on_eval(self, trainer: "LockstepTrainer", index: int, step: int, metrics: dict[str, float],
                events: list[dict]) -> None: ...

    def on_model_end(self, trainer: "LockstepTrainer", index: int, result: TrainResult) -> None: ...


def check_compatible(configs: Sequence[Config]) -> None:
    if not configs:
        raise ValueError("lockstep training needs at least one config")
    first = configs[0]
    for config in configs:
        config.validate()
        for name in SHARED_FIELDS:
            if getattr(config, name) != getattr(first, name):
                raise ValueError(f"lockstep trials must share {name!r}: {getattr(config, name)!r} != "
                                 f"{getattr(first, name)!r}")
        unsupported = [name for name, off in (("curriculum", False), ("lr_schedule", "constant"),
                                              ("wd_schedule", "constant"), ("grokfast_lambda", 0.0))
                       if getattr(config, name) != off]
        if unsupported:
            raise ValueError(f"lockstep training supports the plain AdamW loop only; set "
                             f"{', '.join(unsupported)} to their defaults or train this trial with Trainer")


@dataclass
class _Trial:
    config: Config
    model: GrokkingTransformer
    train_index: torch.Tensor  # (n_train,) positions in all_pairs order
    detector: GrokDetector
    stop_at: int
    history: list
    stopped: str | None = None  # stop reason once finished
    final_step: int = 0
    seconds: float = 0.0


class LockstepTrainer:
    def __init__(self, configs: Sequence[Config], callbacks: Sequence[LockstepCallback] = (), progress: bool = True):
        check_compatible(configs)
        self.configs = list(configs)
        self.callbacks = list(callbacks)
        self.progress = progress
        first = self.configs[0]
        self.device = resolve_device(first.device)
        configure_threads(self.device)
        self.eval_every = first.eval_every
        tokens, labels = all_pairs(first.p, first.operation)
        self.tokens, self.labels = tokens.to(self.device), labels.to(self.device)
        # Where each example of a trial's split sits in all_pairs order (make_dataset permutes all_pairs).
        code = tokens[:, 0] * first.p + tokens[:, 1]
        position = torch.full((first.p * first.p,), -1, dtype=torch.long)
        position[code] = torch.arange(len(code))

        self.trials: list[_Trial] = []
        for config in self.configs:
            data = make_dataset(config)
            train_index = position[data.train_tokens[:, 0] * first.p + data.train_tokens[:, 1]]
            self.trials.append(_Trial(
                config=config, model=GrokkingTransformer(config).to(self.device),
                train_index=train_index.to(self.device),
                detector=GrokDetector(config.memorization_threshold, config.generalization_threshold,
                                      config.onset_loss_drop),
                stop_at=config.max_steps, history=[]))
        self.optimizer = torch.optim.AdamW(
            [{"params": list(t.model.parameters()), "lr": t.config.lr, "weight_decay": t.config.weight_decay,
              "betas": (t.config.beta1, t.config.beta2)} for t in self.trials],
            fused=self.device.type in ("cpu", "cuda"))
        # The stand-in module whose structure functional_call uses; its own parameters are never read.
        self._shape_model = self.trials[0].model
        self._names = [name for name, _ in self._shape_model.named_parameters()]
        n_max = max(len(t.train_index) for t in self.trials)
        self._train_index = torch.zeros(len(self.trials), n_max, dtype=torch.long, device=self.device)
        self._train_weight = torch.zeros(len(self.trials), n_max, dtype=torch.float64, device=self.device)
        self._train_mask = torch.zeros(len(self.trials), len(self.tokens), dtype=torch.bool, device=self.device)
        for k, trial in enumerate(self.trials):
            n = len(trial.train_index)
            self._train_index[k, :n] = trial.train_index
            self._train_weight[k, :n] = 1.0 / n
            self._train_mask[k, trial.train_index] = True
        self._batch_cache: tuple[tuple[int, ...], Any] | None = None
        self.step = 0

    # ------------------------------------------------------------------ batched forward
    def active(self) -> list[int]:
        return [k for k, t in enumerate(self.trials) if t.stopped is None]

    def _stacked_params(self, active: list[int]) -> dict[str, torch.Tensor]:
        per_model = [dict(self.trials[k].model.named_parameters()) for k in active]
        return {name: torch.stack([params[name] for params in per_model]) for name in self._names}

    def _forward(self, params: dict[str, torch.Tensor], tokens: torch.Tensor, tokens_dim: int | None) -> torch.Tensor:
        def one(p, t):
            return functional_call(self._shape_model, p, (t,), {"last_only": True})
        return vmap(one, in_dims=(0, tokens_dim))(params, tokens)

    def _train_batch(self, active: list[int]):
        key = tuple(active)
        if self._batch_cache is None or self._batch_cache[0] != key:
            index = self._train_index[list(active)]
            self._batch_cache = (key, (self.tokens[index], self.labels[index], self._train_weight[list(active)]))
        return self._batch_cache[1]

    def train_step(self, active: list[int]) -> None:
        tokens, labels, weight = self._train_batch(active)
        logits = self._forward(self._stacked_params(active), tokens, 0)  # (A, n_max, p)
        log_probs = logits.to(torch.float64).log_softmax(dim=-1)  # float64 as cross_entropy_high_precision
        nll = -log_probs.gather(-1, labels[..., None]).squeeze(-1)
        loss = (nll * weight).sum()  # sum over models of each model's mean train loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1

    @torch.no_grad()
    def evaluate(self, active: list[int]) -> list[dict[str, float]]:
        """Metrics of every active model on the whole train and test sets: one host sync for all of them."""
        logits = self._forward(self._stacked_params(active), self.tokens, None)  # (A, P, p)
        log_probs = logits.to(torch.float64).log_softmax(dim=-1)
        losses = -log_probs.gather(-1, self.labels.expand(len(active), -1)[..., None]).squeeze(-1)
        correct = (logits.argmax(dim=-1) == self.labels).to(torch.float64)
        train = self._train_mask[active].to(torch.float64)
        test = 1.0 - train
        n_train, n_test = train.sum(-1), test.sum(-1)
        norms = []
        for k in active:
            params = list(self.trials[k].model.parameters())
            grads = [p.grad for p in params if p.grad is not None]
            weight_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params)))
            grad_norm = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads
                         else torch.zeros((), device=self.device))
            norms.append(torch.stack([weight_norm, grad_norm]))
        norms = torch.stack(norms).to(torch.float64)
        values = torch.stack([(losses * train).sum(-1) / n_train, (correct * train).sum(-1) / n_train,
                              (losses * test).sum(-1) / n_test, (correct * test).sum(-1) / n_test,
                              norms[:, 0], norms[:, 1]], dim=-1).tolist()
        out = []
        for k, row in zip(active, values):
            metrics = dict(zip(METRIC_NAMES, row))
            metrics["lr"] = self.optimizer.param_groups[k]["lr"]
            out.append(metrics)
        return out

    # ------------------------------------------------------------------ control
    def stop(self, index: int, reason: str = "stopped") -> None:
        """End model ``index`` at the current step (e.g. a pruned trial); it leaves the stack."""
        trial = self.trials[index]
        if trial.stopped is None:
            trial.stopped, trial.final_step = reason, self.step
            trial.seconds = time.perf_counter() - self._started
            self._emit("on_model_end", index, self.result(index))

    def result(self, index: int) -> TrainResult:
        trial = self.trials[index]
        return TrainResult(trial.history, list(trial.detector.events), trial.final_step if trial.stopped else self.step,
                           trial.seconds, trial.stopped or "running")

    def state_dict(self, index: int) -> dict[str, Any]:
        """Model ``index`` in ``Trainer.state_dict()``'s format (its own optimizer state, as a one-model AdamW)."""
        trial = self.trials[index]
        params = list(trial.model.parameters())
        group = {key: value for key, value in self.optimizer.param_groups[index].items() if key != "params"}
        state = {i: {name: value.clone() for name, value in self.optimizer.state[p].items()}
                 for i, p in enumerate(params) if p in self.optimizer.state}
        return {
            "format": CHECKPOINT_FORMAT, "config": trial.config.to_dict(), "step": trial.final_step or self.step,
            "model": trial.model.state_dict(),
            "optimizer": {"state": state, "param_groups": [{**group, "params": list(range(len(params)))}]},
            "scheduler": None, "detector": trial.detector.state(), "grokfast_ema": None,
            "rng": {"torch": torch.get_rng_state(), "cuda": []},
        }

    def _emit(self, name: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, name)(self, *args)

    def _evaluate_and_emit(self, active: list[int]) -> None:
        for k, metrics in zip(active, self.evaluate(active)):
            trial = self.trials[k]
            trial.history.append((self.step, metrics))
            events = trial.detector.update(self.step, metrics)
            if trial.config.stop_on_grok and any(e["event"] == "generalization" for e in events):
                trial.stop_at = min(trial.stop_at, self.step + trial.config.stop_margin)
            self._emit("on_eval", k, self.step, metrics, events)

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[TrainResult]:
        """Train every model until it stops; returns one TrainResult per config, in order."""
        self._started = time.perf_counter()
        horizon = max(t.config.max_steps for t in self.trials)
        bar = tqdm(total=horizon, disable=not self.progress, unit="step", dynamic_ncols=True,
                   desc=f"lockstep x{len(self.trials)}")
        try:
            self._evaluate_and_emit(self.active())
            while active := self.active():
                self.train_step(active)
                bar.update(1)
                due = [k for k in active if self.step % self.eval_every == 0 or self.step == self.trials[k].stop_at]
                if due:
                    self._evaluate_and_emit(due)
                for k in active:
                    trial = self.trials[k]
                    if trial.stopped is None and self.step >= trial.stop_at:
                        generalized = trial.detector.step_of("generalization") is not None
                        self.stop(k, "generalized" if generalized else "max_steps")
                if self.progress and due:
                    done = sum(t.detector.step_of("generalization") is not None for t in self.trials)
                    bar.set_postfix(active=len(self.active()), generalized=f"{done}/{len(self.trials)}", refresh=False)
        finally:
            bar.close()
        return [self.result(k) for k in range(len(self.trials))]


def train_lockstep(configs: Sequence[Config], callbacks: Sequence[LockstepCallback] = (),
                   progress: bool = True) -> list[TrainResult]:
    return LockstepTrainer(configs, callbacks, progress).train()
