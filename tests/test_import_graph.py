"""The package's import graph, read with ``ast`` (nothing imported): the layers go one way (GUIDE section 5).

- no circle among the package's modules at import time (module-level imports);
- analysis never imports training (``train``, ``lockstep``), at any level;
- the core (config, data, model, train, detect, measures, ...) never imports mlflow, optuna, tracking, study or the
  CLI, and not analysis either (analysis sits above it);
- tracking imports analysis only inside the functions that run an analysis (never at import time), reads checkpoints
  through the core (``grokking_tracked.checkpoints``), and its run life cycle, delivery and trust-boundary modules
  load neither torch nor a torch module of the core when imported (``runs`` builds a training run's dataset
  inputs inside that one function).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "grokking_tracked"
CORE = {"config", "data", "model", "train", "detect", "measures", "measure_registry", "checkpoints", "fourier",
        "metrics", "optim", "fastpath", "figures", "groups", "learning_phases", "lockstep"}
TORCH_CORE = {"model", "train", "measures", "checkpoints", "fourier", "metrics", "optim", "fastpath", "lockstep",
              "data"}
# tracking modules that must not need torch: the run life cycle, durable delivery, the trust boundary, names
TORCH_FREE_TRACKING = {"runs", "store", "artifacts", "errors", "redact", "names", "delivery", "delivery.outbox", "delivery.spool",
                       "delivery.lease", "delivery.outage"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in the file, relative ones resolved; a name imported
    from a package counts as its submodule when there is one (``from . import fourier``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only: never runs
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in MODULES else target, top))
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), True)
    return found


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def short(name: str) -> str:
    return name.removeprefix("grokking_tracked.")


def edges(where, what, top_only: bool = False) -> list[str]:
    """``importer -> imported`` for importers matching ``where`` and imported modules matching ``what``."""
    return sorted({f"{short(a)} -> {b}" for a, targets in GRAPH.items() if where(short(a))
                   for b, top in targets if (top or not top_only) and what(b)})


def test_the_graph_is_read():
    assert {"grokking_tracked.train", "grokking_tracked.analysis.report", "grokking_tracked.tracking.runs"} <= set(
        GRAPH)
    assert ("grokking_tracked.detect", True) in GRAPH["grokking_tracked.train"]
    assert ("grokking_tracked.fourier", True) in GRAPH["grokking_tracked.measures"]  # `from . import fourier`


def circles(top_only: bool) -> list[str]:
    graph = {a: sorted({b for b, top in targets if (top or not top_only) and b in MODULES and b != a})
             for a, targets in GRAPH.items()}
    # a package's __init__ importing its own submodules is how a package exposes them, not a circle
    graph = {a: [b for b in targets if not (MODULES[a].name == "__init__.py" and b.startswith(a + "."))]
             for a, targets in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                found.append(" -> ".join(short(n) for n in stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_circle_at_import_time():
    assert circles(top_only=True) == []


def test_no_import_circle_even_inside_functions():
    assert circles(top_only=False) == []


def test_analysis_never_imports_training():
    assert edges(lambda a: a.startswith("analysis"),
                 lambda b: b in ("grokking_tracked.train", "grokking_tracked.lockstep")) == []


@pytest.mark.parametrize("layer", ["tracking", "study", "cli", "analysis", "mlflow", "optuna"])
def test_the_core_imports_nothing_above_it(layer):
    def above(b: str) -> bool:
        return b == layer or b.startswith(layer + ".") or b == f"grokking_tracked.{layer}" or b.startswith(
            f"grokking_tracked.{layer}.")

    assert edges(lambda a: a in CORE, above) == []


def test_tracking_reaches_analysis_only_to_run_one_and_reads_checkpoints_through_the_core():
    def analysis(b: str) -> bool:
        return b.startswith("grokking_tracked.analysis")

    assert edges(lambda a: a.startswith("tracking"), analysis, top_only=True) == []
    assert edges(lambda a: a.startswith("tracking"), lambda b: b == "grokking_tracked.analysis.checkpoints") == []


def test_tracking_life_cycle_and_delivery_need_no_torch():
    def torch_side(b: str) -> bool:
        return b == "torch" or b.startswith("torch.") or b in {f"grokking_tracked.{m}" for m in TORCH_CORE}

    assert edges(lambda a: a.removeprefix("tracking.") in TORCH_FREE_TRACKING and a.startswith("tracking."),
                 torch_side, top_only=True) == []


def test_durable_delivery_is_a_subpackage_that_knows_nothing_above_it():
    """tracking/delivery/ (outbox, spool, lease, outage) imports, at import time, only itself and libraries; the one
    LoggedModel operation reaches tracking/models.py inside the function that delivers it."""
    delivery = {name for name in MODULES if name.startswith("grokking_tracked.tracking.delivery")}
    assert {"grokking_tracked.tracking.delivery.outbox", "grokking_tracked.tracking.delivery.spool",
            "grokking_tracked.tracking.delivery.lease", "grokking_tracked.tracking.delivery.outage"} <= delivery
    assert edges(lambda a: a.startswith("tracking.delivery"),
                 lambda b: b.startswith("grokking_tracked") and not b.startswith("grokking_tracked.tracking.delivery")
                 and b != "grokking_tracked.messages",  # the standard-library one-line-message helper
                 top_only=True) == []
