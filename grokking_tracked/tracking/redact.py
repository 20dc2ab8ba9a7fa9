"""Secrets never leave in what we write: one redaction for every tag, param, note, description and log line.

A run's tags are visible to everyone who can read its experiment, so what names a password is rewritten before
it is sent: the password of any URI's userinfo (``http://user:pw@host`` -> ``http://user:***@host``, also
``postgresql://...`` storages and a ``--set`` value that is a URI), a web URL's token as its lone user part
(``https://tok@host`` -> ``https://***@host``), a query parameter or ``KEY=VALUE`` whose
key names a secret (``?password=``, ``token=``, ``api_key=``), and the value after such an option
(``--password pw``).

A value that is one URI (an option's value, a storage URL, a command-line element) is redacted structurally: its
authority is split off with ``urllib.parse`` (falling back to the *last* ``@`` when an unencoded ``/``, ``?`` or
``#`` in the password moved it), so no character a password holds -- quotes, ``@``, ``:``, ``/`` -- can split
it. A command line is redacted element by element before it is shell-quoted (``redact_argv``): quoting first
splits a password with a ``'`` into pieces no pattern recognises. Free text (an error message) gets patterns,
and every password seen on this process's command line is also removed literally, in the forms a message may
quote it (raw, percent-encoded, repr-, JSON- or shell-escaped). Standard library only: the core's error messages
may use it too.
"""

from __future__ import annotations

import json
import re
import shlex
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
_SECRET_WORD = r"(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential|signature)"
_SECRET_KEY = re.compile(rf"(?i)[\w.\-]*{_SECRET_WORD}[\w.\-]*")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_WEB_SCHEMES = ("http", "https", "ws", "wss")
# free text: scheme://user:password@ -- the password runs to the last "@" before whitespace (it may hold "@",
# quotes, "/", ":"); a URI's lone web user part (``https://ghp_x@github.com``) is a token. A database URI's lone
# user (``postgresql://postgres@db``) is a name, not a secret, and stays.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#:@'\"]*):(?P<password>\S*)@")
_WEB_TOKEN = re.compile(r"(?i)(?P<head>\b(?:https?|wss?)://)(?P<token>[^\s/?#:@'\"]+)@")
_SECRET_ASSIGNMENT = re.compile(rf"(?i)(?P<key>\b[\w.\-]*{_SECRET_WORD}[\w.\-]*)=(?P<value>[^\s&#;'\"]+)")
_SECRET_OPTION = re.compile(rf"(?i)(?P<option>--[\w\-]*{_SECRET_WORD}[\w\-]*)(?P<gap>\s+)(?P<value>[^\s\-]\S*)")
_OPTION_ASSIGNMENT = re.compile(rf"(?i)(?P<option>--?[\w\-]*{_SECRET_WORD}[\w\-]*)=(?P<value>.*)", re.S)

_URI_VALUE = re.compile(r"(?P<prefix>(?:-{0,2}[\w.\-]+=)?)(?P<uri>[A-Za-z][A-Za-z0-9+.\-]*://.*)", re.S)
_known: set[str] = set()  # passwords seen on this process's command line (remember_argv)


def _userinfo_split(url: str) -> tuple[str, str, str] | None:
    """``(scheme://, userinfo, rest)`` of a one-URI string that has a userinfo, else None. The userinfo ends at
    the authority's last ``@``; when the password holds an unencoded ``/``, ``?`` or ``#`` (so urlsplit ends the
    authority inside it), at the string's last ``@`` -- more is hidden rather than less."""
    match = _SCHEME.match(url)
    if not match:
        return None
    head, rest = url[:match.end()], url[match.end():]
    if rest.startswith("/"):  # scheme:/// (sqlite:////tmp/a@b/x.db): no authority, so no userinfo
        return None
    try:
        netloc = urlsplit(url).netloc if url.isprintable() else ""
    except ValueError:  # e.g. an unbalanced "[" (an IPv6 host) in the password
        netloc = ""
    cut = netloc.rfind("@")
    if cut < 0 or "@" in rest[len(netloc):]:
        cut = rest.rfind("@")
    if cut < 0:
        return None
    return head, rest[:cut], rest[cut + 1:]


