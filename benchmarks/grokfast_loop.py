"""Minibatch steps/s on ``grokfast2024``: our Trainer against Grokfast's own training loop, on this CPU.

The paper's loop (ironjr/grokfast ``main.py``) is written here afresh, not copied, and runs in an isolated venv
(``benchmarks/.venv-grokfast/``, git-ignored; torch only, the version installed here) so that nothing of this
package is imported by it. Kept from its ``main()``: x * y mod 97 for 0 <= x < 97, 0 < y < 97 as 4 input tokens
[x, op, y, =] (vocabulary p + 2), a random half for training; ``Decoder(dim 128, num_layers 2, num_heads 4)`` of
pre-LayerNorm blocks with ``nn.MultiheadAttention`` (causal mask) and a 4 x dim GELU MLP, a final LayerNorm and
a bias-free head; ``torch.optim.Adam`` (lr 1e-3, betas (0.9, 0.98), weight decay 0.005) with a 10-update linear
warm-up (``LambdaLR``); every epoch a fresh ``randperm`` of the training set split into batches of 512
(``torch.split``), per batch the float32 cross-entropy of the last position, ``loss.item()``, backward, the EMA
gradient filter (alpha 0.98, lambda 2: a dict of per-parameter EMAs), the step, and the accuracy's ``.item()``;
then the same pass without gradients over the validation half in batches of 512. Left out: the plots and
``torch.save`` of the results every 100 epochs (file output, not training) and tqdm's bar.

Both sides are whole commands, timed from launch to exit (start-up, imports, data, training and evaluation
included; nothing here is compiled): the paper's loop as a script, ours as ``grokking-tracked run --preset
grokfast2024`` with the EMA command (``--grokfast-lambda 2 --weight-decay 0.005``), tracked into a new local store
and drawing its figures, as a user runs it. Both train the same number of optimizer steps and evaluate the
held-out half once per epoch (ours: ``eval_every`` 10 = one epoch of 10 batches, the training metrics from the
epoch's own batches as the paper's loop, plus its step-0 evaluation). Rounds alternate A/B with the same torch
threads (--threads); the load average is printed before, after and with each command. The ratio printed is ours
/ the paper's loop in steps per wall second of the whole command; steps per CPU second (every process of the
command) are printed too.

    python benchmarks/grokfast_loop.py [--epochs 20] [--rounds 3] [--threads 1] [--paper-python this]

``--paper-run ROW`` instead runs the paper's loop alone to 95 % validation accuracy (its steps beside ours in
docs/results.md: does *their* baseline grok here where ours stalls?):

    python benchmarks/grokfast_loop.py --paper-run baseline --seed 0 --epochs 6000   # 60,000 steps

``--flops`` instead counts the arithmetic of one epoch on each side (10 optimizer steps and the held-out half's
evaluation), with torch's own ``FlopCounterMode`` (matrix products, forward and backward): the work ratio bounds
the speed ratio that exact work reduction can give at equal arithmetic throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

VENV = Path(__file__).resolve().parent / ".venv-grokfast"


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not (VENV / "ready.txt").exists():
        print(f"creating {VENV} (torch only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "torch==2.13.0"], check=True)
        (VENV / "ready.txt").write_text("torch==2.13.0\n")
    return python


# --------------------------------------------------------------------------------- the paper's loop (venv side)
def paper_loop(epochs: int, threads: int, weight_decay: float = 0.005, lamb: float = 2.0, seed: int = 0,
               stop_at: float | None = None, report_every: int = 0) -> dict:
    """The paper's loop for ``epochs`` epochs (its EMA command by default; ``lamb`` 0 and ``weight_decay`` 0 are its
    baseline, ``--filter none``). With ``stop_at``, it stops at the first epoch whose validation accuracy reaches it,
    as the paper counts steps to 95 %; ``report_every`` > 0 prints the validation accuracy every that many epochs."""
    import math

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    p, dim = 97, 128

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, 4)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x):  # x: (seq, batch, dim), as nn.MultiheadAttention's default layout
            mask = torch.triu(torch.full((len(x), len(x)), -float("inf")), diagonal=1)
            x = self.ln_1(x)  # the residual is taken after ln_1, as in the paper's Block
            x = x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
            return x + self.mlp(self.ln_2(x))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens, self.positions = nn.Embedding(p + 2, dim), nn.Embedding(5, dim)
            self.layers = nn.ModuleList(Block() for _ in range(2))
            self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, p + 2, bias=False)

        def forward(self, x):
            h = self.tokens(x) + self.positions(torch.arange(x.shape[0])[:, None]).expand(-1, x.shape[1], -1)
            for layer in self.layers:
                h = layer(h)
            return self.head(self.ln_f(h))

    x, y = torch.cartesian_prod(torch.arange(p), torch.arange(1, p)).T
    data = torch.stack([x, torch.full_like(x, p + 1), y, torch.full_like(x, p), x * y % p])  # (5, N)
    train, valid = data[:, torch.randperm(data.shape[1])].split(data.shape[1] // 2, dim=1)[:2]
    model = Decoder()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: 1 if update > 10 else update / 10)
    ema: dict | None = None
    steps, reached, valid_acc = 0, None, float("nan")
    started, cpu = time.perf_counter(), time.process_time()
    for epoch in range(epochs):
        train = train[:, torch.randperm(train.shape[1])]
        correct = 0.0
        for chunk, is_train in ((train, True), (valid, False)):
            model.train(is_train)
            for batch in torch.split(chunk, 512, dim=1):
                with torch.set_grad_enabled(is_train):
                    logits = model(batch[:-1])
                    loss = F.cross_entropy(logits[-1], batch[-1])
                    total_loss = loss.item()  # noqa: F841 - the loop reads every batch's loss back
                if is_train:
                    model.zero_grad()
                    loss.backward()
                    if lamb:  # the EMA filter; the paper's --filter none skips it
                        if ema is None:
                            ema = {n: q.grad.detach().clone() for n, q in model.named_parameters()}
                        for n, q in model.named_parameters():
                            ema[n] = ema[n] * 0.98 + q.grad.detach() * (1 - 0.98)
                            q.grad = q.grad + ema[n] * lamb
                    optimizer.step()
                    scheduler.step()
                    steps += 1
                accuracy = (logits[-1].argmax(-1) == batch[-1]).float().mean().item()
                if not is_train:
                    correct += accuracy * batch.shape[1]
        valid_acc = correct / valid.shape[1]
        if report_every and (epoch + 1) % report_every == 0:
            print(f"  epoch {epoch + 1}, step {steps}: validation accuracy {valid_acc:.4f}, training loss "
                  f"{loss.item():.3g}, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        if stop_at is not None and valid_acc >= stop_at:
            reached = steps
            break
    assert math.isfinite(loss.item())
    return {"steps": steps, "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
            "torch": torch.__version__, "reached": reached, "valid_acc": valid_acc}


# --------------------------------------------------------------------------------- ours (this package)
def our_command(steps: int, threads: int, directory: str) -> list[str]:
    """``grokking-tracked run --preset grokfast2024`` with the paper's EMA command, as a user runs it: tracked into a
    new local store in ``directory``, its figures drawn at the end."""
    return [sys.executable, "-m", "grokking_tracked", "run", "--preset", "grokfast2024", "--max-steps", str(steps),
            "--no-stop-on-grok", "--no-progress", "--grokfast-lambda", "2", "--grokfast-alpha", "0.98",
            "--weight-decay", "0.005", "--set", "checkpoint_every=0"]


def timed(command: list[str], env: dict, cwd: str | None = None) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process and its children, stdout) of one whole command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{out.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, out.stdout


def count_flops() -> None:
    """One epoch's FLOPs (torch.utils.flop_counter: matmuls and attention, forward and backward) of the paper's loop
    and of our Trainer on grokfast2024 with the EMA command: 10 training steps, then the held-out evaluation."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from grokking_tracked.config import preset
    from grokking_tracked.train import Trainer

    with FlopCounterMode(display=False) as paper:
        steps = paper_loop(1, torch.get_num_threads())["steps"]
    trainer = Trainer(preset("grokfast2024", grokfast_lambda=2.0, weight_decay=0.005), progress=False)
    with FlopCounterMode(display=False) as train:
        for _ in range(10):
            trainer.train_step()
    with FlopCounterMode(display=False) as evaluation:
        trainer.evaluate()
    paper_total, ours_total = paper.get_total_flops(), train.get_total_flops() + evaluation.get_total_flops()
    print(f"{describe()}")
    print(f"the paper's loop, one epoch ({steps} steps and the validation half): {paper_total / 1e9:.2f} GFLOP, "
          f"{paper_total / steps / 1e9:.2f} GFLOP a step")
    print(f"ours, one epoch (10 steps {train.get_total_flops() / 1e9:.2f} GFLOP, the held-out half "
          f"{evaluation.get_total_flops() / 1e9:.2f} GFLOP): {ours_total / 1e9:.2f} GFLOP, "
          f"{ours_total / 10 / 1e9:.2f} GFLOP a step")
    print(f"work ratio, the paper's / ours, per step: x{(paper_total / steps) / (ours_total / 10):.2f}")


