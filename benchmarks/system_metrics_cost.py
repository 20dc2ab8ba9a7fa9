"""Cost of ``--system-metrics`` (MLflow's SystemMetricsMonitor thread on the run) on tracked training, side by side.

Full tracked runs (``run_experiment``, an embedded SQLite store in a temporary directory) of the same config,
off and on alternating so machine load hits both alike; steps/s of the training loop of each, median over the
rounds. "on" is run at MLflow's default sampling interval (10 s) and at 1 s (the worst case one would choose).

    python benchmarks/system_metrics_cost.py [--rounds 2] [--preset default] [--steps 3000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch

from _machine import describe
from grokking_tracked.config import preset
from grokking_tracked.tracking import run_experiment


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(describe(args.device))
    config = preset(args.preset, max_steps=args.steps, stop_on_grok=False, checkpoint_every=0, device=args.device)
    conditions = {"off": None, "on, every 10 s": "10", "on, every 1 s": "1"}
    rates: dict[str, list[float]] = {label: [] for label in conditions}
    with tempfile.TemporaryDirectory() as store:
        uri = f"sqlite:///{store}/mlflow.db"
        for round_ in range(args.rounds):
            order = list(conditions) if round_ % 2 == 0 else list(reversed(conditions))
            for label in order:
                interval = conditions[label]
                if interval:
                    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = interval
                outcome = run_experiment(config, uri, progress=False, log_system_metrics=interval is not None)
                os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", None)
                rates[label].append(outcome.result.final_step / outcome.result.train_seconds)
    print(f"\npreset {args.preset} (p={config.p}, d_model={config.d_model}) on {args.device}, {args.steps} steps a "
          f"run, {args.rounds} alternating rounds; training-loop steps/s (median):")
    base = statistics.median(rates["off"])
    for label, values in rates.items():
        rate = statistics.median(values)
        print(f"  {label:16s} {rate:8.1f} steps/s  ({100 * (base - rate) / base:+.1f} % slower than off)"
              f"  rounds: {', '.join(f'{v:.1f}' for v in values)}")


if __name__ == "__main__":
    main()
