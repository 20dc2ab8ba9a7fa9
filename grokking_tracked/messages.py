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
