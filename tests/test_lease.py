"""A run's lease: live while its writer runs (here), or until the grace period ends (elsewhere)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

from grokking_tracked.tracking.delivery.lease import (LEASE_TAG, LeaseKeeper, lease_state, lease_value, process_identity,
                                    this_host)

HOST, NOW, GRACE = this_host(), 1_800_000_000.0, 300.0


def record(**fields) -> str:
    base = {"host": "gpu-node-7", "pid": 4242, "started": "boot:123", "heartbeat": NOW - 10, "released": False}
    return json.dumps({**base, **fields})


def test_missing_or_unreadable_lease_is_free():
    for value in (None, "", "not json", json.dumps({"host": "x"}), json.dumps([1, 2])):
        state = lease_state(value, HOST, NOW, GRACE)
        assert not state.live, value
    assert "unreadable" in lease_state("not json", HOST, NOW, GRACE).reason


def test_lease_from_another_host_is_live_until_the_grace_period_after_its_last_heartbeat():
    live = lease_state(record(heartbeat=NOW - 10), HOST, NOW, GRACE)
    assert live.live and "pid 4242 on gpu-node-7" in live.reason and "10 s ago" in live.reason
    assert lease_state(record(heartbeat=NOW - GRACE + 1), HOST, NOW, GRACE).live
    expired = lease_state(record(heartbeat=NOW - GRACE - 1), HOST, NOW, GRACE)
    assert not expired.live and "expired" in expired.reason


def test_released_lease_is_free_at_once_even_from_another_host():
    assert not lease_state(record(released=True), HOST, NOW, GRACE).live


def test_lease_of_a_process_on_this_host_lives_exactly_as_long_as_the_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        value = lease_value(NOW - 4000, pid=child.pid)  # an old heartbeat: on this host only liveness counts
        live = lease_state(value, HOST, NOW, GRACE)
        assert live.live and f"pid {child.pid} on {HOST}" in live.reason
        child.send_signal(signal.SIGKILL)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, not yet reaped: a zombie
        gone = lease_state(value, HOST, NOW, GRACE)
        assert not gone.live and "gone" in gone.reason
    finally:
        child.kill()
        child.wait()
    assert not lease_state(value, HOST, NOW, GRACE).live  # reaped: no such pid at all


def test_a_reused_pid_does_not_keep_a_dead_writers_lease():
    mine = json.loads(lease_value(NOW))  # this process is alive, but started at another time
    assert lease_state(json.dumps(mine), HOST, NOW, GRACE).live
    mine["started"] = "some-other-boot:1"
    stale = lease_state(json.dumps(mine), HOST, NOW, GRACE)
    assert not stale.live and "another process" in stale.reason


def test_process_identity_names_one_process():
    assert process_identity(os.getpid()) == process_identity(os.getpid()) is not None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_identity(child.pid) is None


def test_keeper_writes_renews_and_releases_the_lease():
    written: list[dict] = []
    renewed = threading.Event()

    def set_tags(tags: dict) -> None:
        written.append(tags)
        if len(written) >= 3:
            renewed.set()

    clock = iter(range(1000, 2000)).__next__  # one "second" per heartbeat
    keeper = LeaseKeeper(set_tags, every=0.01, clock=clock)
    keeper.start()
    assert renewed.wait(30)
    keeper.stop()
    values = [json.loads(tags[LEASE_TAG]) for tags in written]
    assert [v["heartbeat"] for v in values] == list(range(1000, 1000 + len(values)))
    assert not any(v["released"] for v in values[:-1]) and values[-1]["released"]
    assert all(v["pid"] == os.getpid() and v["host"] == HOST for v in values)
    assert lease_state(written[-2][LEASE_TAG], HOST, 2000.0, GRACE).live
    assert not lease_state(written[-1][LEASE_TAG], HOST, 2000.0, GRACE).live
