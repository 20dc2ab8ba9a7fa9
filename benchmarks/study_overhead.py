"""Per-trial bookkeeping and per-study fixed cost of `grokking-tracked study`, for one or more code trees side by
side (issue 11: "a 7-trial vs a 1-trial study of 30-step trials, embedded store, one worker").

    python benchmarks/study_overhead.py                                  # this checkout
    python benchmarks/study_overhead.py --tree /tmp/before --tree .      # an older checkout beside this one

    python benchmarks/study_overhead.py --variants tiny-random,tiny-tpe,default-random,default-tpe   # ablation

For each tree, variant and round, in a fresh directory (embedded stores), it times `study --n-trials 1` and
`study --n-trials N` of 30-step trials (no pruning) through the real console entry point with one worker. A
variant is a task (`tiny`: p = 23, d_model 32, issue 11's; `default`: x + y mod 59, d_model 64, issue 21's) and a
sampler (random or TPE). Reported: the whole-command figure (T_N - T_1) / (N - 1), what a user sees; of it, the
trials' own training (from the Optuna storage) and the rest, per-trial bookkeeping; per-study fixed cost = T_1
minus one trial's time; and the N-trial study's timeline from its stores (see ``timeline``). Trees and variants
alternate within each round, so load on the machine affects them alike.
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
from datetime import datetime, timezone
from pathlib import Path

from _machine import describe

TASKS = {
    # issue 11's tiny task: p = 23, d_model 32, random sampler
    "tiny": """
[task]
p = 23
d_model = 32
d_mlp = 64
max_steps = 30
eval_every = 10
checkpoint_every = 0
""",
    # issue 21's: the `default` task (x + y mod 59, d_model 64) as studies/fastest_grokking.toml searches it
    "default": """
[task]
preset = "default"
max_steps = 30
eval_every = 10
checkpoint_every = 0
stop_margin = 0
""",
}
SAMPLER = {"random": '[sampler]\nname = "random"\nseed = 1\n',
           "tpe": '[sampler]\nname = "tpe"\nseed = 0\nn_startup_trials = 5\n'}
STUDY = """
[study]
name = "overhead"
experiment = "overhead"
n_trials = 1
heartbeat_interval = 10
grace_period = 30

[search]
lr = { type = "float", low = 3e-3, high = 3e-2, log = true }
weight_decay = { type = "float", low = 0.1, high = 3.0, log = true }
train_frac = { type = "float", low = 0.4, high = 0.8 }

