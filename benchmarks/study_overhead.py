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


def time_study(tree: Path, n_trials: int) -> tuple[float, float]:
    """(wall seconds of the whole command, seconds of training inside it) in a fresh directory."""
    with tempfile.TemporaryDirectory(prefix="study-overhead-") as scratch:
        directory = Path(scratch)
        (directory / "spec.toml").write_text(SPEC)
        env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
               "PYTHONPATH": str(tree), "GROKKING_TORCH_THREADS": "1"}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "grokking_tracked", "study", "spec.toml", "--n-trials",
                               str(n_trials), "--workers", "1", "--no-progress"], cwd=directory, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{tree}: study failed: {done.stderr[-1500:]}")
        return wall, training_seconds(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", type=Path, help="a checkout to measure (repeatable)")
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in (args.tree or [Path(__file__).resolve().parents[1]])]
    print("machine:", describe())
    results: dict[Path, list[tuple[float, float]]] = {tree: [] for tree in trees}
    for round_number in range(args.rounds):
        order = trees if round_number % 2 == 0 else trees[::-1]
        for tree in order:
            one_wall, one_train = time_study(tree, 1)
            many_wall, many_train = time_study(tree, args.trials)
            per_trial = ((many_wall - one_wall) - (many_train - one_train)) / (args.trials - 1)
            fixed = one_wall - one_train - per_trial
            results[tree].append((per_trial, fixed))
            print(f"  round {round_number + 1} {tree}: 1 trial {one_wall:.1f} s, {args.trials} trials "
                  f"{many_wall:.1f} s (training {many_train:.1f} s): bookkeeping {per_trial:.2f} s/trial, "
                  f"fixed {fixed:.1f} s/study", flush=True)
    for tree, rows in results.items():
        print(f"{tree}: per-trial bookkeeping {statistics.median(r[0] for r in rows):.2f} s (median of "
              f"{len(rows)}), per-study fixed cost {statistics.median(r[1] for r in rows):.1f} s")
    print("machine at the end:", describe())


if __name__ == "__main__":
    main()
