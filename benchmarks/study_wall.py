"""Wall time of a whole documented study command, for one or more code trees side by side (issue 11:
"`grokking-tracked study studies/fastest_grokking.toml --n-trials 20` wall time before and after").

    python benchmarks/study_wall.py --tree /tmp/before --tree . [--spec studies/fastest_grokking.toml] [--n-trials 20]

Each tree runs the command exactly as its README documents it (its own default --workers), in a fresh directory
with the embedded stores, in the order given. Prints wall and CPU seconds (the command and every process it
waited for), the trials by state and the best value, read back from the Optuna storage.
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import describe


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", type=Path, required=True)
    parser.add_argument("--spec", default="studies/fastest_grokking.toml", help="relative to each tree")
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--keep", type=Path, help="keep each tree's store under this directory")
    args = parser.parse_args()
    print("machine:", describe(), flush=True)
    for tree in (t.resolve() for t in args.tree):
        scratch = Path(tempfile.mkdtemp(prefix="study-wall-", dir=args.keep))
        env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(tree)}
        started, cpu_before = time.perf_counter(), children_cpu()
        done = subprocess.run([sys.executable, "-m", "grokking_tracked", "study", str(tree / args.spec),
                               "--n-trials", str(args.n_trials), "--no-progress"], cwd=scratch, env=env,
                              capture_output=True, text=True)
        wall, cpu = time.perf_counter() - started, children_cpu() - cpu_before
        if done.returncode:
            print(f"{tree}: failed ({done.returncode}): {done.stderr[-1500:]}", flush=True)
            continue
        with sqlite3.connect(scratch / "mlruns" / "optuna.db") as db:
            states = dict(db.execute("select state, count(*) from trials group by state").fetchall())
            steps = sum(int(float(v)) for (v,) in db.execute(
                "select value_json from trial_user_attributes where key = 'final_step'"))
            best = db.execute("select min(v.value) from trial_values v join trials t using (trial_id) "
                              "where t.state = 'COMPLETE'").fetchone()[0]  # a pruned trial's value is a loss
        # the trials a search draws differ between trees and runs: steps trained per second compares the work
        print(f"{tree}: wall {wall:.1f} s, CPU {cpu:.1f} s, trials {states}, {steps} steps trained "
              f"({steps / wall:.1f} steps/s of wall time), best {best}  (store: {scratch})", flush=True)
    print("machine at the end:", describe())


if __name__ == "__main__":
    main()
