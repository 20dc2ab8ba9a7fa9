"""Where a tracking store's outbox spool lives, and the writer directories found in one.

A local SQLite store keeps its spool beside the database (``<dir of mlflow.db>/.spool``), so the store
and what is still on its way to it stay together. A remote server's spool is a local directory:
``$GROKKING_TRACKED_SPOOL/<server>`` if that variable is set, else the per-user cache
(``$XDG_CACHE_HOME`` or ``~/.cache``)``/grokking-tracked/spool/<server>``; ``<server>`` is ``host_port``
so spools of different servers never mix (a run id means nothing to another server).

Spool layout (one writer = one process's outbox on one run; several writers of one run, e.g. study
workers writing the study's parent run, never interleave their sequences)::

    <spool root>/<run_id>/<host>-<pid>-<n>/
        writer.json              run id, server (public_uri: no credentials), host, pid, creation time
        lock                     flock()ed by the live writer: the kernel drops it on any death
        0000000042.json          one operation; written as .tmp then renamed, so never seen half-written
        0000000042.files/NAME    its payload (artifact name = file name), moved in before the .json exists
        staging/<n>/NAME         where callers write big files (checkpoints) to be moved in, never copied
        failed/                  entries the server refused for good, or unreadable ones (see outbox.py)
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .lease import this_host

SPOOL_ENV = "GROKKING_TRACKED_SPOOL"
ENTRY_NAME = re.compile(r"^(\d{10})\.json$")  # one queued operation; its payload is <seq>.files/


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip("_") or "_"


def public_uri(tracking_uri: str) -> str:
    """What a spool may record of a tracking URI: a local store's path, or a server's ``scheme://host:port`` --
    never its user, password, path or query. Where the userinfo is ambiguous (a password with an unencoded ``/``,
    ``?`` or ``#`` ends the authority early: an ``@`` is left after it), only the scheme."""
    parts = urlsplit(tracking_uri)
    if parts.scheme in ("", "file", "sqlite") and "@" not in tracking_uri:
        return tracking_uri
    if "@" in tracking_uri[len(parts.scheme) + 3 + len(parts.netloc):]:
        return f"{parts.scheme}://"
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _store_identity(tracking_uri: str) -> str:
    """A database URI without its password and query (the same database under another password is the same
    store), to name its spool by; only ``public_uri`` where the userinfo is ambiguous (such stores of one scheme
    then share a spool: harmless, a run id names one run on one server)."""
    parts = urlsplit(tracking_uri)
    if "@" in tracking_uri[len(parts.scheme) + 3 + len(parts.netloc):]:
        return public_uri(tracking_uri)
    userinfo, at, host = parts.netloc.rpartition("@")
    return f"{parts.scheme}://{userinfo.partition(':')[0]}{at}{host}{parts.path}"


def spool_root_for(tracking_uri: str) -> Path:
    """The spool root of a tracking store (see the module docstring); touches nothing on disk."""
    parts = urlsplit(tracking_uri)
    if parts.scheme == "sqlite":
        from ..store import sqlite_database  # the one sqlite URL parser (SQLAlchemy's); standard library otherwise

        database = sqlite_database(tracking_uri)
        if database:
            return Path(database).expanduser().absolute().parent / ".spool"
    if parts.scheme in ("", "file") and tracking_uri:  # the legacy file store: a directory
        return Path(parts.path if parts.scheme else tracking_uri).expanduser().absolute() / ".spool"
    base = os.environ.get(SPOOL_ENV)
    if base:
        base_path = Path(base).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        base_path = Path(cache) / "grokking-tracked" / "spool"
    if parts.scheme in ("http", "https"):
        # host and port only: never credentials from user:password@host
        port = parts.port or (443 if parts.scheme == "https" else 80)
        name = _safe(f"{parts.hostname}_{port}" + (f"_{parts.path}" if parts.path.strip("/") else ""))
    else:  # postgresql://, mysql://, databricks: a stable name without the URI's secrets
        digest = hashlib.sha1(_store_identity(tracking_uri).encode()).hexdigest()[:12]  # never of a password
        name = f"{_safe(parts.scheme)}_{_safe(parts.hostname or '')}_{digest}"
    return base_path / name


def run_spool_dir(spool_root: str | Path, run_id: str) -> Path:
    return Path(spool_root) / _safe(run_id)


_writer_numbers = itertools.count()


class Busy(Exception):
    """A writer directory is locked by a live process."""


class SpoolUnusable(OSError):
    """The spool cannot be created or written (a dangling link in the way, read-only, a full disk)."""


_WRITER_DIR_TRIES = 1000


def _blocked(directory: Path) -> bool:
    """Whether some ancestor of ``directory`` is a file or a dangling link (mkdir(parents=True) fails)."""
    return any(parent.is_symlink() and not parent.exists() or parent.exists() and not parent.is_dir()
               for parent in directory.parents)


def lock_writer_dir(path: Path) -> int:
    """flock() a writer directory for this process's lifetime (the kernel drops it on any death, SIGKILL
    included); the open descriptor, to be closed when done. Busy if a live process holds it."""
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy(str(path)) from None
    return fd


def new_writer_dir(run_dir: Path, run_id: str, tracking_uri: str) -> tuple[Path, int]:
    """A fresh, locked writer directory under ``run_dir`` and its lock descriptor. writer.json is written
    last, after the lock is held: deliver_spool only looks at directories that have it."""
    for _ in range(_WRITER_DIR_TRIES):  # a pid (and our counter) can repeat after a reboot: never reuse one
        path = run_dir / f"{_safe(this_host())}-{os.getpid()}-{next(_writer_numbers)}"
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            path.mkdir()
            break
        except (FileExistsError, FileNotFoundError):  # taken, or the run's directory was just emptied
            if not run_dir.is_dir() and (run_dir.exists() or run_dir.is_symlink() or _blocked(run_dir)):
                raise SpoolUnusable(f"cannot create the spool {run_dir}: a file or a dangling link is in the way "
                                    f"(set {SPOOL_ENV} to a writable directory)") from None
            continue
        except OSError as error:  # read-only, full disk, no permission: a local fault the user must fix
            raise SpoolUnusable(f"cannot create the spool {path}: {error.strerror or error} "
                                f"(set {SPOOL_ENV} to a writable directory)") from None
    else:
        raise SpoolUnusable(f"cannot create a writer directory in the spool {run_dir}")
    try:
        fd = lock_writer_dir(path)
        write_atomically(path / "writer.json", json.dumps({  # nothing secret: delivery needs none of the URI
            "run_id": run_id, "server": public_uri(tracking_uri), "host": this_host(), "pid": os.getpid(),
            "created": time.time()}))
    except OSError as error:
        raise SpoolUnusable(f"cannot write the spool {path}: {error.strerror or error}") from None
    return path, fd


def writer_dirs(directory: Path) -> Iterator[tuple[Path, str]]:
    """(writer directory, run id) of every writer spool at most two levels below ``directory`` (a spool
    root, a run's directory, or a writer directory itself), oldest first."""
    found = []
    for meta in [directory / "writer.json", *directory.glob("*/writer.json"), *directory.glob("*/*/writer.json")]:
        try:
            record = json.loads(meta.read_text())
            found.append((float(record["created"]), meta.parent.name, meta.parent, str(record["run_id"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a writer (or one being created right now, or a damaged one: left alone)
    for _, _, path, run_id in sorted(found):
        yield path, run_id


def spooled_entries(directory: Path) -> int:
    """Entries waiting in the writer spools at most two levels below ``directory`` (not those set aside)."""
    return sum(sum(1 for p in writer.iterdir() if ENTRY_NAME.match(p.name)) for writer, _ in writer_dirs(directory)
               if writer.is_dir())


def write_atomically(path: Path, text: str) -> None:
    """Write a temp name, then rename: a reader (or a later process) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class SpoolDelivery:
    delivered: int = 0
    pending: int = 0  # still in the spool (server away, or waiting behind an undelivered writer)
    failed: list[str] = field(default_factory=list)
    busy: list[Path] = field(default_factory=list)  # spools of live processes, left alone
    set_aside: int = 0  # entries in failed/ after this attempt: refused, unreadable, or a held status
    live: object = field(default=None, repr=False, compare=False)  # the Outbox delivering now, if any

    @property
    def complete(self) -> bool:
        return not (self.pending or self.failed)

    def delivered_so_far(self) -> int:
        """What is delivered already, while a delivery is still going on (read from another thread)."""
        live = self.live
        return self.delivered + (live.delivered if live is not None else 0)


def check_spool(tracking_uri: str) -> Path:
    """Before a run is created: the spool root of ``tracking_uri`` exists (made if needed) and takes a file.
    ``SpoolUnusable`` in one line otherwise (a dangling link or a file in the way, read-only, a full disk)."""
    root = spool_root_for(tracking_uri)
    hint = f"set {SPOOL_ENV} to a writable directory" if not tracking_uri.startswith(("sqlite:", "file:", "/")) \
        else "the spool lives beside the store"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SpoolUnusable(f"cannot create the spool {root}: a file or a dangling link is in the way ({hint})") from None
    except OSError as error:
        raise SpoolUnusable(f"cannot create the spool {root}: {error.strerror or error} ({hint})") from None
    probe = root / f".probe-{this_host()}-{os.getpid()}"
    try:
        probe.write_bytes(b"\0" * 4096)  # a block: a full disk refuses it
    except OSError as error:
        raise SpoolUnusable(f"cannot write to the spool {root}: {error.strerror or error} ({hint})") from None
    finally:
        probe.unlink(missing_ok=True)
    return root
