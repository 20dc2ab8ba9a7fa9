"""The run life cycle and the trial state machine, on real stores without a server: MLflow's SQLite store in a
temp dir and an in-memory Optuna study."""

from __future__ import annotations

import json
import os

import optuna
import pytest
import torch
from mlflow import MlflowClient

from grokking_tracked.config import preset
from grokking_tracked.study.spec import StudySpec
from grokking_tracked.study.trial import StudyContext, TrialPrunedStop, TrialRun, close_stale_trial_run
from grokking_tracked.tracking.names import to_mlflow
from grokking_tracked.tracking import TrackedRun, connect, run_experiment
from grokking_tracked.train import TrainResult

TINY = dict(p=23, d_model=32, d_mlp=64, max_steps=30, eval_every=10, checkpoint_every=0)


@pytest.fixture
def client(tmp_path):
    return connect(f"sqlite:///{tmp_path}/store/mlflow.db")


@pytest.fixture
def context(client):
    parent = TrackedRun.create(client, "lifecycle", run_name="parent")
    parent.end("FINISHED")
    return StudyContext(StudySpec(path="x.toml", name="s"), "s", "lifecycle", parent.run_id, client, progress=False)


def open_trial(context):
    study = optuna.create_study()
    trial = study.ask()
    return trial, TrialRun.open(context, trial, preset("default", **TINY))


def status_and_tags(client, run_id):
    run = client.get_run(run_id)
    return run.info.status, run.data.tags


RESULT = TrainResult(history=[], events=[{"event": "generalization", "step": 20}], final_step=30, train_seconds=1.0,
                     stop_reason="generalized")


def test_an_open_trial_run_is_running_under_its_parent(client, context):
    trial, trial_run = open_trial(context)
    assert trial_run.run.outbox.wait(60)  # params and tags travel through the run's outbox: read them once delivered
    status, tags = status_and_tags(client, trial_run.run.run_id)
    assert status == "RUNNING" and trial_run.state == "RUNNING"
    assert tags["optuna.trial_state"] == "RUNNING" and tags["optuna.trial_number"] == str(trial.number)
    assert tags["mlflow.parentRunId"] == context.parent_run_id and tags["grokking_tracked.role"] == "trial"
    assert trial.user_attrs["mlflow_run_id"] == trial_run.run.run_id
    assert client.get_run(trial_run.run.run_id).data.params["p"] == "23"


@pytest.mark.parametrize("end, status, state, tags", [
    (lambda r: r.complete(120.0, RESULT), "FINISHED", "COMPLETE", {"optuna.value": "120.0", "optuna.generalized": "true"}),
    (lambda r: r.prune(40), "KILLED", "PRUNED", {"optuna.pruned_step": "40"}),
    (lambda r: r.fail(ValueError("boom")), "FAILED", "FAIL", {"optuna.fail_reason": "ValueError: boom"}),
    (lambda r: r.fail(KeyboardInterrupt()), "KILLED", "FAIL", {}),
    (lambda r: r.stopped(TrialPrunedStop("p"), 50), "KILLED", "PRUNED", {"optuna.pruned_step": "50"}),
])
def test_each_end_sets_state_tag_and_run_status_once(client, context, end, status, state, tags):
    _, trial_run = open_trial(context)
    end(trial_run)
    trial_run.complete(1.0, RESULT)  # a second end changes nothing
    trial_run.fail(RuntimeError("late"))
    run_status, run_tags = status_and_tags(client, trial_run.run.run_id)
    assert (run_status, run_tags["optuna.trial_state"], trial_run.state) == (status, state, state)
    assert tags.items() <= run_tags.items()


def interrupt_delivery(trial_run, monkeypatch, signal_error):
    """The run's next wait for delivery is interrupted (``signal_error``: Ctrl-C or SIGTERM), and the tags queued
    before it are never delivered: the interrupt came first."""
    outbox = trial_run.run.outbox
    assert outbox.wait(60)
    monkeypatch.setattr(outbox, "set_tags", lambda tags: None)

    def interrupted(*args, **kwargs):
        raise signal_error()

    monkeypatch.setattr(outbox, "wait", interrupted)


