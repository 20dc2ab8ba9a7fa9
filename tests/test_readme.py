"""The README's notebook lines and docs/commands.md's Python example, executed as written (in a fresh directory:
the embedded store lands there). The README's five lines are the first lines of the longer example, so one
training covers both."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMANDS = ROOT / "docs" / "commands.md"


def python_block(path: Path, heading: str) -> str:
    section = path.read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def code_lines(source: str) -> list[str]:
    return [line for line in source.splitlines() if line.strip()]


def test_the_readme_notebook_lines_open_the_longer_example():
    notebook = code_lines(python_block(README, "## In a notebook"))
    assert len(notebook) == 5 and "outcome.plot()" in notebook[-1]  # the README's five-liner
    assert code_lines(python_block(COMMANDS, "## Python and notebooks"))[:5] == notebook


def test_the_python_example_runs_as_written_and_generalises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    namespace: dict = {}
    source = python_block(COMMANDS, "## Python and notebooks")
    exec(compile(source, str(COMMANDS), "exec"), namespace)  # noqa: S102 - our own docs
    outcome = namespace["outcome"]
    generalized = outcome.result.step_of("generalization")
    assert generalized is not None and generalized < 1000  # the README says "a few hundred steps"
    frame = outcome.history_frame()
    assert frame["test_acc"].iloc[-1] >= 0.99 and frame.index.max() == outcome.result.final_step
    assert f"#/experiments/{outcome.experiment_id}/runs" in outcome.runs_url()
    assert (tmp_path / "mlruns" / "mlflow.db").exists()  # the embedded store, where the README says
    assert type(namespace["model"]).__name__ == "GrokkingTransformer"  # a logged model, loaded back
    assert namespace["best"].tags["grokking_tracked.event"]
    assert type(outcome.plot()).__name__ == "Figure"  # the README's last line: a matplotlib Figure


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}


def test_the_docs_links_and_images_resolve():
    """Relative links and images in the README and docs/ point at files (and headings) that exist."""
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            linked = (page.parent / target) if target else page
            assert linked.exists(), f"{page.name}: {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in anchors(linked), f"{page.name}: {target}#{anchor}"
