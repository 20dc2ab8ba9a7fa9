"""MLflow adapter: a training run as an MLflow run, and back.

- ``store``: where the store is (URI resolution, client, experiments).
- ``runs``: the one life cycle of every run we write (``TrackedRun``: open, send, end with the right status).
- ``tracker``: ``MlflowTracker``, the training callback that streams a training into its run.
- ``drawer``: ``FigureDrawer``, the separate process a study worker draws figures (and writes notes) in.
- ``experiment``: ``run_experiment`` / ``resume_experiment``.
- ``models``: checkpoints as MLflow LoggedModels (safetensors) and ``load_model``.
- ``fetch``: reading a run back (config, history, checkpoints).
- ``reanalysis``: ``analyze_run`` / ``compare_runs`` (server -> artifacts -> analysis -> server).
"""

import importlib

# Names are loaded on first use (PEP 562): ``tracking.store`` alone is light (the standard library), so a
# command can start creating a new store before torch and TransformerLens load (see store.start_creating).
_EXPORTS = {
    "ExperimentResult": "experiment", "resume_experiment": "experiment", "run_experiment": "experiment",
    "RunArtifacts": "fetch", "fetch_config": "fetch", "fetch_history": "fetch", "list_checkpoints": "fetch",
    "analyze_run": "reanalysis", "compare_runs": "reanalysis",
    "TrackedRun": "runs", "status_for": "runs",
    "DEFAULT_EXPERIMENT": "store", "TrackingError": "store", "connect": "store", "ensure_experiment": "store",
    "get_run": "store", "resolve_tracking_uri": "store",
    "MlflowTracker": "tracker",
    "load_model": "models",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
