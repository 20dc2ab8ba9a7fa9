"""How training speed and memory grow with p (the dataset grows as p²) and with d_model (issue 5).

    python benchmarks/scale.py                      # CPU, writes docs/scale.png and prints the table
    python benchmarks/scale.py --device cuda --out docs/scale_cuda.png

Each point trains the Trainer's full-batch step (train fraction 0.3, d_mlp = 4·d_model, 4 heads, 1 layer) for
--steps steps after a warm-up and reports steps/s (evaluation excluded) and peak memory of training: on CUDA
torch.cuda.max_memory_allocated; on CPU each point runs in a forked child and reports its resident-memory high
water mark above what it had at the fork (the parent does no torch compute, so the fork is safe for OpenMP).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import torch

from _machine import describe
from grokking_tracked.config import preset
from grokking_tracked.train import Trainer

P_VALUES = (31, 59, 113, 199)
D_MODELS = (32, 64, 128, 256)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(p: int, d_model: int, steps: int, device: str, threads: int) -> tuple[float, float]:
    """(steps/s, peak MiB) of training one config."""
    if threads:
        torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    rss_before = 0 if cuda else _status_kib("VmRSS")
    config = preset("default", p=p, d_model=d_model, d_mlp=4 * d_model, n_heads=4, train_frac=0.3,
                    lr=1e-3, device=device, max_steps=10**6, stop_on_grok=False, checkpoint_every=0)
    trainer = Trainer(config, progress=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    rate = steps / (time.perf_counter() - started)
    if cuda:
        return rate, torch.cuda.max_memory_allocated() / 2**20
    return rate, (_status_kib("VmHWM") - rss_before) / 2**10


def _child(queue, *args):
    queue.put(measure(*args))


def measure_isolated(*args) -> tuple[float, float]:
    if args[3].startswith("cuda"):
        return measure(*args)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "scale.png"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # only for the machine line: children set their own
    print("machine:", describe(args.device), flush=True)
    rows = []
    for p in P_VALUES:
        rows.append(("p", p, 64, *measure_isolated(p, 64, args.steps, args.device, args.threads)))
        print(f"  p={p:4d} d_model=  64: {rows[-1][3]:8.2f} steps/s {rows[-1][4]:8.1f} MiB", flush=True)
    for d in D_MODELS:
        rows.append(("d_model", 113, d, *measure_isolated(113, d, args.steps, args.device, args.threads)))
        print(f"  p= 113 d_model={d:4d}: {rows[-1][3]:8.2f} steps/s {rows[-1][4]:8.1f} MiB", flush=True)

    print(f"\n{'varies':8s} {'p':>5s} {'d_model':>8s} {'train ex.':>10s} {'steps/s':>9s} {'peak MiB':>9s}")
    for varies, p, d, rate, mib in rows:
        print(f"{varies:8s} {p:5d} {d:8d} {round(0.3 * p * p):10d} {rate:9.2f} {mib:9.1f}")

    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for col, (varies, xs, label) in enumerate((("p", P_VALUES, "p (d_model 64)"),
                                               ("d_model", D_MODELS, "d_model (p 113)"))):
        sub = [r for r in rows if r[0] == varies]
        axes[0, col].plot(xs, [r[3] for r in sub], "o-")
        axes[0, col].set(xlabel=label, ylabel="training steps/s", xscale="log", yscale="log")
        axes[1, col].plot(xs, [r[4] for r in sub], "o-", color="C1")
        axes[1, col].set(xlabel=label, ylabel="peak memory of training (MiB)", xscale="log", yscale="log")
        for ax in axes[:, col]:
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"Full-batch training step, train fraction 0.3 ({args.device}, {time.strftime('%Y-%m-%d')})\n"
                 f"{describe(args.device)}", fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"figure: {os.path.abspath(args.out)}")
    print("machine at the end:", describe(args.device))


if __name__ == "__main__":
    main()
