"""Speed of the training loop, measured side by side with the earlier project's loop (issue 2 and issue 5).

    python benchmarks/speed.py                     # everything (about 4-6 minutes on 2 busy cores)
    python benchmarks/speed.py --only seed         # steps/s, ours vs the earlier loop
    python benchmarks/speed.py --only default,tracking --threads 1

Sections:
  seed      steps/s of our Trainer and of the earlier loop (benchmarks/earlier_loop.py) on the `seed`
            preset, alternated for --rounds rounds; medians and their ratio.
  default   seconds from the first training step to the generalization event, `default` preset.
  tracking  the same `default` run without MLflow, with a local SQLite store, and with a real
            `mlflow server` on a loopback port: wall seconds per training step, eval_every 10.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

from _machine import describe
from earlier_loop import EarlierLoop
from grokking_tracked.config import preset
from grokking_tracked.train import Callback, Trainer


class EvalClock(Callback):
    """Wall time at the end of every evaluation, and the step of the generalization event."""

    def __init__(self):
        self.at: dict[int, float] = {}
        self.generalized: int | None = None

    def on_eval(self, trainer, step, metrics, events):
        self.at[step] = time.perf_counter()
        if any(e["event"] == "generalization" for e in events):
            self.generalized = step


def ours_steps_per_s(steps: int, warmup: int = 100) -> float:
    config = preset("seed", max_steps=warmup + steps, stop_on_grok=False, checkpoint_every=0)
    clock = EvalClock()
    Trainer(config, [clock], progress=False).train()
    return steps / (clock.at[warmup + steps] - clock.at[warmup])


def earlier_steps_per_s(steps: int) -> float:
    loop = EarlierLoop()
    loop.run(3)  # warm-up
    return steps / loop.run(steps)


def section_seed(args) -> None:
    ours, earlier = [], []
    for r in range(args.rounds):
        ours.append(ours_steps_per_s(args.steps))
        earlier.append(earlier_steps_per_s(args.earlier_steps))
        print(f"  round {r + 1}: ours {ours[-1]:6.2f} steps/s   earlier loop {earlier[-1]:5.2f} steps/s   "
              f"ratio {ours[-1] / earlier[-1]:5.2f}x", flush=True)
    o, e = statistics.median(ours), statistics.median(earlier)
    print(f"seed preset (p=113, d_model 64, full batch): ours {o:.2f} steps/s ({args.steps} steps/round, "
          f"eval every 100), earlier loop {e:.2f} steps/s ({args.earlier_steps} steps/round, eval every step); "
          f"median ratio {o / e:.2f}x")


def section_default(args) -> None:
    seconds = []
    for _ in range(args.default_runs):
        clock = EvalClock()
        result = Trainer(preset("default"), [clock], progress=False).train()
        if clock.generalized is None:
            print(f"default preset: did not generalize in {result.final_step} steps")
            return
        seconds.append(clock.at[clock.generalized] - clock.at[0])
        print(f"  default preset: generalized at step {clock.generalized}, {seconds[-1]:.1f} s after the first step",
              flush=True)
    print(f"default preset: median {statistics.median(seconds):.1f} s from the first step to generalization")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(tmp: str, timeout: float = 120.0):
    port = _free_port()
    mlflow = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen([mlflow, "server", "--backend-store-uri", f"sqlite:///{tmp}/server.db",
                             "--artifacts-destination", f"{tmp}/server-artifacts", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.perf_counter() - started > timeout:
                raise RuntimeError("mlflow server did not come up")
            time.sleep(0.5)
        print(f"  mlflow server up on {url} after {time.perf_counter() - started:.0f} s", flush=True)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def section_tracking(args) -> None:
    try:
        from grokking_tracked.tracking import MlflowTracker, run_experiment
    except ImportError as exc:
        print(f"tracking: skipped, grokking_tracked.tracking.run_experiment not importable ({exc})")
        return
    config = preset("default", eval_every=10)

    def per_step(result) -> float:
        return result.train_seconds / max(1, result.final_step)

    # Wall-clock overhead on 2 shared cores is noisy (+-10 % run to run), so the two parts of the overhead are
    # also counted directly: seconds the training loop spends inside the tracker's callbacks (blocking), and
    # CPU seconds of the process's other threads (MLflow's async logging, uploads: they compete for the GIL).
    blocking = {"local sqlite": [], "mlflow server": []}
    background = {"local sqlite": [], "mlflow server": []}
    inside = [0.0]
    for hook in ("on_eval", "on_checkpoint"):
        original = getattr(MlflowTracker, hook)

        def timed(self, *a, _original=original):
            t = time.perf_counter()
            _original(self, *a)
            inside[0] += time.perf_counter() - t

        setattr(MlflowTracker, hook, timed)

    def tracked(name: str, uri: str, r: int) -> float:
        inside[0] = 0.0
        process, thread = time.process_time(), time.thread_time()
        result = run_experiment(config, tracking_uri=uri, run_name=f"bench-{r}", progress=False).result
        if r >= 0:
            blocking[name].append(inside[0] / result.train_seconds)
            background[name].append(((time.process_time() - process) - (time.thread_time() - thread))
                                    / result.train_seconds)
        return per_step(result)

    rows: dict[str, list[float]] = {"no tracking": [], "local sqlite": [], "mlflow server": []}
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # the SQLite store puts artifacts under ./mlruns: keep them in the temp dir
        try:
            with mlflow_server(tmp) as url:
                measure = {
                    "no tracking": lambda r: per_step(Trainer(config, progress=False).train()),
                    "local sqlite": lambda r: tracked("local sqlite", f"sqlite:///{tmp}/local.db", r),
                    "mlflow server": lambda r: tracked("mlflow server", url, r),
                }
                for name, run in measure.items():  # warm-up: first-run costs (allocator, DB tables, connections)
                    run(-1)
                names = list(measure)
                for r in range(args.tracking_rounds):
                    for name in names[r % 3:] + names[:r % 3]:  # rotate the order: no variant always goes first
                        rows[name].append(measure[name](r))
                    print("  round %d: " % (r + 1) + "   ".join(f"{k} {v[-1] * 1e3:.2f} ms/step" for k, v in rows.items()),
                          flush=True)
        finally:
            os.chdir(cwd)
    base = statistics.median(rows["no tracking"])
    for name, values in rows.items():
        m = statistics.median(values)
        paired = statistics.median(v / b - 1 for v, b in zip(values, rows["no tracking"]))
        print(f"tracking, default preset, eval every 10: {name:13s} {m * 1e3:6.2f} ms/step "
              f"(overhead of the medians {100 * (m / base - 1):+.1f}%, median of the per-round overheads "
              f"{100 * paired:+.1f}%)")
    for name in blocking:
        print(f"tracking, {name}: the loop spent {100 * statistics.median(blocking[name]):.2f}% of its training "
              f"time inside the tracker; other threads used {100 * statistics.median(background[name]):.2f}% "
              f"as much CPU time (medians over rounds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="seed,default,tracking")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--earlier-steps", type=int, default=60)
    parser.add_argument("--default-runs", type=int, default=1)
    parser.add_argument("--tracking-rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("machine:", describe())
    sections = {"seed": section_seed, "default": section_default, "tracking": section_tracking}
    for name in args.only.split(","):
        sections[name](args)
    print("machine at the end:", describe())


if __name__ == "__main__":
    main()
