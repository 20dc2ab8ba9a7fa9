"""A study's trials K at a time: ``study.ask()`` K trials, train them in ONE ``LockstepTrainer``, ``study.tell()`` each.

Every trial is still its own MLflow child run, created, tagged, logged and ended exactly as on the one-by-one
path (``Objective``): the same helpers build its config, tags and objective value, and the same ``MlflowTracker``
logs it, through ``ModelView`` -- the one model of the lockstep trainer that the tracker expects a ``Trainer`` to be.
A pruned trial stops in the stack (``trainer.stop(k, "pruned")``) while the others go on.
"""

from __future__ import annotations

import contextlib
import time
import warnings

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState

from .lockstep import SHARED_FIELDS, LockstepCallback, LockstepTrainer, check_compatible
from .study import (MAX_CONSECUTIVE_FAILURES, StudyError, StudySpec, TrialCallback, TrialPrunedStop, count_finished,
                    complete_tags, tag_trial_run, trial_config, trial_run_tags, trial_value)
from .tracking import MlflowTracker, connect, create_config_run, end_run, status_for


def check_lockstep_spec(spec: StudySpec) -> None:
    """Refuse, in one line and before anything is created, a spec whose trials cannot share one trainer."""
    shared = [p.name for p in spec.params if p.name in SHARED_FIELDS]
    if shared:
        raise StudyError(f"lockstep trials must share the model shape and task; the spec searches {', '.join(shared)}")
    base = spec.base_config()
    corners = [base.replace(**{p.name: v}) for p in spec.params for v in (p.choices or [p.low, p.high])]
    try:  # the search space's corners too: e.g. a searched grokfast_lambda fails here, not mid-study
        check_compatible([base, *corners])
    except ValueError as exc:
        raise StudyError(f"{spec.name}: {exc}") from None


class ModelView:
    """Model ``index`` of a LockstepTrainer with the attributes MlflowTracker and TrialCallback read of a Trainer."""

    def __init__(self, trainer: LockstepTrainer, index: int):
        self.trainer, self.index = trainer, index
        trial = trainer.trials[index]
        self.config, self.model, self.detector, self.history = trial.config, trial.model, trial.detector, trial.history

    @property
    def step(self) -> int:
        return self.trainer.step

    def state_dict(self) -> dict:
        return self.trainer.state_dict(self.index)


class _Member:
    """One trial of a batch: its Optuna trial, MLflow run, tracker and pruning callback; ``done`` once told."""

    def __init__(self, trial: optuna.Trial, spec: StudySpec, config, run_id: str, tracker: MlflowTracker):
        self.trial, self.config, self.run_id, self.tracker = trial, config, run_id, tracker
        self.callback = TrialCallback(trial, spec)
        self.checkpointed: int | None = None
        self.done = False


