"""Optuna adapter: a hyperparameter study whose trials are MLflow runs.

- ``spec``: the TOML study spec, its search space, sampler and pruner.
- ``storage``: the Optuna RDB storage (SQLite, PostgreSQL), heartbeats and stale trials.
- ``trial``: a trial as an MLflow run (``TrialRun``: RUNNING -> COMPLETE | PRUNED | FAIL), the pruning callback,
  the objective.
- ``lockstep``: trials K at a time through ask/tell and one ``LockstepTrainer``.
- ``workers``: ``run_study``, the parent run, worker processes.
- ``report``: counts, best trial and figures on the parent run.
- ``dashboard``: optuna-dashboard.
"""

from .spec import StudyError, StudySpec, load_spec
from .workers import run_study

__all__ = ["StudyError", "StudySpec", "load_spec", "run_study"]
