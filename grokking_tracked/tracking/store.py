"""Where the MLflow store is, and a client for it.

Resolution follows ``mlflow.get_tracking_uri()``: an explicit URI, else ``$MLFLOW_TRACKING_URI``, else our
embedded store (a SQLite database and its artifacts under ``./mlruns/``). Resolving touches nothing on disk;
opening a local store creates its directory. Nothing here changes the process (MLflow's client settings are the
entry points' business: see ``cli.MLFLOW_CLIENT_ENVIRONMENT``). The module loads mlflow only when a client is made,
so that ``start_creating`` can run before the heavy imports of a command.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import TrackingError  # noqa: F401 - re-exported: every tracking module's error
from .redact import redact, without_userinfo

if TYPE_CHECKING:
    from mlflow import MlflowClient

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EMBEDDED_STORE_DIR = "mlruns"
EMBEDDED_DATABASE = "mlflow.db"
DEFAULT_EXPERIMENT = "grokking"
# MLflow 3 opens an experiment without this tag in its GenAI layout; ours are model-training experiments.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the description the MLflow UI shows and edits
EXPERIMENT_DESCRIPTION = ("Grokking experiments (grokking-tracked): each run trains a small transformer on modular "
                          "arithmetic; metrics are step-indexed, detection events are in events.json and the "
                          "steps_to/<event> metrics, checkpoints and figures are artifacts.")
HEALTH_TIMEOUT_SECONDS = 5



def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the embedded store ``sqlite:///<cwd>/mlruns/mlflow.db``."""
    uri = uri or os.environ.get(TRACKING_URI_ENV)
    if uri:
        return uri
    return f"sqlite:///{Path(EMBEDDED_STORE_DIR).resolve() / EMBEDDED_DATABASE}"


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_database(url: str) -> str | None:
    """The database file a SQLite URL names (``sqlite:///path/x.db?mode=ro`` -> ``path/x.db``), parsed by SQLAlchemy
    as MLflow and Optuna parse it; None for another scheme, an in-memory database or a URL SQLAlchemy refuses. Every
    sqlite path of the package (stores, spools, Optuna storages) goes through here."""
    if not url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url  # loaded by mlflow and optuna anyway; not before it is needed
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(url).database
    except ArgumentError:
        return None
    return database if database and database != ":memory:" else None


def local_database(uri: str) -> Path | None:
    """The database file of a local SQLite store (``sqlite:///path/x.db`` -> ``path/x.db``); None for anything else."""
    database = sqlite_database(uri)
    return Path(database).resolve() if database else None


def local_store_dir(uri: str) -> Path | None:
    """The directory of a local SQLite store (``sqlite:///path/x.db`` -> ``path``); None for anything else."""
    database = local_database(uri)
    return database.parent if database else None


def prepare(uri: str | None = None) -> subprocess.Popen | None:
    """What a command does before its heavy imports (torch, TransformerLens: seconds): a remote server must answer
    now (``TrackingError`` in seconds, not after the imports), and a new local store starts being created in a
    separate process (``start_creating``, returned)."""
    uri = resolve_tracking_uri(uri)
    if is_remote(uri):
        probe(uri)
        return None
    return start_creating(uri)


def start_creating(uri: str | None = None) -> subprocess.Popen | None:
    """Create a new local store in a separate process, returning at once; nothing for a store that exists or a
    remote one. MLflow builds a new SQLite store (its ~100 schema migrations: 2-3 s here) when a client first
    opens it; started before a command imports torch and TransformerLens, that work overlaps theirs on another
    core, and the command's own ``connect`` finds the store made (or waits for it on the same lock). The process
    has its own session: a Ctrl-C of the command does not stop a migration half-way. Returns that process."""
    uri = resolve_tracking_uri(uri)
    database = local_database(uri)
    if database is None or database.exists():
        return None
    return subprocess.Popen([sys.executable, "-m", __name__, uri], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def probe(uri: str) -> None:
    """A remote tracking server answers its health check within seconds, or ``TrackingError`` (one line)."""
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_SECONDS).raise_for_status()
    except requests.RequestException as exc:
        raise TrackingError(f"cannot reach the MLflow tracking server at {redact(uri)} ({type(exc).__name__})") from None


