"""The earlier project's training loop on TransformerLens 3.9's HookedTransformer: the speed baseline.

The earlier project (khairul-me/grokking-transformer-analysis, ``grokking_final.py``, whose header names it
``grokking_research.py``) trained a TransformerLens 3.x ``HookedTransformer``. TransformerLens 4 removed that
class, so this module installs TransformerLens 3.9 (its last release) into an isolated venv,
``benchmarks/.venv-earlier/`` by default (git-ignored; never one of the package's dependencies), and runs
the loop in a subprocess of that venv with torch's default thread count:

    python benchmarks/earlier_loop.py                  # set up the venv if needed, then 3 x 60 epochs
    python benchmarks/earlier_loop.py --setup-only

``EarlierLoop`` is the parent-side handle that ``benchmarks/speed.py`` alternates with our trainer: the
worker process builds the experiment once, then trains N more epochs per request, so start-up (importing
TransformerLens takes seconds) is paid once and rounds can interleave.

Kept from the earlier code (its ``main()``: strategy "adaptive_curriculum"), written here afresh:
  * data: all p^2 pairs [a, b, =] with p = 113, split by ``torch.randperm`` after ``torch.manual_seed(999)``,
    the first int(0.3 p^2) = 3,830 pairs for training (the whole set every epoch: no mini-batches);
  * model: ``HookedTransformerConfig(d_vocab=p+1, d_vocab_out=p, n_ctx=3, seed=999, n_layers=1, n_heads=4,
    d_model=64, d_head=16, d_mlp=256, act_fn="relu", normalization_type=None)``, every ``b_`` parameter
    frozen (requires_grad False);
  * optimiser: ``torch.optim.AdamW(lr 1e-3, weight_decay 1.0, betas (0.9, 0.98))``, torch's default
    implementation; ``ReduceLROnPlateau(factor 0.5, patience 1000, min_lr 1e-5)`` stepped with the train
    loss every epoch ("adaptive" lr);
  * every epoch: the curriculum mask (difficulty = mean of a/(p-1), b/(p-1); threshold 0.3 before epoch
    1,000, 0.6 before 5,000, then 1.0), the full forward over all 3 positions, float32 cross-entropy and
    accuracy of the last position (``.item()`` each), backward, step, ``zero_grad(set_to_none=True)``;
    evaluation of the whole test set under ``inference_mode`` (loss and accuracy, ``.item()`` each);
    the four metric lists; the early-grokking score over the last 100 losses (NumPy std and means, a
    print when it exceeds 0.1); the lr / weight-decay / batch-size bookkeeping (the "increasing" weight
    decay is computed and recorded but, as in the earlier code, never applied to the optimiser); a tqdm
    bar over the 25,000 epochs whose postfix (4 formatted numbers) is set, and so redrawn, every epoch;
  * every 5,000 epochs: ``torch.save`` of a checkpoint dict and the mechanistic tracking (two
    ``run_with_cache`` passes over the training set, weight copies, per-parameter gradient norms).

What differs: CPU only (the earlier code's CUDA autocast branch is inactive on a CPU there too); the
final analysis and plots after 25,000 epochs are not run; timing starts at ``--start-epoch`` (default
5,001): from epoch 5,000 on the curriculum admits the whole training set, the regime of 80 % of the
earlier run's epochs (``--start-epoch 0`` measures its cheaper first epochs on a 30 % / 60 % subset). The
loop's prints and its progress bar go to a log file instead of a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_VENV = Path(__file__).resolve().parent / ".venv-earlier"
PACKAGES = (["torch==2.13.0"], ["transformer-lens==3.9.*"])  # torch first: the CPU wheel on disk, not a CUDA one


# ---------------------------------------------------------------------------------------------- parent side
def ensure_venv(venv: Path = DEFAULT_VENV) -> Path:
    """The venv's python, creating the venv and installing TransformerLens 3.9 into it the first time."""
    python = venv / "bin" / "python"
    marker = venv / "earlier-loop-ready.txt"
    if marker.exists():
        return python
    print(f"earlier loop: creating {venv} with TransformerLens 3.9 (a few minutes the first time)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for packages in PACKAGES:
        pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], capture_output=True,
                             text=True)
        if pip.returncode:
            raise RuntimeError(f"pip install {' '.join(packages)} into {venv} failed:\n{pip.stderr[-3000:]}")
    versions = subprocess.run(
        [str(python), "-c", "import torch, transformer_lens; from transformer_lens import HookedTransformer; "
                            "from importlib.metadata import version; "
                            "print('torch', torch.__version__, 'transformer-lens', version('transformer-lens'))"],
        check=True, capture_output=True, text=True).stdout.strip()
    marker.write_text(versions + "\n")
    return python


