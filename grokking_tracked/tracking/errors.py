"""The error of every tracking problem a user can cause or meet (unreachable server, unknown run, missing artifact).

Its own module so that the trust boundary (``artifacts``) and the store (``store``) both raise it without importing
each other: ``store.connect`` makes the checked client of ``artifacts``, and ``artifacts`` needs nothing of ``store``.
"""

from __future__ import annotations

from ..config import UserError


class TrackingError(UserError, RuntimeError):
    """A user-facing tracking problem (unreachable server, unknown run, missing artifact); one line."""