def connect(uri: str | None = None) -> MlflowClient:
    """A client for the store. A local store's directory is created; a remote server is probed first, so an
    unreachable one fails in seconds with one line instead of after minutes of retries. The client checks every
    artifact repository it uses (``artifacts.CheckedClient``)."""
    from .artifacts import CheckedClient as MlflowClient

    uri = resolve_tracking_uri(uri)
    store = local_store_dir(uri)
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
        # MLflow migrates a new SQLite store when a client first opens it; processes doing that at once break
        # each other's migrations (on a barrier 11 of 12 processes failed: alembic version mismatches, tables
        # that already exist, a locked database). One opener at a time: the others find the tables made.
        with open(store / ".open.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return MlflowClient(tracking_uri=uri)
    if is_remote(uri):
        probe(uri)
    return MlflowClient(tracking_uri=uri)


def _artifact_location(client: MlflowClient, name: str) -> str | None:
    """Artifacts of a local store's experiment live beside its database (MLflow's default, ``./mlruns``, is
    relative to the *current* directory, which scatters artifacts wherever a command happens to run)."""
    store = local_store_dir(client.tracking_uri)
    if store is None:
        return None
    return (store / "artifacts" / re.sub(r"[^A-Za-z0-9._-]+", "_", name)).as_uri()


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created (model-training layout, a description) if it does not exist."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(client, name),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, NOTE_TAG: EXPERIMENT_DESCRIPTION})
    except MlflowException:  # another worker created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def get_run(client: MlflowClient, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"no MLflow run with id {run_id!r} at {redact(client.tracking_uri)}") from None


LOCAL_UI = "http://127.0.0.1:5000"  # where `grokking-tracked ui` serves a local store


def ui_base(tracking_uri: str, local_ui: str = LOCAL_UI) -> str:
    """Where the MLflow UI of this store is: the tracking server itself (without credentials), or ``local_ui``
    (``grokking-tracked ui``) for a local store."""
    return without_userinfo(tracking_uri) if is_remote(tracking_uri) else local_ui


def ui_link(base: str, experiment_id: str, run_id: str | None = None, page: str = "runs") -> str:
    """The one place our MLflow UI links are made: an experiment's runs view (``page="runs"``), its Models tab
    (``page="models"``) or one run's page (``run_id``), always in the model-training view. MLflow 3.17 decides
    GenAI vs model training from the link's ``workflowType`` (else from the browser's stored choice, GenAI by
    default): ``#/experiments/N`` alone lands on the GenAI overview and lists LoggedModels as "Agent versions"."""
    path = f"runs/{run_id}" if run_id else page
    return f"{without_userinfo(base).rstrip('/')}/#/experiments/{experiment_id}/{path}?workflowType=machine_learning"


def runs_view_url(client: MlflowClient, experiment_id: str, base_url: str | None = None) -> str | None:
    """The link that opens an experiment's runs in the model-training view. ``base_url``: where the UI is
    served (default: the tracking server itself; None for a local store without one)."""
    base = base_url or (client.tracking_uri if is_remote(client.tracking_uri) else None)
    return None if base is None else ui_link(base, experiment_id)


def quote_filter_value(value: str) -> str:
    """A string literal for an MLflow search filter. MLflow's parser has no escape character: a value is
    quoted with whichever quote it does not contain, and one containing both cannot be searched for."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"{value!r} contains both quote characters: MLflow cannot search for it; rename it")


if __name__ == "__main__":  # the process start_creating() starts: open (so create) the store, then exit
    connect(sys.argv[1])