class EarlierLoop:
    """A worker process of the venv running the earlier loop; ``run(n)`` trains n more epochs and returns
    (wall seconds, CPU seconds of the worker process: every torch thread, spin-waiting included)."""

    def __init__(self, venv: Path = DEFAULT_VENV, start_epoch: int = 5001, threads: int = 0):
        python = ensure_venv(venv)
        self.workdir = tempfile.TemporaryDirectory(prefix="earlier-loop-")  # its experiments/ folder goes here
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GROKKING_TORCH_THREADS")}
        self.log = open(Path(self.workdir.name) / "loop.log", "w")
        self.proc = subprocess.Popen([str(python), str(Path(__file__).resolve()), "--worker",
                                      "--start-epoch", str(start_epoch), "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=self.workdir.name, env=env)
        self.info = self._reply()  # versions and thread count, once the experiment is built

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            tail = (Path(self.workdir.name) / "loop.log").read_text()[-2000:]
            raise RuntimeError(f"earlier-loop worker exited ({self.proc.wait()}):\n{tail}")
        return json.loads(line)

    def run(self, epochs: int) -> tuple[float, float]:
        self.proc.stdin.write(f"{epochs}\n")
        self.proc.stdin.flush()
        reply = self._reply()
        return reply["seconds"], reply["cpu_seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.log.close()
        self.workdir.cleanup()

    def __enter__(self) -> "EarlierLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- worker side
# Runs inside the venv: imports torch, numpy, einops, tqdm and TransformerLens 3.9 only (not grokking_tracked).
class EarlierExperiment:
    P, FRAC_TRAIN, EPOCHS, EVERY = 113, 0.3, 25_000, 5_000  # EVERY: checkpoints and mechanistic tracking

    def __init__(self, start_epoch: int):
        import einops
        import numpy as np
        import torch
        from tqdm.auto import tqdm
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        self.np, self.torch = np, torch
        torch.manual_seed(999)
        np.random.seed(598)
        self.dir = Path("experiments") / time.strftime("grokking_%Y%m%d_%H%M%S")
        for sub in ("weights", "heatmaps", "metrics", "checkpoints", "analysis"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        p = self.P
        self.config = {"p": p, "frac_train": self.FRAC_TRAIN, "lr": 1e-3, "wd": 1.0, "betas": [0.9, 0.98],
                       "num_epochs": self.EPOCHS, "checkpoint_every": self.EVERY, "batch_size": 2048,
                       "model_config": dict(n_layers=1, n_heads=4, d_model=64, d_head=16, d_mlp=256,
                                            act_fn="relu", normalization_type=None)}
        (self.dir / "config.json").write_text(json.dumps(self.config, indent=4))

        pairs = torch.stack([einops.repeat(torch.arange(p), "i -> (i j)", j=p),
                             einops.repeat(torch.arange(p), "j -> (i j)", i=p),
                             torch.full((p * p,), p)], dim=1)
        labels = (pairs[:, 0] + pairs[:, 1]) % p
        order = torch.randperm(p * p)
        cut = int(p * p * self.FRAC_TRAIN)
        self.train_x, self.train_y = pairs[order[:cut]], labels[order[:cut]]
        self.test_x, self.test_y = pairs[order[cut:]], labels[order[cut:]]

        cfg = HookedTransformerConfig(d_vocab=p + 1, d_vocab_out=p, n_ctx=3, seed=999, device="cpu",
                                      **self.config["model_config"])
        self.model = HookedTransformer(cfg)
        for name, param in self.model.named_parameters():
            if "b_" in name:
                param.requires_grad = False
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=0.5, patience=1000,
                                                                    min_lr=1e-5)
        self.losses: dict[str, list[float]] = {"train": [], "test": [], "train_acc": [], "test_acc": []}
        self.bookkeeping: dict[str, list[float]] = {"lr": [], "wd": [], "batch_size": [], "score": []}
        self.tracked: list[dict] = []
        self.bar = tqdm(range(start_epoch, self.EPOCHS), desc="Training")
        self.epochs = iter(self.bar)

    def _loss_and_accuracy(self, logits, labels):
        logits = logits[:, -1]
        loss = self.torch.nn.functional.cross_entropy(logits, labels)
        return loss, (logits.argmax(dim=-1) == labels).float().mean().item()

    def _curriculum(self, epoch: int):
        threshold = 0.3 if epoch < 1000 else 0.6 if epoch < 5000 else 1.0
        difficulty = (self.train_x[:, :2].float() / (self.P - 1)).mean(dim=1)
        keep = difficulty <= threshold
        return self.train_x[keep], self.train_y[keep]

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        self.model.train()
        x, y = self._curriculum(epoch)
        loss, accuracy = self._loss_and_accuracy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step(loss)
        return loss.item(), accuracy

    def _evaluate(self) -> tuple[float, float]:
        self.model.eval()
        with self.torch.inference_mode():
            loss, accuracy = self._loss_and_accuracy(self.model(self.test_x), self.test_y)
        return loss.item(), accuracy

    def _early_grokking(self, epoch: int, window: int = 100) -> None:
        train, test = self.losses["train"], self.losses["test"]
        if len(train) < window:
            return
        recent_train, recent_test = train[-window:], test[-window:]
        improvement = (recent_test[0] - recent_test[-1]) / recent_test[0]
        ratio = self.np.mean(recent_test) / self.np.mean(recent_train)
        score = improvement * ratio / (self.np.std(recent_train) + 1e-8)
        self.bookkeeping["score"].append(score)
        if score > 0.1:
            print(f"\nEarly grokking detected at epoch {epoch} with score {score:.4f}")

    def _every_5000(self, epoch: int) -> None:
        torch = self.torch
        self.model.eval()
        with torch.no_grad():
            _, cache = self.model.run_with_cache(self.train_x)
            pattern = cache["pattern", 0].numpy()
            _, cache = self.model.run_with_cache(self.train_x)
            stats = {k: cache[k, 0].numpy() for k in ("resid_pre", "resid_post", "mlp_out", "attn_out")}
        self.tracked.append({
            "pattern": pattern,
            "weights": {name: p.detach().clone() for name, p in self.model.named_parameters() if "W_" in name},
            "activations": {k: (v.mean(), v.std(), (v == 0).mean(), self.np.linalg.norm(v)) for k, v in stats.items()},
            "gradients": {name: (p.grad.norm().item(), p.norm().item()) for name, p in self.model.named_parameters()
                          if p.requires_grad and p.grad is not None},
        })
        torch.save({"epoch": epoch, "model_state_dict": self.model.state_dict(),
                    "optimizer_state_dict": self.optimizer.state_dict(), "train_loss": self.losses["train"][-1],
                    "test_loss": self.losses["test"][-1], "config": self.config},
                   self.dir / "checkpoints" / f"checkpoint_epoch_{epoch}.pt")

    def train(self, epochs: int) -> tuple[float, float]:
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(epochs):
            epoch = next(self.epochs)
            train_loss, train_acc = self._train_epoch(epoch)
            test_loss, test_acc = self._evaluate()
            for key, value in zip(self.losses, (train_loss, test_loss, train_acc, test_acc)):
                self.losses[key].append(value)
            if epoch % self.EVERY == 0:
                self._every_5000(epoch)
            self._early_grokking(epoch)
            self.bookkeeping["lr"].append(self.optimizer.param_groups[0]["lr"])
            self.bookkeeping["wd"].append(1.0 + min(epoch / 5000, 1.0) * (10.0 - 1.0))  # recorded, not applied
            self.bookkeeping["batch_size"].append(self.config["batch_size"])
            self.bar.set_postfix({"Train Loss": f"{train_loss:.4f}", "Test Loss": f"{test_loss:.4f}",
                                  "Train Acc": f"{train_acc:.4f}", "Test Acc": f"{test_acc:.4f}"})
        return time.perf_counter() - started, time.process_time() - cpu


def worker(start_epoch: int, threads: int) -> None:
    """Serve 'N' lines on stdin with one JSON line on stdout each; the loop's own prints go to stderr."""
    import torch
    from importlib.metadata import version

    if threads:  # 0: torch's default, as the earlier project ran
        torch.set_num_threads(threads)

    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    experiment = EarlierExperiment(start_epoch)
    replies.write(json.dumps({"torch": torch.__version__, "transformer_lens": version("transformer-lens"),
                              "threads": torch.get_num_threads()}) + "\n")
    for line in sys.stdin:
        seconds, cpu_seconds = experiment.train(int(line))
        replies.write(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="where TransformerLens 3.9 is installed")
    parser.add_argument("--start-epoch", type=int, default=5001)
    parser.add_argument("--epochs", type=int, default=60, help="epochs per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, as the "
                                                                   "earlier project ran)")
    parser.add_argument("--setup-only", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.start_epoch, args.threads)
    if args.setup_only:
        print((ensure_venv(args.venv).parent.parent / "earlier-loop-ready.txt").read_text().strip())
        return
    with EarlierLoop(args.venv, args.start_epoch, args.threads) as loop:
        loop.run(3)  # warm-up
        rates = [args.epochs / loop.run(args.epochs)[0] for _ in range(args.rounds)]
    print(f"earlier loop (TransformerLens {loop.info['transformer_lens']}, torch {loop.info['torch']}, "
          f"{loop.info['threads']} threads): " + ", ".join(f"{r:.2f}" for r in rates)
          + f" steps/s; median {statistics.median(rates):.2f}")


if __name__ == "__main__":
    main()
