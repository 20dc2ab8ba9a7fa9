"""Threads by context (issue 21): a lone `run` takes the cores it has (when its model is big enough to gain), a
study worker keeps one thread, $GROKKING_TORCH_THREADS wins, and a library call leaves torch as it found it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from conftest import run_cli
from grokking_tracked.config import preset
from grokking_tracked.train import THREADS_ENV, Callback, Trainer, available_cores, default_threads

THREADS_TAG = "grokking_tracked.torch_threads"


class SeenThreads(Callback):
    def __init__(self):
        self.seen: set[int] = set()

    def on_eval(self, run, step, metrics, events):
        self.seen.add(torch.get_num_threads())


@pytest.mark.parametrize("threads", [None, 2])
def test_library_call_leaves_the_thread_count_as_it_found_it(monkeypatch, threads):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    torch.set_num_threads(3)  # the caller's own choice (the one_torch_thread fixture restores the suite's)
    seen = SeenThreads()
    Trainer(preset("default", p=13, d_model=16, d_mlp=32, max_steps=20), [seen], progress=False,
            threads=threads).train()
    assert seen.seen == {threads or 1}  # a library call without a choice trains on one thread
    assert torch.get_num_threads() == 3


def test_explicit_setting_wins(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "3")
    config = preset("nanda2023")
    assert default_threads(torch.device("cpu"), config, lone=True) == 3
    assert default_threads(torch.device("cpu"), config) == 3
    monkeypatch.delenv(THREADS_ENV)
    assert default_threads(torch.device("cpu"), config, lone=True) == available_cores()
    assert default_threads(torch.device("cpu"), config) == 1
    assert default_threads(torch.device("cpu"), preset("default"), lone=True) == 1  # too small to gain


def runs_by_role(store: str):
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {run.data.tags.get("grokking_tracked.role", "run"): run for run in runs}


def test_lone_run_uses_every_core_and_a_study_worker_one(tmp_path: Path):
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    done = run_cli("run", "--preset", "seed", "--max-steps", "20", "--eval-every", "10", "--no-progress",
                   cwd=tmp_path, env={THREADS_ENV: ""})  # "": unset, the default applies
    assert done.returncode == 0, done.stderr[-2000:]
    assert runs_by_role(store)["run"].data.tags[THREADS_TAG] == str(available_cores())

    spec = tmp_path / "one.toml"
    spec.write_text('[study]\nname = "one"\nexperiment = "threads"\nn_trials = 1\n'
                    '[task]\npreset = "seed"\nmax_steps = 20\neval_every = 10\ncheckpoint_every = 0\n'
                    '[objective]\ntarget = "steps"\n[search]\nlr = { type = "float", low = 1e-3, high = 2e-3 }\n'
                    '[sampler]\nname = "random"\n[pruner]\nname = "none"\n')
    study = run_cli("study", str(spec), "--workers", "1", "--no-progress", cwd=tmp_path, env={THREADS_ENV: ""})
    assert study.returncode == 0, study.stderr[-2000:]
    assert runs_by_role(store)["trial"].data.tags[THREADS_TAG] == "1"
