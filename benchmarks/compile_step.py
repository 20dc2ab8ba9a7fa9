"""Does ``torch.compile`` pay on this CPU? The lean training step of a preset (``fastpath.lean_last_logits`` and the
loss, backward, the Grokfast filter if the preset has one, the fused optimizer step) eager against compiled
(Inductor, ``dynamic=False``), each in its own process: compiled once with an empty Inductor cache (the first run a
user pays) and once more with that cache warm (every later run), the compile counted.

    python benchmarks/compile_step.py [--preset grokfast2024] [--steps 300] [--threads 1]

Prints, per variant, the seconds to the end of the first step (tracing and compiling included), the steps/s after
it, and the steps/s of the whole ``--steps`` (first step included); the load average before and after.
Issue 26 asked for compiled kernels "where they pay": this is the measurement that decides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(preset_name: str, steps: int, threads: int, compiled: bool) -> dict:
    import torch

    from grokking_tracked import fastpath
    from grokking_tracked.config import preset
    from grokking_tracked.train import Trainer

    overrides = {"grokfast_lambda": 2.0, "weight_decay": 0.005} if preset_name == "grokfast2024" else {}
    trainer = Trainer(preset(preset_name, **overrides), progress=False, threads=threads)
    torch.set_num_threads(threads)

    def loss_of(tokens, labels):
        return trainer.loss(fastpath.lean_last_logits(trainer.model, tokens), labels)

    step_loss = torch.compile(loss_of, dynamic=False) if compiled else loss_of
    started = time.perf_counter()
    first = None
    done = 0
    while done < steps:
        if trainer.sampler is not None:
            index = trainer.sampler.next_indices()
            if len(index) != trainer.config.batch_size:  # an epoch's short last batch would recompile: skipped
                continue
            tokens, labels = trainer._train_tokens[index], trainer._train_labels[index]
        else:
            tokens, labels = trainer._train_tokens, trainer._train_labels
        trainer.optimizer.zero_grad(set_to_none=True)
        loss = step_loss(tokens, labels)
        loss.backward()
        if trainer.grokfast is not None:
            trainer.grokfast.apply([p.grad for p in trainer.model.parameters()])
        trainer.optimizer.step()
        done += 1
        if first is None:
            first = time.perf_counter() - started
    total = time.perf_counter() - started
    return {"first_step_s": first, "after_first_steps_per_s": (steps - 1) / (total - first),
            "whole_steps_per_s": steps / total, "last_loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="grokfast2024")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=("eager", "compiled"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.preset, args.steps, args.threads, args.worker == "compiled")))
        return
    from _machine import describe

    print(f"{describe()}; preset {args.preset}, {args.steps} steps, {args.threads} thread(s)")
    print("load average before: %.2f %.2f %.2f" % os.getloadavg(), flush=True)
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": cache}
        for label, variant in (("eager", "eager"), ("compiled, empty cache", "compiled"),
                               ("compiled, warm cache", "compiled"), ("eager again", "eager")):
            out = subprocess.run([sys.executable, __file__, "--worker", variant, "--preset", args.preset,
                                  "--steps", str(args.steps), "--threads", str(args.threads)],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                print(f"{label}: failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{label:>22}: first step {r['first_step_s']:.2f} s, then {r['after_first_steps_per_s']:.1f} "
                  f"steps/s; {args.steps} steps {r['whole_steps_per_s']:.1f} steps/s; last loss {r['last_loss']:.6g}; "
                  "load %.2f" % os.getloadavg()[0], flush=True)
    print("load average after: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
