"""Cost of ``--system-metrics`` (MLflow's SystemMetricsMonitor thread on the run) on tracked training, side by side.

Full tracked runs (``run_experiment``, an embedded SQLite store in a temporary directory) of the same config,
off and on alternating so machine load hits both alike; steps/s of the training loop of each, median over the
rounds. "on" is run at MLflow's default sampling interval (10 s) and at 1 s (the worst case one would choose); the min
over rounds is the least disturbed. On a loaded machine these rates are noisy, so the sampler's own work is also
measured directly: the CPU time of one sampling round (psutil readings, the run-status query, the batch write),
which divided by the interval is the share of one core it takes.

    python benchmarks/system_metrics_cost.py [--rounds 3] [--preset default] [--steps 600]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from _machine import describe
from grokking_tracked.config import preset
from grokking_tracked.tracking import run_experiment


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=600)
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
        per_sample = sampler_cpu_seconds(uri, outcome.run_id)
    print(f"\npreset {args.preset} (p={config.p}, d_model={config.d_model}) on {args.device}, {args.steps} steps a "
          f"run, {args.rounds} alternating rounds; training-loop steps/s (median, min):")
    base = statistics.median(rates["off"])
    for label, values in rates.items():
        rate = statistics.median(values)
        print(f"  {label:16s} {rate:8.1f} {min(values):8.1f} steps/s  ({100 * (base - rate) / base:+.1f} % vs off)"
              f"  rounds: {', '.join(f'{v:.1f}' for v in values)}")
    print(f"one sampling round: {1000 * per_sample:.1f} ms of CPU -> {100 * per_sample / 10:.3f} % of a core at the "
          f"default 10 s interval, {100 * per_sample:.2f} % at 1 s")


def sampler_cpu_seconds(uri: str, run_id: str, rounds: int = 20) -> float:
    """CPU seconds of one round of MLflow's sampler thread: read every monitor, check the run, write the batch."""
    from mlflow import MlflowClient
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=uri)
    monitor.collect_metrics()  # warm-up: first psutil readings, the client's connection
    started = time.thread_time()
    for _ in range(rounds):
        monitor.collect_metrics()
        MlflowClient(uri).get_run(run_id)
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()  # one write per round, as at the default interval
    return (time.thread_time() - started) / rounds


if __name__ == "__main__":
    main()
