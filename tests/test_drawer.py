"""The figure process of a study worker ends with the worker, even when the worker is killed with SIGKILL (it
cannot shut its pool down then). Real processes, a real signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

SCRIPT = """
import sys, time
from grokking_tracked.tracking.drawer import FigureDrawer
drawer = FigureDrawer()
drawer.start()
drawer.call(len, "ready").result(timeout=120)  # the figure process is up and has served a call
print(*drawer._pool._processes, flush=True)  # its pid
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone for our purpose: it holds no memory
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_the_figure_process_ends_when_its_worker_is_killed():
    worker = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        figure_process = int(worker.stdout.readline())
        assert alive(figure_process)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        deadline = time.monotonic() + 30
        while alive(figure_process):
            assert time.monotonic() < deadline, "the figure process outlived its killed worker"
            time.sleep(0.05)
    finally:
        worker.kill()
