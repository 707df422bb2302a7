"""Worker process pools that stop with their parent, at once and without a word.

Ctrl-C sends SIGINT to the terminal's whole process group, workers included. Left alone,
each worker of a ProcessPoolExecutor raises KeyboardInterrupt wherever it happens to be and
prints its traceback; one caught halfway through reading the task queue leaves the queue
wedged, and the parent then waits forever at exit for workers that wait for a task (seen
about once in six Ctrl-Cs of `bertforge data`). So here the workers ignore SIGINT, and when
the parent leaves the pool on any exception (KeyboardInterrupt, an error in the corpus) the
queued tasks are cancelled and the workers terminated rather than waited for. Whatever a
terminated worker was writing is a temporary file (`fileio.atomic_open`) that the next run
removes; nothing it had finished is touched.

A parent killed outright (SIGKILL, the out-of-memory killer) cannot terminate anything: the
workers would wait for a task forever, holding their memory. On Linux each worker asks the
kernel to kill it when its parent dies (PR_SET_PDEATHSIG). `bertforge` itself turns SIGTERM
(`kill`, a batch system's time limit) into the same orderly stop as Ctrl-C (`cli.main`).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any


def ignore_ctrl_c() -> None:
    """A worker's first act: leave SIGINT to the parent, which decides what Ctrl-C stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (a parent that died
    before the request was made is caught by the pid check)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:
        os._exit(1)


def _start(parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    ignore_ctrl_c()
    die_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


@contextlib.contextmanager
def process_pool(
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[cf.ProcessPoolExecutor]:
    """A ProcessPoolExecutor of `workers` spawned processes: waited for when the block ends
    normally, terminated when it ends on an exception (which then propagates)."""
    pool = cf.ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start,
        initargs=(os.getpid(), initializer, initargs),
    )
    try:
        yield pool
    except BaseException:
        terminate(pool)
        raise
    pool.shutdown(wait=True)


def terminate(pool: cf.ProcessPoolExecutor) -> None:
    """Cancel the pool's queued tasks and end its workers now (Python 3.14 has
    `terminate_workers`; before it, the worker table is the private `_processes`)."""
    if hasattr(pool, "terminate_workers"):
        pool.terminate_workers()
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.terminate()
    for p in processes:
        p.join()
