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
- Evaluation: every active model on all pairs at once, per-model train/test metrics from membership masks
  (the same ``split_metrics`` as ``Trainer``), read back with ONE host sync; per-model histories and
  ``GrokDetector`` events.
- Each model is a ``LockstepMember`` that callbacks see exactly as they see a ``Trainer``: the same ``Callback``
  methods (start, eval, checkpoint, end, stopped), the same stop rule and checkpoint cadence (``planned_stop`` and
  ``checkpoint_reasons`` from train.py), and a ``state_dict()`` in the same checkpoint format. A member whose
  callback raises (``TrainingStopped`` for a pruned trial, or an error) stops alone and leaves the stack; the
  others go on.

    trainer = LockstepTrainer([preset("default", lr=lr, train_frac=f) for lr, f in grid], progress=False)
    results = trainer.train()          # list[TrainResult], in the order of the configs
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from .config import MODEL_SHAPE_FIELDS, TASK_FIELDS, Config
from .data import all_pairs, make_dataset
from .detect import GrokDetector, detector_for
from .metrics import EVAL_METRICS, per_example_loss, split_metrics, weight_and_grad_norms
from .model import GrokkingTransformer
from .train import (Callback, TrainResult, checkpoint_reasons, checkpoint_state, default_threads,
                    planned_stop, resolve_device, torch_threads)

# What every member of one stack must share: one task, one architecture, one device, one evaluation cadence.
SHARED_FIELDS = (*TASK_FIELDS, *MODEL_SHAPE_FIELDS, "activation", "device", "eval_every")


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
                                              ("wd_schedule", "constant"), ("grokfast_lambda", 0.0),
                                              ("progress_every", 0), ("stop_after", "generalization"),
                                              ("batch_size", 0), ("optimizer", "adamw"), ("loss", "softmax"),
                                              ("dtype", "float32"))
                       if getattr(config, name) != off]
        if unsupported:
            raise ValueError(f"lockstep training supports the plain full-batch AdamW loop only; set "
                             f"{', '.join(unsupported)} to their defaults or train this trial with Trainer")


@dataclass(eq=False)
class LockstepMember:
    """One model of the stack, with what callbacks read of a ``Trainer`` (config, model, detector, history, step,
    ``state_dict()``)."""

    trainer: "LockstepTrainer"
    index: int
    config: Config
    model: GrokkingTransformer
    train_index: torch.Tensor  # (n_train,) positions in all_pairs order
    detector: GrokDetector
    callbacks: list[Callback]
    history: list = field(default_factory=list)
    stopped: str | None = None  # stop reason once finished
    final_step: int = 0
    seconds: float = 0.0

    @property
    def step(self) -> int:
        return self.final_step if self.stopped else self.trainer.step

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    @property
    def threads(self) -> int | None:
        return self.trainer.threads

    @property
    def stop_at(self) -> int:
        return planned_stop(self.config, self.detector)

    def state_dict(self) -> dict[str, Any]:
        return self.trainer.state_dict(self.index)

    def result(self) -> TrainResult:
        return TrainResult(self.history, list(self.detector.events), self.step, self.seconds,
                           self.stopped or "running")


