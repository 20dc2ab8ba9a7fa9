"""A run's lease: which process is writing an MLflow run, so a second writer can be refused.

The lease is one run tag (``LEASE_TAG``) holding JSON: host, pid, the process's start identity and the
time of its last heartbeat. MLflow has no compare-and-swap, so the lease is advisory: it turns "two
processes silently write the same steps" into "the second one is refused in one line", not a lock.

Deciding whether a lease is live (``lease_state``) is a pure function of the tag value, this host's name,
the time and a grace period, so it is easy to test; only the same-host liveness check reads /proc.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

LEASE_TAG = "grokking_tracked.lease"
HEARTBEAT_SECONDS = 30.0
# Another host's lease expires only this long after its last heartbeat. It must exceed the heartbeat
# interval, the clock skew between hosts, and the outages during which heartbeats wait in the outbox
# (a writer cut off from the server for longer than this looks dead to other hosts).
GRACE_SECONDS = 300.0

_UNKNOWN_START = "?"  # alive, but this platform cannot tell a reused pid from the original process


def process_identity(pid: int) -> str | None:
    """``"<boot id>:<start ticks>"`` of a live process, None if there is none with that pid.

    A pid alone is reused by the kernel; the start time (field 22 of /proc/<pid>/stat, clock ticks since
    boot) plus the boot id names one process for good. Without /proc (macOS) only liveness is known."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return _pid_alive_marker(pid)
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie has exited; only its exit status is left for the parent
        return None
    start_ticks = fields[19]  # field 22 overall; fields[0] is field 3
    return f"{_boot_id()}:{start_ticks}"


def _pid_alive_marker(pid: int) -> str | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # exists, owned by someone else
        pass
    return _UNKNOWN_START


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "noboot"


def this_host() -> str:
    return socket.gethostname()


def lease_value(heartbeat: float, released: bool = False, pid: int | None = None) -> str:
    """The tag value for this process (or ``pid`` on this host) with a heartbeat at ``heartbeat``."""
    pid = os.getpid() if pid is None else pid
    return json.dumps({"host": this_host(), "pid": pid, "started": process_identity(pid),
                       "heartbeat": round(heartbeat, 3), "released": released}, sort_keys=True)


@dataclass(frozen=True)
class LeaseState:
    live: bool
    reason: str  # one line naming the holder and the age of its heartbeat


def lease_state(value: str | None, host: str, now: float, grace_seconds: float = GRACE_SECONDS,
                identity_of: Callable[[int], str | None] = process_identity) -> LeaseState:
    """Whether the lease in tag ``value`` is still held, seen from ``host`` at time ``now``.

    - missing, unreadable or released: free;
    - held on this host: live while its process runs (same pid AND same start identity), free at once
      when it is gone, so ``kill -9`` then ``--resume`` works immediately;
    - held on another host: live until ``grace_seconds`` after its last heartbeat (we cannot see its
      processes; its clock may differ from ours by a little)."""
    if not value:
        return LeaseState(False, "no lease")
    try:
        record = json.loads(value)
        holder_host, pid, heartbeat = str(record["host"]), int(record["pid"]), float(record["heartbeat"])
        started, released = record.get("started"), bool(record.get("released", False))
    except (ValueError, TypeError, KeyError):
        return LeaseState(False, f"unreadable lease tag {value[:60]!r}")
    age = now - heartbeat
    who = f"pid {pid} on {holder_host}, last heartbeat {age:.0f} s ago"
    if released:
        return LeaseState(False, f"released by {who}")
    if holder_host == host:
        identity = identity_of(pid)
        if identity is None:
            return LeaseState(False, f"held by {who}, but that process is gone")
        if started and identity != _UNKNOWN_START and identity != started:
            return LeaseState(False, f"held by {who}, but that pid now belongs to another process")
        return LeaseState(True, f"held by running {who}")
    if age > grace_seconds:
        return LeaseState(False, f"held by {who}: expired (grace {grace_seconds:.0f} s)")
    return LeaseState(True, f"held by {who} (expires {grace_seconds - age:.0f} s after it stops)")


class LeaseKeeper:
    """Holds this process's lease on a run: writes it at ``start()``, renews it every ``every`` seconds
    from a daemon thread, and marks it released at ``stop()``.

    ``set_tags`` receives ``{LEASE_TAG: value}``; pass the outbox's ``set_tags`` so a heartbeat never
    waits on the network (during an outage heartbeats are spooled, and delivered in order later)."""

    def __init__(self, set_tags: Callable[[dict[str, str]], None], every: float = HEARTBEAT_SECONDS,
                 clock: Callable[[], float] = time.time):
        self._set_tags, self._every, self._clock = set_tags, every, clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._write()
        self._thread = threading.Thread(target=self._renew, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _write(self, released: bool = False) -> None:
        self._set_tags({LEASE_TAG: lease_value(self._clock(), released=released)})

    def _renew(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._write()
            except (RuntimeError, OSError):  # the outbox was closed under us (the run is over), or the spool refuses
                return  # writes: the run's next write or its end says so, not a traceback from this thread

    def stop(self, release: bool = True) -> None:
        """Stop renewing; ``release=False`` leaves the last heartbeat (a crash-like end: on this host the
        lease is free once the process exits, elsewhere after the grace period)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if release:
            self._write(released=True)

    def __enter__(self) -> LeaseKeeper:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
