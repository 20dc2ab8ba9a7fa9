"""Secrets never leave in what we write: one redaction for every tag, param, note, description and log line.

A run's tags are visible to everyone who can read its experiment, so what names a password is rewritten before
it is sent: the password of any URI's userinfo (``http://user:pw@host`` -> ``http://user:***@host``, also
``postgresql://...`` storages and a ``--set`` value that is a URI), a web URL's token as its lone user part
(``https://tok@host`` -> ``https://***@host``), a query parameter or ``KEY=VALUE`` whose
key names a secret (``?password=``, ``token=``, ``api_key=``), and the value after such an option
(``--password pw``). Free text is scanned (a command line holds several URIs), so this is a pattern rather
than SQLAlchemy's ``make_url(...).render_as_string(hide_password=True)``, which parses one URL and raises on
anything else. Standard library only: the core's error messages may use it too.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# scheme://user:password@ -- greedy up to the authority's last "@" (an unencoded "@" in a password)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#:@'\"]*):(?P<password>[^\s/?#'\"]*)@")
# http(s)://token@host: a web URL's lone user part is how tokens are passed (``https://ghp_x@github.com``); a
# database URI's lone user (``postgresql://postgres@db``) is a name, not a secret, and stays
_WEB_TOKEN = re.compile(r"(?i)(?P<head>\b(?:https?|wss?)://)(?P<token>[^\s/?#:@'\"]+)@")
_SECRET_WORD = r"(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential|signature)"
_SECRET_ASSIGNMENT = re.compile(rf"(?i)(?P<key>\b[\w.\-]*{_SECRET_WORD}[\w.\-]*)=(?P<value>[^\s&#;'\"]+)")
_SECRET_OPTION = re.compile(rf"(?i)(?P<option>--[\w\-]*{_SECRET_WORD}[\w\-]*)(?P<gap>\s+)(?P<value>[^\s\-]\S*)")


def redact(text: str) -> str:
    """``text`` with every secret it names replaced by ``***`` (see the module docstring); the rest unchanged."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = _WEB_TOKEN.sub(lambda m: f"{m['head']}{MASK}@", text)
    text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m['key']}={MASK}", text)
    return _SECRET_OPTION.sub(lambda m: f"{m['option']}{m['gap']}{MASK}", text)


def redact_values(mapping: dict) -> dict:
    """A copy of ``mapping`` (tags, params) with every value redacted as text."""
    return {key: redact(str(value)) for key, value in mapping.items()}


def without_userinfo(url: str) -> str:
    """A link to show (a run's page, the UI): ``http://user:pw@host/x`` -> ``http://host/x``; a browser asks for
    the credentials itself, and a link with ``***`` in it would not work anyway."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