class LockstepTrainer:
    """``callbacks``: given to every member; ``member_callbacks[k]``: member k's own (e.g. its MLflow tracker).
    ``threads``: torch intra-op threads while training, restored afterwards (default: ``default_threads``)."""

    def __init__(self, configs: Sequence[Config], callbacks: Sequence[Callback] = (),
                 member_callbacks: Sequence[Sequence[Callback]] | None = None, progress: bool = True,
                 threads: int | None = None):
        check_compatible(configs)
        self.configs = list(configs)
        if member_callbacks is not None and len(member_callbacks) != len(self.configs):
            raise ValueError("member_callbacks needs one list per config")
        self.progress = progress
        first = self.configs[0]
        self.device = resolve_device(first.device)
        self.threads = threads if threads is not None else default_threads(self.device)
        self.eval_every = first.eval_every
        tokens, labels = all_pairs(first.p, first.operation)
        self.tokens, self.labels = tokens.to(self.device), labels.to(self.device)
        # Where each example of a trial's split sits in all_pairs order (make_dataset permutes all_pairs).
        code = tokens[:, 0] * first.p + tokens[:, 1]
        position = torch.full((first.p * first.p,), -1, dtype=torch.long)
        position[code] = torch.arange(len(code))

        self.members: list[LockstepMember] = []
        for k, config in enumerate(self.configs):
            data = make_dataset(config)
            train_index = position[data.train_tokens[:, 0] * first.p + data.train_tokens[:, 1]]
            own = list(member_callbacks[k]) if member_callbacks is not None else []
            self.members.append(LockstepMember(
                trainer=self, index=k, config=config, model=GrokkingTransformer(config).to(self.device),
                train_index=train_index.to(self.device), detector=detector_for(config),
                callbacks=[*callbacks, *own]))

        self.optimizer = torch.optim.AdamW(
            [{"params": list(t.model.parameters()), "lr": t.config.lr, "weight_decay": t.config.weight_decay,
              "betas": (t.config.beta1, t.config.beta2)} for t in self.members],
            fused=self.device.type in ("cpu", "cuda"))
        # The stand-in module whose structure functional_call uses; its own parameters are never read.
        self._shape_model = self.members[0].model
        self._names = [name for name, _ in self._shape_model.named_parameters()]
        n_max = max(len(t.train_index) for t in self.members)
        self._train_index = torch.zeros(len(self.members), n_max, dtype=torch.long, device=self.device)
        self._train_weight = torch.zeros(len(self.members), n_max, dtype=torch.float64, device=self.device)
        self._train_mask = torch.zeros(len(self.members), len(self.tokens), dtype=torch.bool, device=self.device)
        for k, trial in enumerate(self.members):
            n = len(trial.train_index)
            self._train_index[k, :n] = trial.train_index
            self._train_weight[k, :n] = 1.0 / n
            self._train_mask[k, trial.train_index] = True
        self._batch_cache: tuple[tuple[int, ...], Any] | None = None
        self.step = 0

    # ------------------------------------------------------------------ batched forward
    def active(self) -> list[int]:
        return [k for k, member in enumerate(self.members) if member.stopped is None]

    def _stacked_params(self, active: list[int]) -> dict[str, torch.Tensor]:
        per_model = [dict(self.members[k].model.named_parameters()) for k in active]
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
        loss = (per_example_loss(logits, labels) * weight).sum()  # sum over models of each model's mean train loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1

    @torch.no_grad()
    def evaluate(self, active: list[int]) -> list[dict[str, float]]:
        """Metrics of every active model on the whole train and test sets: one host sync for all of them."""
        logits = self._forward(self._stacked_params(active), self.tokens, None)  # (A, P, p)
        norms = torch.stack([weight_and_grad_norms(list(self.members[k].model.parameters())) for k in active])
        values = torch.cat([split_metrics(logits, self.labels, self._train_mask[active]), norms], dim=-1).tolist()
        out = []
        for k, row in zip(active, values):
            metrics = dict(zip(EVAL_METRICS, row))
            metrics["lr"] = self.optimizer.param_groups[k]["lr"]
            out.append(metrics)
        return out

    # ------------------------------------------------------------------ members
    def state_dict(self, index: int) -> dict[str, Any]:
        """Member ``index`` in ``Trainer.state_dict()``'s format (its own optimizer state, as a one-model AdamW)."""
        member = self.members[index]
        params = list(member.model.parameters())
        group = {key: value for key, value in self.optimizer.param_groups[index].items() if key != "params"}
        state = {i: {name: value.clone() for name, value in self.optimizer.state[p].items()}
                 for i, p in enumerate(params) if p in self.optimizer.state}
        optimizer_state = {"state": state, "param_groups": [{**group, "params": list(range(len(params)))}]}
        return checkpoint_state(member.config, member.step, member.model, optimizer_state, member.detector)

    def _emit(self, member: LockstepMember, name: str, *args: Any) -> bool:
        """Call one hook of a member's callbacks. An Exception (TrainingStopped for a pruned trial, or an error)
        stops that member alone; False then. KeyboardInterrupt / SystemExit end the whole training."""
        try:
            for callback in member.callbacks:
                getattr(callback, name)(member, *args)
        except Exception as error:  # noqa: BLE001 - one member's failure must not stop the others
            self._stop(member, "stopped", error)
            return False
        return True

    def _stop(self, member: LockstepMember, reason: str, error: BaseException | None = None) -> None:
        if member.stopped is not None:
            return
        member.stopped, member.final_step = reason, self.step
        member.seconds = time.perf_counter() - self._started
        if error is None:
            self._emit(member, "on_train_end", member.result())
        else:
            for callback in member.callbacks:
                try:
                    callback.on_train_stopped(member, error)
                except Exception:  # noqa: BLE001 - already ending this member; the others go on
                    pass

    def _evaluate_and_emit(self, active: list[int]) -> dict[int, list[dict]]:
        events_of = {}
        for k, metrics in zip(active, self.evaluate(active)):
            member = self.members[k]
            member.history.append((self.step, metrics))
            events_of[k] = member.detector.update(self.step, metrics)
            self._emit(member, "on_eval", self.step, metrics, events_of[k])
        return events_of

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[TrainResult]:
        """Train every model until it stops; returns one TrainResult per config, in order."""
        with torch_threads(self.threads):
            try:
                return self._train()
            except BaseException as error:
                for k in self.active():
                    self._stop(self.members[k], "stopped", error)
                raise

    def _train(self) -> list[TrainResult]:
        self._started = time.perf_counter()
        horizon = max(member.config.max_steps for member in self.members)
        bar = tqdm(total=horizon, disable=not self.progress, unit="step", dynamic_ncols=True,
                   desc=f"lockstep x{len(self.members)}", leave=False)
        try:
            for member in self.members:
                self._emit(member, "on_train_start")
            self._evaluate_and_emit(self.active())
            for k in self.active():
                self._emit(self.members[k], "on_checkpoint", 0, ["initial"])
            while active := self.active():
                self.train_step(active)
                bar.update(1)
                due = [k for k in active if self.step % self.eval_every == 0 or self.step == self.members[k].stop_at]
                events_of = self._evaluate_and_emit(due) if due else {}
                for k in active:
                    member = self.members[k]
                    if member.stopped is not None:
                        continue
                    final = self.step >= member.stop_at
                    reasons = checkpoint_reasons(member.config, self.step, events_of.get(k, []), final)
                    if reasons and not self._emit(member, "on_checkpoint", self.step, reasons):
                        continue
                    if final:
                        generalized = member.detector.step_of("generalization") is not None
                        self._stop(member, "generalized" if generalized else "max_steps")
                if self.progress and due:
                    done = sum(m.detector.step_of("generalization") is not None for m in self.members)
                    bar.set_postfix(active=len(self.active()), generalized=f"{done}/{len(self.members)}", refresh=False)
        finally:
            bar.close()
        return [member.result() for member in self.members]


def train_lockstep(configs: Sequence[Config], callbacks: Sequence[Callback] = (),
                   progress: bool = True) -> list[TrainResult]:
    return LockstepTrainer(configs, callbacks, progress=progress).train()
