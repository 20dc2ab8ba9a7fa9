"""grokking-tracked: grokking experiments tracked in MLflow, searched with Optuna, analysed with TransformerLens.

Notebook use mirrors the CLI::

    from grokking_tracked import preset, run_experiment
    outcome = run_experiment(preset("default", train_frac=0.5))
    outcome.run_id, outcome.history_frame()

Attributes load lazily so that ``grokking-tracked --help`` does not import torch or mlflow.
"""

from .config import Config, ConfigError, preset

__all__ = ["Config", "ConfigError", "preset", "run_experiment", "resume_experiment", "Trainer"]


def __getattr__(name: str):
    if name in ("run_experiment", "resume_experiment"):
        from . import tracking

        return getattr(tracking, name)
    if name == "Trainer":
        from .train import Trainer

        return Trainer
    raise AttributeError(name)