def load() -> str:
    return "%.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20, help="epochs per round (10 steps each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    parser.add_argument("--paper-python", default=None,
                        help="interpreter of the paper's loop (default: the isolated venv, created on first use; "
                             "'this': this interpreter without PYTHONPATH: the loop imports torch only)")
    parser.add_argument("--worker", choices=("paper",), help=argparse.SUPPRESS)
    parser.add_argument("--paper-run", choices=("baseline", "ema", "confound"),
                        help="instead of timing: run the paper's loop alone, in this interpreter, on one of its three "
                             "rows (baseline: --filter none, weight decay 0) until 95 %% validation accuracy or "
                             "--epochs, printing the accuracy every 100 epochs; then one JSON line")
    parser.add_argument("--seed", type=int, default=0, help="with --paper-run: torch.manual_seed")
    parser.add_argument("--flops", action="store_true", help="count one epoch's FLOPs on each side instead of timing")
    args = parser.parse_args()
    if args.flops:
        count_flops()
        return
    if args.worker == "paper":
        print(json.dumps(paper_loop(args.epochs, args.threads)))
        return
    if args.paper_run:
        weight_decay, lamb = {"baseline": (0.0, 0.0), "ema": (0.005, 2.0), "confound": (0.005, 0.0)}[args.paper_run]
        import torch  # only to print the threads it trains on (paper_loop sets the same)

        torch.set_num_threads(args.threads)
        print(f"{describe()}; the paper's loop, row {args.paper_run} (weight decay {weight_decay}, lambda {lamb}), "
              f"seed {args.seed}, at most {args.epochs} epochs, {args.threads} thread(s)", flush=True)
        print(json.dumps(paper_loop(args.epochs, args.threads, weight_decay, lamb, args.seed, stop_at=0.95,
                                    report_every=100)))
        return
    python = sys.executable if args.paper_python == "this" else args.paper_python or str(ensure_venv())
    here = Path(__file__).resolve()
    steps = args.epochs * 10
    paper_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS")}
    ours_env = {**os.environ, "PYTHONPATH": str(here.parent.parent), "GROKKING_TORCH_THREADS": str(args.threads)}
    ours_env.pop("MLFLOW_TRACKING_URI", None)
    print(f"{describe()}; {steps} steps a command, {args.threads} thread(s) each, start-up included")
    print(f"load average before: {load()}", flush=True)
    rates: dict[str, list[float]] = {"paper": [], "ours": []}
    cpu_rates: dict[str, list[float]] = {"paper": [], "ours": []}
    for round_ in range(args.rounds):
        for name in ("paper", "ours"):
            with tempfile.TemporaryDirectory() as directory:
                if name == "paper":
                    command = [python, str(here), "--worker", "paper", "--epochs", str(args.epochs),
                               "--threads", str(args.threads)]
                    wall, cpu, stdout = timed(command, paper_env)
                    trained = json.loads(stdout.strip().splitlines()[-1])["steps"]
                else:
                    wall, cpu, stdout = timed(our_command(steps, args.threads, directory), ours_env, cwd=directory)
                    trained = int(re.search(r"(\d+) steps in", stdout).group(1))
            rates[name].append(trained / wall)
            cpu_rates[name].append(trained / cpu)
            print(f"round {round_} {name:>5}: {trained} steps, whole command {wall:.1f} s "
                  f"({rates[name][-1]:.2f} steps/s), CPU {cpu:.1f} s, load avg {load()}", flush=True)
    print(f"load average after: {load()}")
    paper, ours = statistics.median(rates["paper"]), statistics.median(rates["ours"])
    print(f"median steps per wall second, whole commands: ours {ours:.2f}, the paper's loop {paper:.2f}: "
          f"ratio ours / paper x{ours / paper:.2f}")
    paper, ours = statistics.median(cpu_rates["paper"]), statistics.median(cpu_rates["ours"])
    print(f"median steps per CPU second (every process of the command): ours {ours:.2f}, the paper's loop "
          f"{paper:.2f}: x{ours / paper:.2f}")


if __name__ == "__main__":
    main()
