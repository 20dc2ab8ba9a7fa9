"""The README's Python example, executed as written (in a fresh directory: its embedded store lands there)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    section = README.read_text().split("### Python and notebooks", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs_as_written_and_generalises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    namespace: dict = {}
    exec(compile(python_example(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    outcome = namespace["outcome"]
    generalized = outcome.result.step_of("generalization")
    assert generalized is not None and generalized < 1000  # the README says "a few hundred steps"
    frame = outcome.history_frame()
    assert frame["test_acc"].iloc[-1] >= 0.99 and frame.index.max() == outcome.result.final_step
    assert f"#/experiments/{outcome.experiment_id}/runs" in outcome.runs_url()
    assert (tmp_path / "mlruns" / "mlflow.db").exists()
    assert type(namespace["model"]).__name__ == "GrokkingTransformer"  # a logged model, loaded back
    assert namespace["best"].tags["grokking_tracked.event"]  # the embedded store, where the README says
