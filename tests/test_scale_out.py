"""Scale-out: several `grokking-tracked study` invocations (as separate machines would start them) join one study
on a PostgreSQL Optuna storage (the URL form the README documents) and one real `mlflow server`."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

SPEC = """
[study]
name = "{name}"
experiment = "scale-out-test"
n_trials = 6
heartbeat_interval = 2
grace_period = 10

[task]
p = 23
d_model = 32
d_mlp = 64
max_steps = 60
eval_every = 10
checkpoint_every = 0

[search]
lr = {{ type = "float", low = 3e-3, high = 3e-2, log = true }}
train_frac = {{ type = "float", low = 0.4, high = 0.8 }}

[sampler]
name = "random"

[pruner]
name = "none"
"""


def test_four_invocations_finish_one_study_with_every_trial_once(tmp_path, postgres_url, mlflow_server):
    assert postgres_url.startswith("postgresql://")  # as documented: SQLAlchemy's default driver, psycopg 3
    spec = tmp_path / "scale.toml"
    spec.write_text(SPEC.format(name="scale_test"))
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "GROKKING_TORCH_THREADS": "1"}
    command = [sys.executable, "-m", "grokking_tracked", "study", str(spec), "--storage", postgres_url,
               "--tracking-uri", mlflow_server, "--workers", "1", "--no-progress"]
    processes = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=900) for p in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-2000:]

    trials = optuna.load_study(study_name="scale_test", storage=postgres_url).get_trials()
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    # --n-trials 6 means 6 across invocations; a trial asked beyond it at the same moment is a surplus FAIL, no run
    surplus = [t for t in trials if t.user_attrs.get("fail_reason", "").startswith("surplus")]
    assert len(finished) == 6 and len(finished) + len(surplus) == len(trials), [t.state for t in trials]
    trials = finished
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("scale-out-test")
    runs = client.search_runs([experiment.experiment_id], "tags.`optuna.study_name` = 'scale_test'")
    parents = [r for r in runs if r.data.tags.get("grokking_tracked.role") == "study"]
    children = [r for r in runs if r.data.tags.get("grokking_tracked.role") == "trial"]
    assert len(parents) == 1  # the four invocations found the same parent run
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == sorted(t.number for t in trials)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