class _Batch(LockstepCallback):
    def __init__(self, study: optuna.Study, spec: StudySpec, client, members: list[_Member]):
        self.study, self.spec, self.client, self.members = study, spec, client, members

    def _checkpoint(self, view: ModelView, member: _Member, step: int, reasons: list[str]) -> None:
        if member.checkpointed != step:
            member.tracker.on_checkpoint(view, step, reasons)
            member.checkpointed = step

    def on_eval(self, trainer, index, step, metrics, events) -> None:
        member, view = self.members[index], ModelView(trainer, index)
        member.tracker.on_eval(view, step, metrics, events)
        every = member.config.checkpoint_every
        reasons = [e["event"] for e in events] + (["periodic"] if every and step % every == 0 else [])
        if step and reasons:  # as Trainer: on detection events and periodically (at evaluations here)
            self._checkpoint(view, member, step, reasons)
        try:
            member.callback.on_eval(view, step, metrics, events)
        except TrialPrunedStop:
            trainer.stop(index, "pruned")

    def on_model_end(self, trainer, index, result) -> None:
        member, view = self.members[index], ModelView(trainer, index)
        if result.stop_reason == "pruned":
            member.tracker.flush()
            member.tracker.close()
            tag_trial_run(self.client, member.run_id, "PRUNED",
                          **{"optuna.pruned_step": str(member.callback.pruned_at)})
            end_run(self.client, member.run_id, "KILLED")
            member.done = True
            self.study.tell(member.trial, state=TrialState.PRUNED)
            return
        self._checkpoint(view, member, result.final_step, ["final"])
        member.tracker.on_train_end(view, result)
        member.tracker.close()
        value = trial_value(member.trial, self.spec, member.config, result, member.callback.seconds_to_generalize)
        tag_trial_run(self.client, member.run_id, "COMPLETE", **complete_tags(value, result))
        end_run(self.client, member.run_id, "FINISHED")
        member.done = True
        self.study.tell(member.trial, value)

    def fail_open(self, exc: BaseException) -> None:
        """Every member not yet told: its run ends FAILED (KILLED on an interruption), its trial FAIL."""
        for member in self.members:
            if member.done:
                continue
            member.done = True
            try:
                try:
                    member.tracker.flush()
                finally:
                    member.tracker.close()
                    tag_trial_run(self.client, member.run_id, "FAIL")
                    end_run(self.client, member.run_id, status_for(exc))
            except Exception:
                pass  # the run may be unreachable (that may be why we failed); the trial must still be told
            finally:
                self.study._storage.set_trial_system_attr(member.trial._trial_id, "fail_reason",
                                                          f"{type(exc).__name__}: {exc}"[:1000])
                self.study.tell(member.trial, state=TrialState.FAIL)


def _start_batch(study: optuna.Study, spec: StudySpec, settings, client, k: int) -> tuple[list[_Member], list]:
    """Ask k trials and open their runs; on any error, what was asked is told FAIL and what was opened ends."""
    trials, members = [], []
    try:
        with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": we run it below
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(k):
                trials.append(study.ask())
        configs = [trial_config(spec, trial) for trial in trials]
        try:
            check_compatible(configs)
        except ValueError as exc:
            raise StudyError(f"lockstep batch: {exc}") from None
        for trial, config in zip(trials, configs):
            run_id = create_config_run(client, config, settings.experiment,
                                       f"{settings.study_name}-trial-{trial.number}", settings.parent_run_id,
                                       trial_run_tags(trial, settings.study_name))
            trial.set_user_attr("mlflow_run_id", run_id)
            members.append(_Member(trial, spec, config, run_id, MlflowTracker(client, run_id)))
    except BaseException as exc:
        batch = _Batch(study, spec, client, members)
        batch.fail_open(exc)
        for trial in trials[len(members):]:
            study.tell(trial, state=TrialState.FAIL)
        raise
    return members, configs


def optimize_lockstep(settings, spec: StudySpec, study: optuna.Study, k: int) -> None:
    """One worker in lockstep mode: batches of up to k trials until ``settings.n_trials`` have finished."""
    client = connect(settings.tracking_uri)
    deadline = time.monotonic() + settings.timeout if settings.timeout else None
    failed_batches = 0
    while (finished := count_finished(study)) < settings.n_trials:
        if deadline is not None and time.monotonic() >= deadline:
            return
        members, configs = _start_batch(study, spec, settings, client, min(k, settings.n_trials - finished))
        batch = _Batch(study, spec, client, members)
        with contextlib.ExitStack() as heartbeats:  # a killed worker's trials go stale and are retried
            for member in members:
                heartbeats.enter_context(get_heartbeat_thread(member.trial._trial_id, study._storage))
            try:
                trainer = LockstepTrainer(configs, [batch], progress=settings.progress)
                for member in members:
                    member.callback.on_train_start(None)
                trainer.train()
            except Exception as exc:
                batch.fail_open(exc)
                failed_batches += 1
                if failed_batches >= MAX_CONSECUTIVE_FAILURES:
                    raise StudyError(f"{failed_batches} lockstep batches in a row failed; stopping "
                                     f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
                continue
            except BaseException as exc:
                batch.fail_open(exc)
                raise
        failed_batches = 0
