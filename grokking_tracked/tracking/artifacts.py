"""The one way to a run's artifact repository: checked, every time one is made.

MLflow's client finds a run's artifact repository by asking the server (``get_run``) at the first transfer and
caches it process-wide; whatever that answer names is where files go, ``file:///anywhere`` included. So a server
that answered truthfully when the run was created could still choose where on this machine we write. Here every
repository any of our clients uses is made by ``CheckedClient.artifact_repository``: the location is checked
(``check_artifact_location``, below) before the repository exists, and the checked repository is kept per client
and run, so a later answer cannot swap it. MLflow's own transfer methods (``log_artifact``, ``log_image``,
``list_artifacts``, ``download_artifacts``: what the outbox, ``sync``, ``analyze`` and imports use) go through it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking._tracking_service.client import TrackingServiceClient

from .redact import redact
from .errors import TrackingError


# MLflow's own output, off in our transfers unless the user's environment turns it on: its tqdm bars on every
# artifact download, and the "🏃 View run ... / 🧪 View experiment ..." lines its client prints on stdout when a
# run on a server ends (both read from the environment at each call).
QUIET_MLFLOW = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


@contextlib.contextmanager
def quiet_mlflow(progress: bool = False):
    """MLflow's progress bars and "View run" lines off in the block (``progress``: leave them as they are); a
    variable the user set is left alone, the others are removed again afterwards."""
    added = {} if progress else {key: value for key, value in QUIET_MLFLOW.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class _CheckedTrackingService(TrackingServiceClient):
    """MLflow's tracking service client whose artifact repositories are made by ``artifact_repository``."""

    def __init__(self, tracking_uri: str):
        super().__init__(tracking_uri)
        self._repositories: dict[str, object] = {}
        self._repositories_lock = threading.Lock()

    def artifact_repository(self, run_id: str, resource: str = "run"):
        """The artifact repository of run ``run_id`` (or of the logged model of that id, ``resource="logged_model"``),
        made once from a checked location (TrackingError if refused)."""
        with self._repositories_lock:
            repository = self._repositories.get((resource, run_id))
        if repository is not None:
            return repository
        from mlflow.exceptions import MlflowException

        try:
            location = (self.get_logged_model(run_id).artifact_location if resource == "logged_model"
                        else self.get_run(run_id).info.artifact_uri)
        except MlflowException:
            what = "logged model" if resource == "logged_model" else "MLflow run"
            raise TrackingError(f"no {what} with id {run_id!r} at {redact(self.tracking_uri)}") from None
        check_artifact_location(self.tracking_uri, location, run_id)
        repository = get_artifact_repository(location, tracking_uri=self.tracking_uri)
        with self._repositories_lock:
            return self._repositories.setdefault((resource, run_id), repository)

    def _log_url(self, run_id: str) -> None:
        """MLflow prints "View run ... at: <tracking URI>" when a run ends: with credentials in the URI, that line
        would show them; our commands print the link without them instead."""
        if "@" not in urlsplit(self.tracking_uri).netloc:
            super()._log_url(run_id)

    # MLflow calls these for every artifact transfer of a run (log_artifact(s), log_image, log_text, ...)
    def _get_artifact_repo(self, resource_id: str, *, resource: str = "run"):
        if resource not in ("run", "logged_model"):
            raise TrackingError(f"refusing the artifacts of a {resource} ({resource_id}): only runs and logged models "
                                "are checked")
        return self.artifact_repository(resource_id, resource)

    def list_artifacts(self, run_id: str, path: str | None = None):
        return self.artifact_repository(run_id).list_artifacts(path)

    def download_artifacts(self, run_id: str, path: str, dst_path: str | None = None):
        return self.artifact_repository(run_id).download_artifacts(path, dst_path or tempfile.mkdtemp())


class CheckedClient(MlflowClient):
    """An ``MlflowClient`` whose every artifact transfer uses a checked repository (see the module docstring)."""

    def __init__(self, tracking_uri: str | None = None, registry_uri: str | None = None):
        super().__init__(tracking_uri, registry_uri)
        self._tracking_client = _CheckedTrackingService(self._tracking_client.tracking_uri)

    def artifact_repository(self, run_id: str, resource: str = "run"):
        return self._tracking_client.artifact_repository(run_id, resource)


def checked(client: MlflowClient) -> CheckedClient:
    """``client`` itself if it checks its artifact repositories, else a checking client for the same store."""
    return client if isinstance(client, CheckedClient) else CheckedClient(client.tracking_uri)


def artifact_repository(client: MlflowClient, run_id: str):
    """The checked artifact repository of ``run_id`` (TrackingError if its location is refused)."""
    return checked(client).artifact_repository(run_id)


TRUST_LOCAL_ARTIFACTS_ENV = "GROKKING_TRACKED_TRUST_LOCAL_ARTIFACTS"
# Where a remote server may put a run's artifacts: its own proxy (mlflow-artifacts:) or object stores and
# hosts elsewhere. Not here: file: and bare paths (this machine), runs:/ and models:/ (indirect: they resolve,
# through the server again, to any location, file: included) and dbfs: (a local FUSE path on some hosts).
REMOTE_ARTIFACT_SCHEMES = frozenset({"mlflow-artifacts", "http", "https", "s3", "r2", "b2", "gs", "wasbs", "abfss",
                                     "ftp", "sftp", "hdfs", "viewfs"})


def check_artifact_location(tracking_uri: str, artifact_uri: str, run_id: str) -> None:
    """Refuse an artifact location named by a remote tracking server that would let it choose where on this
    machine we read and write: ``file:``, a bare path, or an indirect scheme (``runs:/``, ``models:/``); anything
    but ``REMOTE_ARTIFACT_SCHEMES``. ``$GROKKING_TRACKED_TRUST_LOCAL_ARTIFACTS=1`` accepts it (a shared
    filesystem on purpose). A local store's own locations are its business: they are not checked."""
    scheme = urlsplit(artifact_uri).scheme.lower()
    remote_server = urlsplit(tracking_uri).scheme in ("http", "https")  # store.is_remote, without importing it
    if remote_server and scheme not in REMOTE_ARTIFACT_SCHEMES and os.environ.get(TRUST_LOCAL_ARTIFACTS_ENV) != "1":
        where = "a local path" if scheme in ("", "file") or len(scheme) == 1 else f"a {scheme}: location"
        raise TrackingError(f"the tracking server puts run {run_id}'s artifacts at {where} ({artifact_uri}); "
                            f"refusing to read or write there (a server with proxied artifacts, mlflow-artifacts:/, "
                            f"or {TRUST_LOCAL_ARTIFACTS_ENV}=1 for a shared filesystem)")
