"""Trials per hour of a study on this machine, with pruning vs without (benchmarks/, never asserted in tests).

Two studies with the same TPE seed and the same search space as studies/fastest_grokking.toml, on a shorter
budget so the benchmark takes minutes: one with the median pruner on test_loss, one with no pruner. Each runs
in a fresh temporary store (embedded SQLite MLflow + SQLite Optuna). Prints trials/hour and what pruning cut.

    python benchmarks/study_throughput.py [--trials 8] [--max-steps 800]

The machine is shared with other engineers' jobs: numbers are noisy; compare within one invocation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

SPEC = """
[study]
name = "throughput_{mode}"
experiment = "throughput"
n_trials = {trials}
[task]
preset = "default"
max_steps = {max_steps}
eval_every = 10
checkpoint_every = 0
stop_margin = 0
[objective]
target = "steps"
[search]
lr = {{ type = "float", low = 1e-3, high = 3e-2, log = true }}
weight_decay = {{ type = "float", low = 0.1, high = 3.0, log = true }}
train_frac = {{ type = "float", low = 0.25, high = 0.6 }}
[sampler]
name = "tpe"
seed = 0
n_startup_trials = 3
[pruner]
{pruner}
"""

PRUNERS = {"median": 'name = "median"\nmetric = "test_loss"\nreport_every = 50\nn_startup_trials = 2\nn_warmup_steps = 150',
           "none": 'name = "none"'}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=800)
    args = parser.parse_args()
    os.environ.setdefault("GROKKING_TORCH_THREADS", "1")
    from grokking_tracked.study import run_study
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"{os.cpu_count()} cores, torch threads {os.environ['GROKKING_TORCH_THREADS']}, "
          f"{args.trials} trials, budget {args.max_steps} steps, load average {os.getloadavg()[0]:.1f} at start")
    rows = []
    for mode in ("median", "none"):
        with tempfile.TemporaryDirectory(prefix=f"study-bench-{mode}-") as tmp:
            spec = Path(tmp) / "spec.toml"
            spec.write_text(SPEC.format(mode=mode, trials=args.trials, max_steps=args.max_steps, pruner=PRUNERS[mode]))
            cwd = os.getcwd()
            os.chdir(tmp)
            try:
                started = time.perf_counter()
                summary = run_study(str(spec), progress=False, echo=lambda m: None)
                seconds = time.perf_counter() - started
                study = optuna.load_study(study_name=f"throughput_{mode}", storage=f"sqlite:///{tmp}/mlruns/optuna.db")
                steps = sum(max(t.intermediate_values or {0: 0}) if t.state.name == "PRUNED"
                            else (t.user_attrs.get("final_step") or 0) for t in study.trials)
            finally:
                os.chdir(cwd)
        counts = summary["counts"]
        rows.append((mode, seconds, counts, steps, summary.get("best_value")))
        print(f"pruner {mode:6s}: {seconds:6.1f} s wall, {3600 * args.trials / seconds:6.1f} trials/hour, "
              f"complete {counts['complete']}, pruned {counts['pruned']}, ~{steps} steps trained, "
              f"best value {summary.get('best_value')}, load average {os.getloadavg()[0]:.1f}", flush=True)
    (m, sm, *_), (n, sn, *_) = rows
    print(f"pruning: {sn / sm:.2f}x the trials per hour of no pruning (same TPE seed; noisy shared machine)")


if __name__ == "__main__":
    sys.exit(main())
