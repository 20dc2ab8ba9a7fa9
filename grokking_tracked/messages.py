"""One-line messages from errors: every line we print or tag about a failure goes through here.

An exception's text can be empty, start with blank lines, or run to pages (MLflow, SQLAlchemy); a bare
``str(exc).splitlines()[0]`` raises ``IndexError`` on the first and shows nothing useful on the second, inside
an error path. Standard library only: any layer may import it.
"""

from __future__ import annotations


def first_line(text: object, limit: int | None = None) -> str:
    """The first non-blank line of ``text``, stripped, at most ``limit`` characters; "" when there is none."""
    line = next((line.strip() for line in str(text).splitlines() if line.strip()), "")
    return line[:limit] if limit is not None else line


def short_error(error: BaseException, limit: int | None = None) -> str:
    """The first non-blank line of an error's message, else its class name (never empty, never raises)."""
    return first_line(error, limit) or type(error).__name__


LOGGER = "grokking_tracked"  # every library line goes to this logger (or a child): nothing prints unless configured


def configure_logging(redact=None) -> None:
    """What the CLI and a study worker's entry do (process-wide state, so only there): the package's log lines on
    stderr as ``grokking-tracked: <line>``, each passed through ``redact`` (credentials) first. A library user
    configures logging as they like; unconfigured, the package prints nothing (its NullHandler)."""
    import logging
    import sys

    class OneLine(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            line = f"grokking-tracked: {record.getMessage()}"
            return redact(line) if redact else line

    class CurrentStderr(logging.StreamHandler):
        """Writes to whatever ``sys.stderr`` is now (a test's capture, a redirected stream), not the one at set-up."""

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value):
            pass

    logger = logging.getLogger(LOGGER)
    if any(getattr(handler, "_grokking_tracked", False) for handler in logger.handlers):
        return
    handler = CurrentStderr()
    handler.setFormatter(OneLine())
    handler._grokking_tracked = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # our lines once, whatever the root logger does
