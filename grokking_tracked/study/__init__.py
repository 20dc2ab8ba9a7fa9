"""Optuna adapter: a hyperparameter study whose trials are MLflow runs.

- ``spec``: the TOML study spec, its search space, sampler and pruner.
- ``objectives``: the registry of objectives (``steps``, ``seconds``, ``delay``, ``steps_vs_train_frac``).
- ``storage``: the Optuna RDB storage (SQLite, PostgreSQL), heartbeats and stale trials.
- ``trial``: a trial as an MLflow run (``TrialRun``: RUNNING -> COMPLETE | PRUNED | FAIL), the pruning callback,
  the objective.
- ``lockstep``: trials K at a time through ask/tell and one ``LockstepTrainer``.
- ``workers``: ``run_study``, the parent run, worker processes.
- ``report``: counts, best trial and figures on the parent run.
- ``dashboard``: optuna-dashboard.
"""

from .spec import StudyError, StudySpec, load_spec

__all__ = ["StudyError", "StudySpec", "load_spec", "run_study"]


def __getattr__(name: str):
    # run_study brings torch, TransformerLens and mlflow: loaded on first use (PEP 562), so that the CLI can check
    # a spec, and start creating a new store, before they load
    if name == "run_study":
        from .workers import run_study

        return run_study
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
