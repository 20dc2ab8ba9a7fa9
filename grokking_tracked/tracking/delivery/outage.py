"""What an outage looks like to an MLflow client, as opposed to a refusal of one operation.

MLflow raises different things for the same outage depending on the call: ``MlflowException`` with
INTERNAL_ERROR (HTTP 500) wrapping a connection error, a timeout or exhausted urllib3 retries ("too many
503 error responses"); ``requests.HTTPError`` carrying the response for an artifact upload; a
``RestException`` with the server's error code (TEMPORARILY_UNAVAILABLE = 503, INVALID_PARAMETER_VALUE =
400); SQLAlchemy's ``OperationalError`` from a local store. A reverse proxy in front of the server answers
HTML (404 while its backend restarts, 401/403 from a login page): not MLflow's word on the operation, so it
is an outage too. Checked against a real server behind our fault proxy in tests/test_outbox.py.
"""

from __future__ import annotations

import re

import requests
import urllib3
from mlflow.exceptions import MlflowException, RestException
from ...messages import first_line


OUTAGE, SUSPECT, REFUSED = "outage", "suspect", "refused"


def from_mlflow(exc: BaseException) -> bool:
    """Whether an HTTP error is MLflow's own answer: MLflow's server answers errors as JSON with an
    ``error_code``; a reverse proxy (its backend restarting, a login page) answers HTML or plain text."""
    if isinstance(exc, RestException):  # raised only for a JSON body (mlflow.utils.rest_utils)
        return True
    response = getattr(exc, "response", None)
    try:
        return "error_code" in response.json()
    except (AttributeError, ValueError, TypeError):
        return False


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status the server answered, None when no answer came (connection failed, timed out)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)  # requests.HTTPError (artifacts)
    if status is not None:
        return status
    if isinstance(exc, RestException):
        return exc.get_http_status_code()
    if isinstance(exc, MlflowException) and (match := _ANSWERED.search(str(exc))):
        return int(match.group(1) or match.group(2))  # an answer MLflow could not parse, or retried to the end
    return None


# verify_rest_response's message for a non-JSON answer; urllib3's when MLflow's retries of a 429/5xx ran out (its
# status_forcelist includes 500: the body is then lost). A failed connection reads "failed with exception".
_ANSWERED = re.compile(r"failed with error code (\d{3}) != \d{3}|too many (\d{3}) error responses")


def classify(exc: BaseException) -> str:
    """OUTAGE (retry the queue), SUSPECT (MLflow itself answered 500: an outage of its store, or a request
    it can never take; the outbox tells them apart by asking the server something else) or REFUSED (this
    operation is refused for good).

    - no answer (connection refused/reset, timeout), HTTP 502-599, 408, 429: OUTAGE;
    - any other HTTP error that is not MLflow's own JSON (a proxy's 404/401/403 HTML page): OUTAGE;
    - HTTP 500 (INTERNAL_ERROR): SUSPECT; MLflow's own 4xx (INVALID_PARAMETER_VALUE, ...): REFUSED;
    - a local SQLAlchemy OperationalError ("database is locked"): OUTAGE; anything else: REFUSED."""
    status = _http_status(exc)
    if status is not None:
        if status == 500:  # (MLflow's retries keep no body: a 500 counts as MLflow's own)
            return SUSPECT
        return OUTAGE if status > 500 or status in (408, 429) or not from_mlflow(exc) else REFUSED
    if isinstance(exc, MlflowException):
        # MLflow wraps every connection failure, timeout and exhausted retry as INTERNAL_ERROR.
        return OUTAGE if exc.get_http_status_code() >= 500 else REFUSED
    if isinstance(exc, (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return OUTAGE
    if type(exc).__name__ == "IntegrityError" and "datasets" in str(exc):
        # Two writers of one local store logging the same dataset at once (study workers): the loser's insert
        # of the shared dataset row fails; retried, it finds the row and only links its run to it.
        return OUTAGE
    return OUTAGE if type(exc).__name__ == "OperationalError" else REFUSED  # SQLAlchemy, e.g. database is locked


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may pass by itself (retry) rather than a refusal of this operation for good."""
    return classify(exc) != REFUSED


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
    return f"{type(exc).__name__}: {first_line(text, 120)}"
