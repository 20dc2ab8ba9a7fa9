"""Per-trial bookkeeping and per-study fixed cost of `grokking-tracked study`, for one or more code trees side by
side (issue 11: "a 7-trial vs a 1-trial study of 30-step trials, embedded store, one worker").

    python benchmarks/study_overhead.py                                  # this checkout
    python benchmarks/study_overhead.py --tree /tmp/before --tree .      # an older checkout beside this one

For each tree and round, in a fresh directory (embedded stores), it times `study --n-trials 1` and
`study --n-trials N` of a tiny task (p = 23, d_model 32, 30-step trials, no pruning) through the real console
entry point with one worker. Per-trial bookkeeping = (T_N - T_1) / (N - 1) minus the trials' own training time
(summed from the Optuna storage); per-study fixed cost = T_1 minus one trial's time. Trees alternate within each
round, so load on the machine affects them alike.
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import describe

SPEC = """
[study]
name = "overhead"
experiment = "overhead"
n_trials = 1
heartbeat_interval = 10
grace_period = 30

[task]
p = 23
d_model = 32
d_mlp = 64
max_steps = 30
eval_every = 10
checkpoint_every = 0

[search]
lr = { type = "float", low = 3e-3, high = 3e-2, log = true }
train_frac = { type = "float", low = 0.4, high = 0.8 }

[sampler]
name = "random"
seed = 1

[pruner]
name = "none"
"""


def training_seconds(directory: Path) -> float:
    """Sum of the trials' own training seconds (user attr ``train_seconds``, JSON in Optuna's table)."""
    with sqlite3.connect(directory / "mlruns" / "optuna.db") as db:
        rows = db.execute("select value_json from trial_user_attributes where key = 'train_seconds'").fetchall()
    return sum(float(value) for (value,) in rows)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_study(tree: Path, n_trials: int) -> tuple[float, float, float]:
    """(wall seconds of the whole command, seconds of training inside it, CPU seconds of the command and every
    process it waited for) in a fresh directory. CPU seconds are what to compare on a loaded machine: wall time
    there measures the other jobs as much as ours."""
    with tempfile.TemporaryDirectory(prefix="study-overhead-") as scratch:
        directory = Path(scratch)
        (directory / "spec.toml").write_text(SPEC)
        env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
               "PYTHONPATH": str(tree), "GROKKING_TORCH_THREADS": "1"}
        started, cpu_before = time.perf_counter(), children_cpu()
        done = subprocess.run([sys.executable, "-m", "grokking_tracked", "study", "spec.toml", "--n-trials",
                               str(n_trials), "--workers", "1", "--no-progress"], cwd=directory, env=env,
                              capture_output=True, text=True)
        wall, cpu = time.perf_counter() - started, children_cpu() - cpu_before
        if done.returncode != 0:
            raise SystemExit(f"{tree}: study failed: {done.stderr[-1500:]}")
        return wall, training_seconds(directory), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", type=Path, help="a checkout to measure (repeatable)")
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in (args.tree or [Path(__file__).resolve().parents[1]])]
    print("machine:", describe())
    results: dict[Path, list[tuple[float, float, float, float]]] = {tree: [] for tree in trees}
    for round_number in range(args.rounds):
        order = trees if round_number % 2 == 0 else trees[::-1]
        for tree in order:
            one_wall, one_train, one_cpu = time_study(tree, 1)
            many_wall, many_train, many_cpu = time_study(tree, args.trials)
            per_trial = ((many_wall - one_wall) - (many_train - one_train)) / (args.trials - 1)
            fixed = one_wall - one_train - per_trial
            # training runs on one thread, so its wall seconds approximate its CPU seconds
            cpu_per_trial = ((many_cpu - one_cpu) - (many_train - one_train)) / (args.trials - 1)
            cpu_fixed = one_cpu - one_train - cpu_per_trial
            results[tree].append((per_trial, fixed, cpu_per_trial, cpu_fixed))
            print(f"  round {round_number + 1} {tree}: 1 trial {one_wall:.1f} s ({one_cpu:.1f} CPU s), "
                  f"{args.trials} trials {many_wall:.1f} s ({many_cpu:.1f} CPU s; training {many_train:.1f} s): "
                  f"bookkeeping {per_trial:.2f} s/trial ({cpu_per_trial:.2f} CPU s), fixed {fixed:.1f} s/study "
                  f"({cpu_fixed:.1f} CPU s)", flush=True)
    for tree, rows in results.items():
        print(f"{tree}: per-trial bookkeeping {statistics.median(r[0] for r in rows):.2f} s wall, "
              f"{statistics.median(r[2] for r in rows):.2f} CPU s; per-study fixed cost "
              f"{statistics.median(r[1] for r in rows):.1f} s wall, {statistics.median(r[3] for r in rows):.1f} CPU s "
              f"(medians of {len(rows)})")
    print("machine at the end:", describe())


if __name__ == "__main__":
    main()
