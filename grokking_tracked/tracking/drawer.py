"""``FigureDrawer``: the separate process a study worker draws its runs' figures in. A light module (the standard
library and ``figures``): that process imports it, and must not load torch or mlflow."""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import threading
from concurrent.futures import Future, ProcessPoolExecutor

from .. import figures


class FigureDrawer:
    """Draws runs' figures in a separate process (spawned once, on first use), so that a study worker's next trial
    trains while the last one's figures are drawn: matplotlib's rendering takes ~0.5-1 s per run on this CPU,
    more than the rest of a trial's bookkeeping. The figures are drawn from the history, the events and the
    attention grid alone (no model, no torch in that process)."""

    def __init__(self):
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Spawn the process now and let it import matplotlib (~2-4 s here) while the caller
        opens its stores and trains the first trial, instead of after that trial ends."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_end_with_parent)
            # by name: a function of this module would drag mlflow and torch into that process
            self._pool.submit(importlib.import_module, figures.__name__)

    def submit(self, directory, history, events, title: str, grid) -> Future:
        self.start()
        return self._pool.submit(figures.save_run_figures, str(directory), history, events, title, grid)

    def call(self, function, *args) -> Future:
        """Run ``function(*args)`` in this process too: other slow, self-contained work that must not hold up the
        worker (optuna-dashboard's notes). ``function``'s module must import neither torch nor mlflow."""
        self.start()
        return self._pool.submit(function, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _end_with_parent() -> None:
    """In the figure process: exit when the process that started it ends. A worker killed with SIGKILL cannot shut
    its pool down, and the pool's process waited for work forever (it holds its queue's write end too, so it never
    sees end-of-file): one ~270 MB process left behind per killed worker.

    Ctrl-C reaches the whole process group, this process too: it ignores it (its traceback reached the terminal,
    and the figures of a trial that had just finished were lost); its parent ends it by shutting the pool down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def wait_then_exit() -> None:
        multiprocessing.parent_process().join()
        os._exit(1)

    threading.Thread(target=wait_then_exit, name="end-with-parent", daemon=True).start()
