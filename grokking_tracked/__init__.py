"""grokking-tracked: grokking experiments tracked in MLflow, searched with Optuna, analysed with TransformerLens.

Notebook use mirrors the CLI::

    from grokking_tracked import preset, run_experiment
    outcome = run_experiment(preset("default", train_frac=0.5))
    outcome.run_id, outcome.history_frame()
    model = load_model("models:/m-...")  # a checkpoint logged as an MLflow LoggedModel, back as a GrokkingTransformer

Attributes load lazily so that ``grokking-tracked --help`` does not import torch or mlflow.
"""

import logging

from .config import Config, ConfigError, preset

# A library prints nothing unasked: its lines go to logging (the CLI shows them on stderr, messages.configure_logging).
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["Config", "ConfigError", "preset", "run_experiment", "resume_experiment", "Trainer", "load_model"]


def __getattr__(name: str):
    if name in ("run_experiment", "resume_experiment"):
        from . import tracking

        return getattr(tracking, name)
    if name == "load_model":
        from .tracking.models import load_model

        return load_model
    if name == "Trainer":
        from .train import Trainer

        return Trainer
    raise AttributeError(name)
