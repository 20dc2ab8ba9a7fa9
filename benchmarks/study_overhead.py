"""Per-trial bookkeeping and per-study fixed cost of `grokking-tracked study`, for one or more code trees side by
side (issue 11: "a 7-trial vs a 1-trial study of 30-step trials, embedded store, one worker").

    python benchmarks/study_overhead.py                                  # this checkout
    python benchmarks/study_overhead.py --tree /tmp/before --tree .      # an older checkout beside this one

    python benchmarks/study_overhead.py --variants tiny-random,tiny-tpe,default-random,default-tpe   # ablation

For each tree, variant and round, in a fresh directory (embedded stores), it times `study --n-trials 1`, `2` and
`N` of 30-step trials (no pruning) through the real console entry point with one worker. A
variant is a task (`tiny`: p = 23, d_model 32, issue 11's; `default`: x + y mod 59, d_model 64, issue 21's) and a
sampler (random or TPE). Reported: the whole-command figure (T_N - T_1) / (N - 1), the issue's; the marginal
figure (T_N - T_2) / (N - 2), what one more trial costs once the study figures that need two completed trials
(param importances, contour) are drawn, split into the trials' own training (from the Optuna storage) and the
rest, per-trial bookkeeping; those figures' one-off cost; per-study fixed cost; and the N-trial study's timeline
from its stores (see ``timeline``). Trees and variants alternate within each round, so load on the machine affects
them alike.
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
    window minus its training (sampling, run creation, logging, delivery); ``between``: from one trial's
    completion to the next one's start; ``tail``: the last completion to the command's exit; ``lag``:
    how long after its trial's completion the last trial's run was FINISHED (the figure process's backlog);
    ``first``: the first trial's window minus its training; ``trial`` and ``between``: medians over the later
    trials."""
    with sqlite3.connect(directory / "mlruns" / "optuna.db") as db:
        trials = db.execute("select trial_id, datetime_start, datetime_complete from trials order by number").fetchall()
        train = dict(db.execute("select trial_id, value_json from trial_user_attributes where key = 'train_seconds'"))
    with sqlite3.connect(directory / "mlruns" / "mlflow.db") as db:
        ends = [row[0] / 1e3 for row in db.execute(
            "select end_time from runs join tags on runs.run_uuid = tags.run_uuid "
            "where tags.key = 'optuna.trial_number' order by cast(tags.value as integer)")]
    starts = [_utc(t[1]) for t in trials]
    completes = [_utc(t[2]) for t in trials]
    inside = [c - s - float(train.get(t[0], 0)) for t, s, c in zip(trials, starts, completes)]
    return {"head": starts[0] - started,
            "first": inside[0],  # the first trial also pays the process's first optimizer (torch._dynamo's import)
            "trial": statistics.median(inside[1:]) if len(inside) > 1 else float("nan"),
            "between": statistics.median(s - c for s, c in zip(starts[1:], completes)) if len(inside) > 1 else 0.0,
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
    if args.trials < 3:
        parser.error("--trials must be >= 3 (the marginal figure is (T_N - T_2) / (N - 2))")
    variants = args.variants.split(",")
    for variant in variants:
        spec_text(variant)  # an unknown name fails before anything runs
    print("machine:", describe())
    keys = [(tree, variant) for tree in trees for variant in variants]
    results: dict[tuple, list[dict]] = {key: [] for key in keys}
    for round_number in range(args.rounds):
        for tree, variant in (keys if round_number % 2 == 0 else keys[::-1]):  # alternate: load hits all alike
            one_wall, one_train, one_cpu, _ = time_study(tree, 1, variant)
            two_wall, two_train, _, _ = time_study(tree, 2, variant)
            many_wall, many_train, many_cpu, parts = time_study(tree, args.trials, variant)
            n = args.trials - 1
            whole = (many_wall - one_wall) / n  # the figure: (T_N - T_1) / (N - 1)
            train = (many_train - one_train) / n
            # A 1-trial study skips the study figures that need >= 2 completed trials (param importances, contour):
            # from 2 trials on, every figure is drawn, so (T_N - T_2) / (N - 2) is what one more trial costs.
            marginal = (many_wall - two_wall) / (args.trials - 2)
            marginal_train = (many_train - two_train) / (args.trials - 2)
            second_figures = (two_wall - one_wall) - marginal  # what the 2nd trial adds beyond a trial's cost
            per_trial = marginal - marginal_train
            fixed = one_wall - one_train - per_trial  # T_1 = fixed + its training + one bookkeeping
            # training runs on one thread, so its wall seconds approximate its CPU seconds
            cpu_per_trial = ((many_cpu - one_cpu) - (many_train - one_train)) / n
            row = dict(whole=whole, train=train, marginal=marginal, marginal_train=marginal_train, per_trial=per_trial,
                       second=second_figures, fixed=fixed, cpu_per_trial=cpu_per_trial, **parts)
            results[(tree, variant)].append(row)
            print(f"  round {round_number + 1} {tree} {variant}: studies of 1, 2, {args.trials} trials: "
                  f"{one_wall:.1f}, {two_wall:.1f}, {many_wall:.1f} s (training {one_train:.1f}, {two_train:.1f}, "
                  f"{many_train:.1f} s). (T_{args.trials} - T_1) / {n} = {whole:.2f} s/trial (training {train:.2f}); "
                  f"(T_{args.trials} - T_2) / {args.trials - 2} = {marginal:.2f} s/trial = training "
                  f"{marginal_train:.2f} + bookkeeping {per_trial:.2f}; the 2nd trial's extra study figures "
                  f"{second_figures:.1f} s; fixed {fixed:.1f} s/study. Timeline of the {args.trials}-trial study: "
                  f"head {parts['head']:.1f} s, first trial {parts['first']:.2f} s besides training, later trials "
                  f"{parts['trial']:.2f} s (median) + {parts['between']:.2f} s between, tail {parts['tail']:.1f} s "
                  f"(last run FINISHED {parts['lag']:.1f} s after its trial completed)", flush=True)
    print(f"medians of {args.rounds} rounds:")
    for (tree, variant), rows in results.items():
        m = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"  {tree} {variant}: whole command (T_{args.trials} - T_1) / {args.trials - 1} = {m['whole']:.2f} s/trial "
              f"(training {m['train']:.2f}); (T_{args.trials} - T_2) / {args.trials - 2} = {m['marginal']:.2f} s/trial = "
              f"training {m['marginal_train']:.2f} + bookkeeping {m['per_trial']:.2f} s; CPU beyond training "
              f"{m['cpu_per_trial']:.2f} CPU s/trial (figure process included); study figures that need 2 trials "
              f"{m['second']:.1f} s once; fixed {m['fixed']:.1f} s/study. Timeline: head {m['head']:.1f} s, first "
              f"trial {m['first']:.2f} s besides training, later trials {m['trial']:.2f} s + {m['between']:.2f} s "
              f"between, tail {m['tail']:.1f} s, last run's figures done {m['lag']:.1f} s after its trial")
    print("machine at the end:", describe())


if __name__ == "__main__":
    main()
