"""Speed of the training loop, measured side by side with the earlier project's loop (issue 2 and issue 5).

    python benchmarks/speed.py                     # everything (about 4-6 minutes on 2 busy cores)
    python benchmarks/speed.py --only seed         # steps/s, ours vs the earlier loop
    python benchmarks/speed.py --only default,tracking --threads 1
    python benchmarks/speed.py --only threads --rounds 2 --thread-steps 200   # lone run vs study worker

Sections:
  seed      steps/s on the `seed` preset of our tracked run (run_experiment into a local SQLite store,
            evaluation every 50 steps) and of the earlier project's own loop on TransformerLens 3.9
            (benchmarks/earlier_loop.py: its venv is created on first use, a few minutes), alternated for
            --rounds rounds; medians and their ratio. --with-autograd adds our trainer without the
            hand-written step (grokking_tracked/fastpath.py).
  profile   torch.profiler over `seed` training steps, autograd vs the hand-written step: ms/step by op
            group (matmul, float64 softmax, gather/scatter, optimizer, the rest) and the top ops.
  default   seconds from the first training step to the generalization event, `default` preset.
  threads   steps/s of the `default`, `seed` and `nanda2023` presets (Trainer, no tracking, each preset's own
            eval_every) with the threads a lone `run` gets (every available core) and with 1 thread (a study
            worker), alternated round by round: --rounds rounds of --thread-steps steps each after a warm-up.
  cleanup   `nanda2023` (Nanda et al. 2023's run) tracked into a local store until its clean-up's end, as
            `grokking-tracked run --preset nanda2023` trains it: training seconds and the event's step, with the
            threads a lone `run` gets and with 1 thread (--cleanup-threads lone,1; each is ~8-15 min here).
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
from pathlib import Path

import torch

from _machine import describe
from earlier_loop import DEFAULT_VENV, EarlierLoop
from grokking_tracked.config import preset
from grokking_tracked.train import Callback, Trainer


class EvalClock(Callback):
    """Wall time at the end of every evaluation, and the step of the generalization event."""

    def __init__(self):
        self.at: dict[int, float] = {}
        self.cpu_at: dict[int, float] = {}  # CPU time of the whole process (MLflow's threads included)
        self.generalized: int | None = None

    def on_eval(self, trainer, step, metrics, events):
        self.at[step] = time.perf_counter()
        self.cpu_at[step] = time.process_time()
        if any(e["event"] == "generalization" for e in events):
            self.generalized = step


def ours_steps_per_s(steps: int, tmp: str, warmup: int = 100) -> tuple[float, float]:
    """Our `seed` run as a user gets it: tracked into a local SQLite store, evaluation every 50 steps.
    Returns steps per wall second and per CPU second of the process."""
    from grokking_tracked.tracking import run_experiment

    config = preset("seed", max_steps=warmup + steps, eval_every=50, stop_on_grok=False)
    clock = EvalClock()
    run_experiment(config, tracking_uri=f"sqlite:///{tmp}/mlflow.db", progress=False, callbacks=[clock])
    return (steps / (clock.at[warmup + steps] - clock.at[warmup]),
            steps / (clock.cpu_at[warmup + steps] - clock.cpu_at[warmup]))


def section_seed(args) -> None:
    """Ours (tracked, eval every 50) and the earlier project's loop (TransformerLens 3.9, a worker process of its
    own venv, torch's default threads), alternated round by round so that the machine's load hits both."""
    variants = {"ours": "1", "ours (autograd)": "0"} if args.with_autograd else {"ours": "1"}
    rates: dict[str, list[float]] = {name: [] for name in [*variants, "earlier"]}
    cpu_rates: dict[str, list[float]] = {name: [] for name in rates}  # steps per CPU second
    earlier_loop = EarlierLoop(args.earlier_venv, args.earlier_start_epoch, args.earlier_threads)
    with tempfile.TemporaryDirectory() as tmp, earlier_loop as earlier:
        info = earlier.info
        print(f"  earlier loop: TransformerLens {info['transformer_lens']}, torch {info['torch']}, "
              f"{info['threads']} torch threads, epochs from {args.earlier_start_epoch}", flush=True)
        cwd = os.getcwd()
        os.chdir(tmp)  # the SQLite store puts artifacts under ./mlruns: keep them in the temp dir
        try:
            earlier.run(5)  # warm-up (and its early-grokking window starts filling)
            for name, flag in variants.items():
                os.environ["GROKKING_FASTPATH"] = flag
                ours_steps_per_s(20, tmp, warmup=50)  # warm-up: MLflow tables, allocator
            for r in range(args.rounds):
                order = [*variants, "earlier"]
                for name in order[r % len(order):] + order[:r % len(order)]:  # rotate: nobody always goes first
                    if name == "earlier":
                        wall, cpu = earlier.run(args.earlier_steps)
                        rates[name].append(args.earlier_steps / wall)
                        cpu_rates[name].append(args.earlier_steps / cpu)
                    else:
                        os.environ["GROKKING_FASTPATH"] = variants[name]
                        wall_rate, cpu_rate = ours_steps_per_s(args.steps, tmp)
                        rates[name].append(wall_rate)
                        cpu_rates[name].append(cpu_rate)
                print(f"  round {r + 1}: " + "   ".join(f"{k} {v[-1]:6.2f} steps/s" for k, v in rates.items())
                      + f"   ratio {rates['ours'][-1] / rates['earlier'][-1]:5.2f}x", flush=True)
        finally:
            os.environ.pop("GROKKING_FASTPATH", None)
            os.chdir(cwd)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    per_round = statistics.median(o / e for o, e in zip(rates["ours"], rates["earlier"]))
    print(f"seed preset (p=113, d_model 64, d_mlp 256, 4 heads, full batch 3,830): ours {medians['ours']:.2f} steps/s "
          f"(tracked, local SQLite store, eval every 50, {args.steps} steps/round, 1 torch thread); earlier loop "
          f"{medians['earlier']:.2f} steps/s (TransformerLens {info['transformer_lens']} HookedTransformer, "
          f"{info['threads']} threads, whole test set every step, {args.earlier_steps} steps/round); "
          f"ratio of the medians {medians['ours'] / medians['earlier']:.2f}x, median of the per-round ratios "
          f"{per_round:.2f}x")
    print("seed preset, steps per CPU second of each process (less load-sensitive than wall time for our 1-thread "
          "process, though shared caches and cores still slow it; the "
          "earlier loop's 2 threads spin-wait, so its CPU time overstates its work): "
          + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in cpu_rates.items()))
    if "ours (autograd)" in medians:
        print(f"seed preset, our trainer with autograd instead of the hand-written step: "
              f"{medians['ours (autograd)']:.2f} steps/s ({medians['ours'] / medians['ours (autograd)']:.2f}x slower "
              f"than with it, {medians['ours (autograd)'] / medians['earlier']:.2f}x the earlier loop)")


def section_profile(args) -> None:
    """Where a `seed` training step spends its time (torch.profiler, self CPU time per op), with the
    hand-written step and with autograd, on 1 thread (as the trainer runs). Profiled steps run slower than
    unprofiled ones: compare shares."""
    from torch.profiler import ProfilerActivity, profile

    groups = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
              "float64 softmax / log-softmax": ("aten::_softmax", "aten::_log_softmax",
                                                "aten::_log_softmax_backward_data", "aten::_softmax_backward_data"),
              "gather / scatter": ("aten::index_select", "aten::index", "aten::scatter_add_", "aten::index_add_",
                                   "aten::_index_put_impl_", "aten::embedding_dense_backward", "aten::gather",
                                   "aten::scatter_"),
              "optimizer": ("aten::_fused_adamw_",)}
    for flag, name in (("0", "autograd"), ("1", "hand-written step")):
        os.environ["GROKKING_FASTPATH"] = flag
        trainer = Trainer(preset("seed", eval_every=10 ** 6), progress=False)
        for _ in range(5):
            trainer.train_step()
        started = time.perf_counter()  # wall time: the profiler's op times are wall time too
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                trainer.train_step()
        total = (time.perf_counter() - started) / args.profile_steps * 1e3
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        per_group = {g: sum(e.self_cpu_time_total for e in events if e.key in keys) / args.profile_steps / 1e3
                     for g, keys in groups.items()}
        per_group["other ops, Python, profiler"] = total - sum(per_group.values())
        print(f"profile, seed step, {name}: {total:.1f} ms/step (profiled, wall); "
              + ", ".join(f"{g} {ms:.1f} ms ({100 * ms / total:.0f}%)" for g, ms in per_group.items()))
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
        print("    top ops: " + ", ".join(f"{e.key[6:]} {e.self_cpu_time_total / args.profile_steps / 1e3:.1f} ms"
                                         for e in top))
    os.environ.pop("GROKKING_FASTPATH", None)


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


class RateClock(Callback):
    """Steps per second between the first evaluation at or after ``warmup`` and the last one."""

    def __init__(self, warmup: int):
        self.warmup, self.first, self.last = warmup, None, None

    def on_eval(self, trainer, step, metrics, events):
        if step >= self.warmup:
            now = (step, time.perf_counter())
            self.first = self.first or now
            self.last = now

    @property
    def rate(self) -> float:
        return (self.last[0] - self.first[0]) / (self.last[1] - self.first[1])


def section_threads(args) -> None:
    """Each preset at every available core vs 1 thread, alternated so that the machine's load hits both."""
    from grokking_tracked.train import available_cores

    cores = available_cores()
    presets = args.thread_presets.split(",")
    rates: dict[tuple[str, int], list[float]] = {(name, t): [] for name in presets for t in (cores, 1)}
    for r in range(args.rounds):
        for name in presets:
            for threads in ((cores, 1) if r % 2 == 0 else (1, cores)):
                base = preset(name)
                warmup = base.eval_every
                # evaluations at the preset's own interval; the budget rounded up to whole intervals
                steps = warmup + max(1, round(args.thread_steps / base.eval_every)) * base.eval_every
                config = base.replace(max_steps=steps, stop_on_grok=False, checkpoint_every=0)
                clock = RateClock(warmup)
                Trainer(config, [clock], progress=False, threads=threads).train()
                rates[(name, threads)].append(clock.rate)
                print(f"  round {r + 1} {name:9s} {threads} thread(s): {clock.rate:6.1f} steps/s "
                      f"({describe().rsplit(', ', 1)[-1]})", flush=True)
    print(f"threads: medians over {args.rounds} rounds, {cores} available cores")
    for name in presets:
        many, one = statistics.median(rates[(name, cores)]), statistics.median(rates[(name, 1)])
        print(f"  {name:9s} {cores} threads {many:6.1f} steps/s   1 thread {one:6.1f} steps/s   ratio {many / one:.2f}x")