def redact_url(url: str) -> str:
    """One URI with its password (and a web URL's lone token, and secret query values) replaced by ``***``."""
    split = _userinfo_split(url)
    if split is not None:
        head, userinfo, rest = split
        user, colon, _ = userinfo.partition(":")
        if colon:
            url = f"{head}{user}:{MASK}@{rest}"
        elif head[:-3].lower() in _WEB_SCHEMES:
            url = f"{head}{MASK}@{rest}"
    try:
        parts = urlsplit(url) if url.isprintable() else None
    except ValueError:
        parts = None
    if parts and parts.query and any(_SECRET_KEY.fullmatch(key) for key, _ in parse_qsl(parts.query)):
        query = urlencode([(k, MASK if _SECRET_KEY.fullmatch(k) else v) for k, v in parse_qsl(parts.query)],
                          safe="*/:")
        url = urlunsplit(parts._replace(query=query))
    return url


def password_of(url: str) -> str | None:
    """The password in a URI's userinfo (percent-decoded), or a web URL's lone token; None without one."""
    split = _userinfo_split(url)
    if split is None:
        return None
    head, userinfo, _ = split
    user, colon, password = userinfo.partition(":")
    if colon:
        return unquote(password) or None
    return unquote(user) or None if head[:-3].lower() in _WEB_SCHEMES else None


def remember(secret: str | None) -> None:
    """Remove ``secret`` literally from everything ``redact`` sees from now on (in this process)."""
    if secret and len(secret) >= 4:  # "a" or "12" would blank out unrelated text
        _known.add(secret)


def remember_argv(argv: list[str]) -> None:
    """Remember the password of every URI on a command line, and every secret option's value."""
    for previous, element in zip(["", *argv], argv):
        if _SECRET_OPTION.fullmatch(f"{previous} x") and not element.startswith("-"):
            remember(element)
        if match := _OPTION_ASSIGNMENT.fullmatch(element):
            remember(match["value"])
        if match := _URI_VALUE.fullmatch(element):
            remember(password_of(match["uri"]))


def _variants(secret: str) -> set[str]:
    """The forms a message may quote ``secret`` in."""
    forms = {secret, quote(secret, safe=""), quote(secret, safe="'!$&()*+,;=:~"), json.dumps(secret)[1:-1],
             repr(secret)[1:-1], shlex.quote(secret)}
    return {form for form in forms if form}


def _redact_known(text: str) -> str:
    for secret in sorted(_known, key=len, reverse=True):
        for form in sorted(_variants(secret), key=len, reverse=True):
            text = text.replace(form, MASK)
    return text


def redact(text: str) -> str:
    """``text`` with every secret it names replaced by ``***`` (see the module docstring); the rest unchanged."""
    if not text:
        return text
    text = _redact_known(str(text))  # first: a pattern could leave only pieces of a known secret to find
    if _SCHEME.match(text) and not any(char.isspace() for char in text):
        return redact_url(text)  # one URI: structurally
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = _WEB_TOKEN.sub(lambda m: f"{m['head']}{MASK}@", text)
    text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m['key']}={MASK}", text)
    return _SECRET_OPTION.sub(lambda m: f"{m['option']}{m['gap']}{MASK}", text)


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with its secrets masked element by element (before it is quoted): a URI's password,
    ``--password VALUE``, ``--api-key=VALUE``, ``KEY=VALUE`` with a secret key."""
    redacted = []
    for previous, element in zip(["", *argv], argv):
        if _SECRET_OPTION.fullmatch(f"{previous} x") and not element.startswith("-"):
            element = MASK
        elif match := _OPTION_ASSIGNMENT.fullmatch(element):
            element = f"{match['option']}={MASK}"
        elif match := _URI_VALUE.fullmatch(element):  # a URI, `--option=URI` or `key=URI`: the rest is the URI
            element = match["prefix"] + redact_url(match["uri"])
        redacted.append(redact(element))
    return redacted


def redact_values(mapping: dict) -> dict:
    """A copy of ``mapping`` (tags, params) with every value redacted as text."""
    return {key: redact(str(value)) for key, value in mapping.items()}


def without_userinfo(url: str) -> str:
    """A link to show (a run's page, the UI): ``http://user:pw@host/x`` -> ``http://host/x``; a browser asks for
    the credentials itself, and a link with ``***`` in it would not work anyway."""
    split = _userinfo_split(url)
    return redact_url(url if split is None else f"{split[0]}{split[2]}")  # (and a secret query value masked)
