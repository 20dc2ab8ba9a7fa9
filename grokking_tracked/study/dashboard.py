"""optuna-dashboard over a study's storage, on loopback."""

from __future__ import annotations

import warnings

import optuna

from .spec import StudyError
from .storage import redact


def serve_dashboard(storage_url: str, port: int, echo=print) -> None:
    """Serve optuna-dashboard over the study storage, bound to 127.0.0.1 (blocks until interrupted)."""
    import optuna_dashboard

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rdb = optuna.storages.RDBStorage(storage_url)
    except Exception as exc:  # noqa: BLE001 - driver errors of every kind become one line
        raise StudyError(f"cannot open the Optuna storage {redact(storage_url)}: {str(exc).splitlines()[0]}") from None
    echo(f"optuna-dashboard on http://127.0.0.1:{port} over {redact(storage_url)}")
    optuna_dashboard.run_server(rdb, host="127.0.0.1", port=port)
