"""Time to the first step (issue 26, item 6): each command imports what it needs when it needs it.

Each check runs a fresh interpreter (a subprocess) and reads its ``sys.modules``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

HEAVY_FOR_TRAINING = ("mlflow", "optuna", "matplotlib", "grokking_tracked.figures")


def loaded_after(code: str, cwd=None) -> dict:
    """Run ``code`` in a fresh interpreter; it prints a JSON object as its last line."""
    env = {**os.environ, "GROKKING_TORCH_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_training_core_imports_neither_tracking_nor_plotting():
    seen = loaded_after(f"""
        import json, sys
        import grokking_tracked.train, grokking_tracked.fastpath
        print(json.dumps([m for m in {HEAVY_FOR_TRAINING!r} if m in sys.modules]))
    """)
    assert seen == []


def test_help_imports_no_heavy_library():
    seen = loaded_after("""
        import json, sys
        from grokking_tracked.cli import main
        try:
            main(["run", "--help"])
        except SystemExit:
            pass
        print(json.dumps([m for m in ("torch", "mlflow", "transformer_lens", "optuna", "matplotlib")
                          if m in sys.modules]))
    """)
    assert seen == []


def test_run_reaches_its_first_step_without_plotting_or_optuna(tmp_path):
    """``grokking-tracked run --p 23 --max-steps 1``, the real command in a fresh interpreter: at its first training
    step neither matplotlib (the figures are drawn at the end) nor optuna is loaded; both run figures exist after."""
    seen = loaded_after("""
        import json, sys
        from grokking_tracked import train
        from grokking_tracked.cli import main

        first = {}
        step = train.Trainer.train_step

        def probed(self):
            first.setdefault("loaded", [m for m in ("matplotlib", "optuna", "grokking_tracked.figures")
                                        if m in sys.modules])
            return step(self)

        train.Trainer.train_step = probed
        try:
            main(["run", "--p", "23", "--max-steps", "1", "--no-progress"])
        except SystemExit as exit:
            assert not exit.code, exit.code
        first["after"] = "matplotlib" in sys.modules
        print(json.dumps(first))
    """, cwd=tmp_path)
    assert seen == {"loaded": [], "after": True}