def section_cleanup(args) -> None:
    """The paper's run to the end of its clean-up phase, whole, once per thread setting (a projection from a
    short rate would miss the evaluations, progress measures and checkpoints the real run pays for)."""
    from grokking_tracked.tracking import run_experiment
    from grokking_tracked.train import available_cores

    lone = available_cores()
    for choice in args.cleanup_threads.split(","):
        threads = lone if choice == "lone" else int(choice)
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)  # the SQLite store puts artifacts under ./mlruns: keep them in the temp dir
            try:
                events: dict[str, int] = {}

                class Events(Callback):
                    def on_eval(self, trainer, step, metrics, found):
                        events.update({e["event"]: e["step"] for e in found})

                wall, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
                result = run_experiment(preset("nanda2023"), tracking_uri=f"sqlite:///{tmp}/mlflow.db",
                                        progress=False, threads=threads, callbacks=[Events()]).result
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            finally:
                os.chdir(cwd)
        end = events.get("cleanup_end")
        print(f"cleanup, nanda2023, {threads} thread(s): "
              + (f"clean-up's end at step {end}" if end else "no clean-up's end")
              + f", {result.final_step} steps in {result.train_seconds:.0f} s of training "
              f"({result.train_seconds / 60:.1f} min, {result.final_step / result.train_seconds:.1f} steps/s), "
              f"{wall:.0f} s wall, {cpu:.0f} CPU s; events {events}; load average {load:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end", flush=True)


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
    parser.add_argument("--earlier-venv", type=Path, default=DEFAULT_VENV,
                        help="venv for TransformerLens 3.9 (created on first use)")
    parser.add_argument("--earlier-start-epoch", type=int, default=5001,
                        help="the earlier loop's epoch counter at the start (its curriculum admits every example "
                             "from epoch 5,000 on)")
    parser.add_argument("--earlier-threads", type=int, default=0,
                        help="torch threads of the earlier loop (0: torch's default, as the earlier project ran)")
    parser.add_argument("--with-autograd", action="store_true",
                        help="seed: also time our trainer with GROKKING_FASTPATH=0 (autograd) in the same rounds")
    parser.add_argument("--default-runs", type=int, default=1)
    parser.add_argument("--profile-steps", type=int, default=30)
    parser.add_argument("--tracking-rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--thread-steps", type=int, default=300, help="threads: steps timed per preset and round")
    parser.add_argument("--thread-presets", default="default,seed,nanda2023")
    parser.add_argument("--cleanup-threads", default="lone,1",
                        help="cleanup: thread settings in order, 'lone' = every available core, or a number")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("machine:", describe())
    sections = {"seed": section_seed, "profile": section_profile, "default": section_default,
                "tracking": section_tracking, "threads": section_threads,
                "cleanup": section_cleanup}
    for name in args.only.split(","):
        sections[name](args)
    print("machine at the end:", describe())


if __name__ == "__main__":
    main()
