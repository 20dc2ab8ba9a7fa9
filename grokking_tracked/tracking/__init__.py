"""MLflow adapter: a training run as an MLflow run, and back.

- ``store``: where the store is (URI resolution, client, experiments).
- ``runs``: the one life cycle of every run we write (``TrackedRun``: open, send, end with the right status).
- ``tracker``: ``MlflowTracker``, the training callback that streams a training into its run.
- ``experiment``: ``run_experiment`` / ``resume_experiment``.
- ``fetch``: reading a run back (config, history, checkpoints).
- ``reanalysis``: ``analyze_run`` / ``compare_runs`` (server -> artifacts -> analysis -> server).
"""

from .experiment import ExperimentResult, resume_experiment, run_experiment
from .fetch import RunArtifacts, fetch_config, fetch_history, list_checkpoints
from .reanalysis import analyze_run, compare_runs
from .runs import TrackedRun, status_for
from .store import DEFAULT_EXPERIMENT, TrackingError, connect, ensure_experiment, get_run, resolve_tracking_uri
from .tracker import MlflowTracker

__all__ = ["ExperimentResult", "resume_experiment", "run_experiment", "RunArtifacts", "fetch_config", "fetch_history",
           "list_checkpoints", "analyze_run", "compare_runs", "TrackedRun", "status_for", "DEFAULT_EXPERIMENT",
           "TrackingError", "connect", "ensure_experiment", "get_run", "resolve_tracking_uri", "MlflowTracker"]
