"""Time to the first training step of the README's first kind of command (issue 26, item 6).

    python benchmarks/first_step.py [--rounds 3]

Each round runs ``grokking-tracked run --p 23 --max-steps 1 --no-progress`` in a new empty directory (a new local
store, as a first-time user) and reads back from that store when its metrics were logged: the evaluation at step 0
(before any step) and the one right after step 1, the first step (metric timestamps are fixed when the trainer
hands them over). Printed: seconds from the command's launch to each, and to its exit. Then, each in a fresh
interpreter, what the imports on the way cost: torch, TransformerLens after torch (the model's HookPoints need
its package), mlflow, and torch._dynamo (imported by torch.optim at the first optimizer step).
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

ROOT = Path(__file__).resolve().parent.parent
IMPORTS = {  # label: (imported first, untimed; timed)
    "torch": ("", "import torch"),
    "transformer_lens (after torch)": ("import torch", "import transformer_lens"),
    "mlflow (after torch)": ("import torch", "import mlflow"),
    "torch._dynamo (after torch)": ("import torch", "import torch._dynamo"),
    "grokking_tracked.tracking.experiment (all of it)": ("", "import grokking_tracked.tracking.experiment"),
}


def one_round(command: list[str], env: dict) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="first-step-") as directory:
        launched = time.time()
        subprocess.run(command, cwd=directory, env=env, check=True, capture_output=True)
        exited = time.time() - launched
        with sqlite3.connect(f"file:{directory}/mlruns/mlflow.db?mode=ro", uri=True) as db:
            at = dict(db.execute("select step, min(timestamp) from metrics group by step").fetchall())
    return at[0] / 1000 - launched, at[1] / 1000 - launched, exited


def import_seconds(before: str, timed: str, env: dict) -> float:
    code = f"{before}\nimport time\nt = time.perf_counter()\n{timed}\nprint(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import describe

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "grokking_tracked", "run", "--p", "23", "--max-steps", "1", "--no-progress"]
    print(describe())
    print("load average before: %.2f %.2f %.2f" % os.getloadavg(), flush=True)
    one_round(command, env)  # warm: the first launch reads the files from disk
    rounds = []
    for index in range(args.rounds):
        rounds.append(one_round(command, env))
        evaluation, step, exited = rounds[-1]
        print(f"round {index}: first evaluation {evaluation:.2f} s, first step {step:.2f} s, exit {exited:.2f} s "
              "after launch; load %.2f" % os.getloadavg()[0], flush=True)
    print("median: first step %.2f s, exit %.2f s" % (statistics.median(r[1] for r in rounds),
                                                      statistics.median(r[2] for r in rounds)))
    for label, (before, timed) in IMPORTS.items():
        seconds = statistics.median(import_seconds(before, timed, env) for _ in range(args.rounds))
        print(f"import {label}: {seconds:.2f} s (median of {args.rounds})", flush=True)
    print("load average after: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