def test_an_interrupt_while_delivering_the_end_still_leaves_the_trial_state_on_the_run(client, context, monkeypatch):
    """Ctrl-C reaches a worker while it waits for its trial's last operations: the run is ended KILLED directly,
    and its state tag goes with that status, not with the queue left behind (CI saw KILLED beside RUNNING)."""
    _, trial_run = open_trial(context)
    interrupt_delivery(trial_run, monkeypatch, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        trial_run.fail(KeyboardInterrupt())
    status, tags = status_and_tags(client, trial_run.run.run_id)
    assert (status, tags["optuna.trial_state"]) == ("KILLED", "FAIL")


def test_an_interrupt_while_delivering_a_completed_trial_tags_it_failed(client, context, monkeypatch):
    """SIGTERM while a finished trial's run is delivered: the run ends KILLED and Optuna fails the trial, so its
    state tag says FAIL, not the COMPLETE it was about to send (CI saw KILLED beside COMPLETE)."""
    _, trial_run = open_trial(context)
    interrupt_delivery(trial_run, monkeypatch, SystemExit)
    with pytest.raises(SystemExit):
        trial_run.complete(120.0, RESULT)
    status, tags = status_and_tags(client, trial_run.run.run_id)
    assert (status, tags["optuna.trial_state"], trial_run.state) == ("KILLED", "FAIL", "FAIL")


def test_leaving_the_block_by_an_error_fails_the_trial(client, context):
    _, trial_run = open_trial(context)
    with pytest.raises(ZeroDivisionError):
        with trial_run:
            1 / 0
    assert status_and_tags(client, trial_run.run.run_id)[0] == "FAILED" and trial_run.state == "FAIL"


def test_a_stale_trials_run_is_closed_failed_and_a_finished_one_left_alone(client, context):
    study = optuna.create_study()
    trials = [study.ask() for _ in range(2)]
    runs = [TrialRun.open(context, trial, preset("default", **TINY)) for trial in trials]
    runs[1].complete(5.0, RESULT)
    frozen = {t.number: t for t in study.get_trials()}
    assert close_stale_trial_run(client, frozen[trials[0].number], "heartbeat stale") is True
    assert close_stale_trial_run(client, frozen[trials[1].number], "heartbeat stale") is False
    status, tags = status_and_tags(client, runs[0].run.run_id)
    assert status == "FAILED" and tags["optuna.trial_state"] == "FAIL" and tags["optuna.fail_reason"] == "heartbeat stale"
    assert status_and_tags(client, runs[1].run.run_id)[0] == "FINISHED"


def test_run_experiment_leaves_the_process_as_it_found_it(tmp_path, monkeypatch):
    """Threads, environment and the current directory are the caller's: a store given as sqlite:///elsewhere keeps
    its artifacts beside its database."""
    # Libraries set a variable of their own at first use (torch's TORCHINDUCTOR_CACHE_DIR, MLflow's telemetry
    # session): a first run in another store lets them, then the process must stay exactly as it is.
    run_experiment(preset("default", **TINY), tracking_uri=f"sqlite:///{tmp_path}/warm-up/mlflow.db", progress=False)
    workdir = tmp_path / "notebook"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    torch.set_num_threads(2)
    environment = dict(os.environ)
    store = tmp_path / "store"
    outcome = run_experiment(preset("default", **TINY), tracking_uri=f"sqlite:///{store}/mlflow.db", progress=False)
    assert torch.get_num_threads() == 2
    assert dict(os.environ) == environment
    assert not any(workdir.iterdir())
    run = MlflowClient(f"sqlite:///{store}/mlflow.db").get_run(outcome.run_id)
    artifacts = store / "artifacts" / "grokking" / outcome.run_id / "artifacts"
    assert run.info.artifact_uri == artifacts.as_uri()
    assert (artifacts / "config.json").is_file() and (artifacts / "figures" / "learning_curves.png").is_file()


def test_live_progress_measures_are_metrics_and_the_key_frequencies_a_tag(tmp_path):
    """A run with progress_every logs Nanda's measures like any other metric, at the readings' steps, and the current
    key frequencies as a tag."""
    config = preset("default", p=23, d_model=32, d_mlp=64, train_frac=0.5, max_steps=60, eval_every=10,
                    progress_every=20, checkpoint_every=0)
    outcome = run_experiment(config, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", progress=False)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for key in ("restricted_loss", "excluded_loss", "gini_embedding", "gini_neuron_logit", "total_weight_norm",
                "n_key_frequencies"):
        assert [m.step for m in client.get_metric_history(outcome.run_id, to_mlflow(key))] == [0, 20, 40, 60], key
    tags = client.get_run(outcome.run_id).data.tags
    assert isinstance(json.loads(tags["grokking_tracked.key_frequencies"]), list)
    assert int(tags["grokking_tracked.key_frequencies_step"]) in (0, 20, 40, 60)
