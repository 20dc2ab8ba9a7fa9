"""A study's trials K at a time: ``study.ask()`` K trials, train them in ONE ``LockstepTrainer``, ``study.tell()``
each as it ends. Every trial is its own ``TrialRun`` with its own tracker and pruning callback, exactly as on the
one-by-one path; a pruned trial stops in the stack while the others go on."""

from __future__ import annotations

import contextlib
import time
import warnings

import optuna
from optuna.trial import TrialState

from ..lockstep import SHARED_FIELDS, LockstepTrainer, check_compatible
from ..tracking.tracker import MlflowTracker
from ..train import Callback, TrainResult
from .spec import StudyError, StudySpec
from .storage import grid_queue_empty, heartbeat, room_for_trials
from .trial import (FAIL_REASON_ATTR, PHASE_TAG, PruningCallback, StudyContext, SurplusTrial, TrialRun, phase_of,
                    skip_grid_duplicate, trial_config, trial_value)
from ..messages import short_error

MAX_CONSECUTIVE_FAILED_BATCHES = 3


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


class _TellOptuna(Callback):
    """The last callback of a member: ends its TrialRun and tells Optuna, as the member ends."""

    def __init__(self, study: optuna.Study, spec: StudySpec, trial: optuna.Trial, trial_run: TrialRun,
                 pruning: PruningCallback):
        self.study, self.spec, self.trial, self.trial_run, self.pruning = study, spec, trial, trial_run, pruning
        self.told = False

    def on_train_end(self, member, result: TrainResult) -> None:
        value = trial_value(self.trial, self.spec, member.config, result, self.pruning.seconds_to_generalize)
        self.trial_run.complete(value, result, {PHASE_TAG: phase_of(self.spec, member.config, result),
                                                **self.pruning.decision_tags()})
        self._tell(value)

    def on_train_stopped(self, member, error: BaseException) -> None:
        self.trial_run.stopped(error, self.pruning.pruned_at)
        self._tell(state=TrialState.PRUNED if self.trial_run.state == "PRUNED" else TrialState.FAIL)

    def fail_unstarted(self, error: BaseException) -> None:
        self.trial_run.fail(error)
        self._tell(state=TrialState.FAIL)

    def _tell(self, value=None, state: TrialState | None = None) -> None:
        if not self.told:
            self.told = True
            if self.trial_run.fail_reason:
                self.trial.set_user_attr(FAIL_REASON_ATTR, self.trial_run.fail_reason)
            self.study.tell(self.trial, value, state=state)


def _open_batch(study: optuna.Study, context: StudyContext, k: int) -> tuple[list, list[_TellOptuna]]:
    """Ask k trials and open their runs; on any error, what was asked is told FAIL and what was opened ends."""
    trials, members = [], []
    try:
        with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": see storage.heartbeat
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(k):
                trial = study.ask()
                try:
                    skip_grid_duplicate(context.spec, trial)  # a grid point held elsewhere, or none left
                except SurplusTrial:
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                trials.append(trial)
        if not trials:
            return [], []
        configs = [trial_config(context.spec, trial) for trial in trials]
        try:
            check_compatible(configs)
        except ValueError as exc:
            raise StudyError(f"lockstep batch: {exc}") from None
        for trial, config in zip(trials, configs):
            trial_run = TrialRun.open(context, trial, config)
            members.append(_TellOptuna(study, context.spec, trial, trial_run, PruningCallback(trial, context.spec)))
    except BaseException as error:
        for member in members:
            member.fail_unstarted(error)
        for trial in trials[len(members):]:
            study.tell(trial, state=TrialState.FAIL)
        raise
    return configs, members


def optimize_lockstep(study: optuna.Study, context: StudyContext, k: int, n_trials: int,
                      timeout: float | None = None) -> None:
    """One worker in lockstep mode: batches of up to k trials until ``n_trials`` have finished."""
    deadline = time.monotonic() + timeout if timeout else None
    failed_batches = 0
    while (room := room_for_trials(study, n_trials, deadline)) > 0:  # counts the trials running elsewhere too
        if deadline is not None and time.monotonic() >= deadline:
            return
        if context.spec.sampler == "grid" and grid_queue_empty(study):
            return  # every grid point is running or done
        configs, members = _open_batch(study, context, min(k, room))
        if not members:
            continue
        callbacks = [[MlflowTracker(m.trial_run.run, drawer=context.drawer), m.pruning, m] for m in members]
        with contextlib.ExitStack() as beats:  # a killed worker's trials go stale and are retried
            for member in members:
                beats.enter_context(heartbeat(study, member.trial))
            try:
                LockstepTrainer(configs, member_callbacks=callbacks, progress=context.progress,
                                threads=context.threads).train()
            except BaseException as error:
                for member in members:
                    if not member.told:
                        member.fail_unstarted(error)
                if not isinstance(error, Exception):
                    raise
                failed_batches += 1
                if failed_batches >= MAX_CONSECUTIVE_FAILED_BATCHES:
                    raise StudyError(f"{failed_batches} lockstep batches in a row failed; stopping "
                                     f"({type(error).__name__}: {short_error(error)})"
                                     ) from error
                continue
        failed_batches = 0