[pruner]
name = "none"
"""


def spec_text(variant: str) -> str:
    task, sampler = variant.split("-")
    return STUDY + TASKS[task] + SAMPLER[sampler]


def training_seconds(directory: Path) -> float:
    """Sum of the trials' own training seconds (user attr ``train_seconds``, JSON in Optuna's table)."""
    with sqlite3.connect(directory / "mlruns" / "optuna.db") as db:
        rows = db.execute("select value_json from trial_user_attributes where key = 'train_seconds'").fetchall()
    return sum(float(value) for (value,) in rows)


def _utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def timeline(directory: Path, started: float, ended: float) -> dict[str, float]:
    """Where a study command's wall time went, from what its stores recorded: Optuna's trial start/complete times
    (naive UTC), the trials' training seconds, and MLflow's run end times (a trial's run ends FINISHED once the
    figure process has drawn its figures). ``head``: command start to the first trial; ``trial``: a trial's
    window minus its training (sampling, run creation, logging, delivery), summed; ``between``: from one trial's
    completion to the next one's start, summed; ``tail``: the last completion to the command's exit; ``lag``:
    how long after its trial's completion the last trial's run was FINISHED (the figure process's backlog)."""
    with sqlite3.connect(directory / "mlruns" / "optuna.db") as db:
        trials = db.execute("select trial_id, datetime_start, datetime_complete from trials order by number").fetchall()
        train = dict(db.execute("select trial_id, value_json from trial_user_attributes where key = 'train_seconds'"))
    with sqlite3.connect(directory / "mlruns" / "mlflow.db") as db:
        ends = [row[0] / 1e3 for row in db.execute(
            "select end_time from runs join tags on runs.run_uuid = tags.run_uuid "
            "where tags.key = 'optuna.trial_number' order by cast(tags.value as integer)")]
    starts = [_utc(t[1]) for t in trials]
    completes = [_utc(t[2]) for t in trials]
    return {"head": starts[0] - started,
            "trial": sum(c - s - float(train.get(t[0], 0)) for t, s, c in zip(trials, starts, completes)),
            "between": sum(s - c for s, c in zip(starts[1:], completes)),
            "tail": ended - completes[-1],
            "lag": (ends[-1] - completes[-1]) if ends and ends[-1] else float("nan")}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_study(tree: Path, n_trials: int, variant: str) -> tuple[float, float, float, dict]:
    """(wall seconds of the whole command, seconds of training inside it, CPU seconds of the command and every
    process it waited for) in a fresh directory. CPU seconds are what to compare on a loaded machine: wall time
    there measures the other jobs as much as ours."""
    with tempfile.TemporaryDirectory(prefix="study-overhead-") as scratch:
        directory = Path(scratch)
        (directory / "spec.toml").write_text(spec_text(variant))
        env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
               "PYTHONPATH": str(tree), "GROKKING_TORCH_THREADS": "1"}
        started, clock, cpu_before = time.perf_counter(), time.time(), children_cpu()
        done = subprocess.run([sys.executable, "-m", "grokking_tracked", "study", "spec.toml", "--n-trials",
                               str(n_trials), "--workers", "1", "--no-progress"], cwd=directory, env=env,
                              capture_output=True, text=True)
        wall, cpu = time.perf_counter() - started, children_cpu() - cpu_before
        if done.returncode != 0:
            raise SystemExit(f"{tree}: study failed: {done.stderr[-1500:]}")
        return wall, training_seconds(directory), cpu, timeline(directory, clock, clock + wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", type=Path, help="a checkout to measure (repeatable)")
    parser.add_argument("--variants", default="tiny-random,default-tpe",
                        help="TASK-SAMPLER pairs, comma-separated: tasks tiny (p 23, d_model 32) and default "
                             "(x + y mod 59, d_model 64); samplers random and tpe")
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in (args.tree or [Path(__file__).resolve().parents[1]])]
    variants = args.variants.split(",")
    for variant in variants:
        spec_text(variant)  # an unknown name fails before anything runs
    print("machine:", describe())
    keys = [(tree, variant) for tree in trees for variant in variants]
    results: dict[tuple, list[dict]] = {key: [] for key in keys}
    for round_number in range(args.rounds):
        for tree, variant in (keys if round_number % 2 == 0 else keys[::-1]):  # alternate: load hits all alike
            one_wall, one_train, one_cpu, _ = time_study(tree, 1, variant)
            many_wall, many_train, many_cpu, parts = time_study(tree, args.trials, variant)
            n = args.trials - 1
            whole = (many_wall - one_wall) / n  # what a user sees: one more trial costs this much of the command
            train = (many_train - one_train) / n
            per_trial = whole - train
            fixed = one_wall - one_train - per_trial
            # training runs on one thread, so its wall seconds approximate its CPU seconds
            cpu_per_trial = ((many_cpu - one_cpu) - (many_train - one_train)) / n
            cpu_fixed = one_cpu - one_train - cpu_per_trial
            row = dict(whole=whole, train=train, per_trial=per_trial, fixed=fixed, cpu_per_trial=cpu_per_trial,
                       cpu_fixed=cpu_fixed, **{k: v / args.trials if k in ("trial", "between") else v
                                                for k, v in parts.items()})
            results[(tree, variant)].append(row)
            print(f"  round {round_number + 1} {tree} {variant}: 1 trial {one_wall:.1f} s ({one_cpu:.1f} CPU s), "
                  f"{args.trials} trials {many_wall:.1f} s ({many_cpu:.1f} CPU s; training {many_train:.1f} s): "
                  f"whole command {whole:.2f} s/trial, of it training {train:.2f} s and bookkeeping "
                  f"{per_trial:.2f} s ({cpu_per_trial:.2f} CPU s); fixed {fixed:.1f} s/study ({cpu_fixed:.1f} CPU s). "
                  f"{args.trials}-trial timeline: head {parts['head']:.1f} s, per trial {row['trial']:.2f} s inside "
                  f"its window besides training + {row['between']:.2f} s between trials, tail {parts['tail']:.1f} s "
                  f"(last run FINISHED {parts['lag']:.1f} s after its trial completed)", flush=True)
    print(f"medians of {args.rounds} rounds (whole command = (T_{args.trials} - T_1) / {args.trials - 1}; "
          "bookkeeping = that minus the trials' training):")
    for (tree, variant), rows in results.items():
        m = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"  {tree} {variant}: whole command {m['whole']:.2f} s/trial = training {m['train']:.2f} + bookkeeping "
              f"{m['per_trial']:.2f} s ({m['cpu_per_trial']:.2f} CPU s); fixed {m['fixed']:.1f} s/study "
              f"({m['cpu_fixed']:.1f} CPU s); timeline of the {args.trials}-trial study: head {m['head']:.1f} s, "
              f"per trial {m['trial']:.2f} s in its window besides training + {m['between']:.2f} s between trials, "
              f"tail {m['tail']:.1f} s, last run's figures done {m['lag']:.1f} s after its trial")
    print("machine at the end:", describe())


if __name__ == "__main__":
    main()
