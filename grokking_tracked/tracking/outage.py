"""What an outage looks like to an MLflow client, as opposed to a refusal of one operation.

MLflow raises different things for the same outage depending on the call: ``MlflowException`` with
INTERNAL_ERROR (HTTP 500) wrapping a connection error, a timeout or exhausted urllib3 retries ("too many
503 error responses"); ``requests.HTTPError`` carrying the response for an artifact upload; a
``RestException`` with the server's error code (TEMPORARILY_UNAVAILABLE = 503, INVALID_PARAMETER_VALUE =
400); SQLAlchemy's ``OperationalError`` from a local store. Checked against a real server behind our
fault proxy in tests/test_outbox.py.
"""

from __future__ import annotations

import re

import requests
import urllib3
from mlflow.exceptions import MlflowException


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` looks like an outage (retry) rather than a refusal of this operation (give up)."""
    response = getattr(exc, "response", None)  # requests.HTTPError from an artifact upload
    status = getattr(response, "status_code", None)
    if status is None and isinstance(exc, MlflowException):
        # MLflow wraps every connection failure, timeout and exhausted retry as INTERNAL_ERROR (500).
        status = exc.get_http_status_code()
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(exc, (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return True
    if type(exc).__name__ == "IntegrityError" and "datasets" in str(exc):
        # Two writers of one local store logging the same dataset at once (study workers): the loser's insert
        # of the shared dataset row fails; retried, it finds the row and only links its run to it.
        return True
    return type(exc).__name__ == "OperationalError"  # SQLAlchemy, e.g. "database is locked" (local store)


_REASONS = [(re.compile(p, re.I), label) for p, label in (
    (r"too many (\d{3}) error responses", r"HTTP \1"), (r"Connection refused", "connection refused"),
    (r"Connection reset|ConnectionResetError|Broken pipe", "connection reset"),
    (r"RemoteDisconnected|Connection aborted", "connection dropped"), (r"timed out|timeout", "timed out"),
    (r"Name or service not known|nodename nor servname|getaddrinfo failed", "unknown host"),
    (r"Caused by (\w+)", r"\1"))]


def short_reason(exc: BaseException) -> str:
    """One short phrase for a line on stderr (MLflow's messages run to several hundred characters)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return f"HTTP {status}"
    text = str(exc)
    for pattern, label in _REASONS:
        if match := pattern.search(text):
            return match.expand(label)
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:120]}"
