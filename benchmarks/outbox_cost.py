"""What the outbox costs, next to MLflow's own asynchronous logging, against a real `mlflow server`.

    python benchmarks/outbox_cost.py                        # starts a server (~25-60 s), ~2 minutes in all
    python benchmarks/outbox_cost.py --tracking-uri http://127.0.0.1:5000 --rounds 5

Per round, in rotated order (so machine load hits both alike):
  metrics    N evaluations of 7 metrics each, sent one call per evaluation as fast as possible:
             - outbox:  Outbox.log_metrics(...)                     (a JSON file written and renamed)
             - mlflow:  MlflowClient.log_batch(..., synchronous=False) (MLflow's in-memory async queue)
             enqueue  = time inside the call, on the calling thread (what the training loop pays);
             delivery = evaluations per second from the first call until the server holds them all.
  files      K checkpoint-sized files (1 MB): the outbox's staging_path + log_file(move=True) on the
             calling thread, vs a synchronous MlflowClient.log_artifact (MLflow has no asynchronous
             artifact logging); and files per second delivered by the outbox.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric

from _machine import describe
from grokking_tracked.tracking.delivery.outbox import Outbox
from speed import mlflow_server

KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm", "grad_norm", "lr")


def new_run(client: MlflowClient) -> str:
    return client.create_run(client.create_experiment(f"outbox-cost-{uuid.uuid4().hex[:8]}")).info.run_id


def metrics_outbox(client: MlflowClient, n: int, spool: Path) -> tuple[list[float], float]:
    run_id = new_run(client)
    outbox = Outbox(client, run_id, spool_root=spool)
    calls, start = [], time.perf_counter()
    for step in range(n):
        t = time.perf_counter()
        outbox.log_metrics({key: step + i / 10 for i, key in enumerate(KEYS)}, step)
        calls.append(time.perf_counter() - t)
    assert outbox.wait(600), outbox.failures
    delivered = n / (time.perf_counter() - start)
    outbox.close()
    assert len(client.get_metric_history(run_id, "lr")) == n
    return calls, delivered


def metrics_mlflow(client: MlflowClient, n: int, spool: Path) -> tuple[list[float], float]:
    run_id = new_run(client)
    calls, pending, start = [], [], time.perf_counter()
    for step in range(n):
        now = int(time.time() * 1000)
        t = time.perf_counter()
        pending.append(client.log_batch(run_id, metrics=[Metric(key, step + i / 10, now, step)
                                                         for i, key in enumerate(KEYS)], synchronous=False))
        calls.append(time.perf_counter() - t)
    for operation in pending:
        operation.wait()
    delivered = n / (time.perf_counter() - start)
    assert len(client.get_metric_history(run_id, "lr")) == n
    return calls, delivered


def files_outbox(client: MlflowClient, k: int, spool: Path) -> tuple[list[float], float]:
    run_id = new_run(client)
    outbox = Outbox(client, run_id, spool_root=spool)
    payload = os.urandom(1 << 20)
    calls, start = [], time.perf_counter()
    for i in range(k):
        path = outbox.staging_path(f"step_{i:07d}.pt")
        path.write_bytes(payload)  # the caller's torch.save: not counted, the same for both variants
        t = time.perf_counter()
        outbox.log_file(path, "checkpoints", move=True)
        calls.append(time.perf_counter() - t)
    assert outbox.wait(600), outbox.failures
    delivered = k / (time.perf_counter() - start)
    outbox.close()
    return calls, delivered


def files_mlflow(client: MlflowClient, k: int, spool: Path) -> tuple[list[float], float]:
    run_id = new_run(client)
    payload = os.urandom(1 << 20)
    calls, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(k):
            path = Path(scratch) / f"step_{i:07d}.pt"
            path.write_bytes(payload)
            t = time.perf_counter()
            client.log_artifact(run_id, str(path), "checkpoints")
            calls.append(time.perf_counter() - t)
    return calls, k / (time.perf_counter() - start)


VARIANTS = {"metrics": (("outbox", metrics_outbox), ("mlflow async", metrics_mlflow)),
            "files": (("outbox", files_outbox), ("mlflow sync", files_mlflow))}


def us(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", help="an existing mlflow server (default: start one)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--evaluations", type=int, default=300)
    parser.add_argument("--files", type=int, default=5)
    args = parser.parse_args()
    print(describe(), flush=True)
    with tempfile.TemporaryDirectory(prefix="outbox-cost-") as tmp:
        server = nullcontext(args.tracking_uri) if args.tracking_uri else mlflow_server(tmp, timeout=300)
        with server as uri:
            client = MlflowClient(uri)
            new_run(client)  # the server's first requests are slow (lazy imports): not part of a variant
            results = {(section, name): ([], []) for section, variants in VARIANTS.items() for name, _ in variants}
            for r in range(args.rounds):
                for section, variants in VARIANTS.items():
                    size = args.evaluations if section == "metrics" else args.files
                    for name, measure in (variants if r % 2 == 0 else variants[::-1]):
                        calls, rate = measure(client, size, Path(tmp) / "spool")
                        results[section, name][0].extend(calls)
                        results[section, name][1].append(rate)
                print(f"  round {r + 1}/{args.rounds} done", flush=True)
    unit = {"metrics": "evaluations/s", "files": "files/s"}
    print(f"\n{args.rounds} rounds; {args.evaluations} evaluations of 7 metrics and {args.files} files of 1 MB "
          "per variant per round")
    print(f"{'section':8} {'variant':13} {'enqueue median µs':>18} {'p99 µs':>9} {'delivery (median)':>24}")
    for (section, name), (calls, rates) in results.items():
        print(f"{section:8} {name:13} {us(calls, 0.5):18.0f} {us(calls, 0.99):9.0f} "
              f"{statistics.median(rates):10.1f} {unit[section]}")


if __name__ == "__main__":
    sys.exit(main())
