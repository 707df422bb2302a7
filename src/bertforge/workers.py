"""Worker process pools that stop with their parent, at once and without a word.

Ctrl-C sends SIGINT to the terminal's whole process group, workers included. Left alone,
each worker of a ProcessPoolExecutor raises KeyboardInterrupt wherever it happens to be and
prints its traceback; one caught halfway through reading the task queue leaves the queue
wedged, and the parent then waits forever at exit for workers that wait for a task (9 of 36
Ctrl-Cs of `bertforge data` at random moments hung so, on the development machine). So here
the workers ignore SIGINT from their first instruction (`start_all`), and when the parent
leaves the pool on any exception (KeyboardInterrupt, an error in the corpus) the queued tasks
are cancelled and the workers terminated rather than waited for. Whatever a terminated worker
was writing is a temporary file (`fileio.atomic_open`) that the next run removes; nothing it
had finished is touched.

The parent's own Ctrl-C must not land while it holds a lock of the pool's. `cf.wait` takes
every future's lock, and a KeyboardInterrupt raised while it takes them can leave one taken;
the pool's manager thread, cancelling that future as the parent leaves, then waits for it
forever, and the parent's exit waits for that thread. Seen once in about 120 Ctrl-Cs of `bertforge
data` at random moments: the stacks showed the exit waiting for the manager thread and that
thread in `Future.cancel`, waiting for a future's lock. So while a pool runs, SIGINT and
SIGTERM are only noted (`DeferredStops`), and `finished` (the parent's wait for results, in
slices of 0.1 s) hands a noted one to its usual handler between slices, holding
no lock: Ctrl-C stops the parent within 0.1 s of a wait, or when the block ends.

A parent killed outright (SIGKILL, the out-of-memory killer) cannot terminate anything: the
workers would wait for a task forever, holding their memory. On Linux each worker asks the
kernel to kill it when its parent dies (PR_SET_PDEATHSIG). `bertforge` itself turns SIGTERM
(`kill`, a batch system's time limit) into the same orderly stop as Ctrl-C (`cli.main`).

How many workers: `usable_cpus`, not `os.cpu_count()`, which counts the whole machine. A
batch job given 8 cores of a 128-core node (Slurm, taskset: the affinity mask) or a container
limited to 4 CPUs (docker --cpus, Kubernetes: the cgroup's CPU quota) would otherwise start
128 workers that fight over 8 or 4 cores.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import math
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
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
        start_all(pool, workers)
        with DeferredStops():
            yield pool
    except BaseException:
        terminate(pool)
        raise
    pool.shutdown(wait=True)


class DeferredStops:
    """In the main thread, SIGINT and SIGTERM only noted until `deliver` (or the block's end)
    restores their handlers and raises the noted one there; elsewhere nothing changes."""

    active: DeferredStops | None = None

    def __init__(self) -> None:
        self.noted: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> DeferredStops:
        if threading.current_thread() is threading.main_thread():
            self.previous = {
                s: signal.signal(s, self.note) for s in (signal.SIGINT, signal.SIGTERM)
            }
            DeferredStops.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.deliver()
        self.restore()

    def note(self, signum: int, frame: Any) -> None:
        if self.noted is None:
            self.noted = signum

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
        if DeferredStops.active is self:
            DeferredStops.active = None

    def deliver(self) -> None:
        """The noted signal, if any, to its usual handler now (KeyboardInterrupt, cli's
        Terminated), with no lock held."""
        if self.noted is None:
            return
        signum, self.noted = self.noted, None
        handler = self.previous.get(signum)
        self.restore()
        if callable(handler):
            handler(signum, None)  # raises here
        else:
            signal.raise_signal(signum)  # SIG_DFL ends the process, SIG_IGN nothing


def finished(pending: set[cf.Future]) -> tuple[set[cf.Future], set[cf.Future]]:
    """`cf.wait(pending, return_when=FIRST_COMPLETED)`, in slices between which a Ctrl-C or
    SIGTERM noted while the pool runs takes effect (see the module's docstring)."""
    while True:
        if DeferredStops.active is not None:
            DeferredStops.active.deliver()
        done, rest = cf.wait(pending, timeout=0.1, return_when=cf.FIRST_COMPLETED)
        if done or not rest:
            return done, rest


def start_all(pool: cf.ProcessPoolExecutor, workers: int) -> None:
    """Start every worker now, with SIGINT ignored for the few milliseconds that takes: an
    ignored signal stays ignored through exec, so Ctrl-C cannot reach a worker even while it
    is still importing, before its initializer runs (a Ctrl-C then printed a traceback about
    once in twelve in the first second and a half). A Ctrl-C within those milliseconds is
    lost; the parent's handler is back before the first unit is read."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for _ in range(workers):  # each submit starts a worker while none is idle
            pool.submit(os.getpid)
    finally:
        signal.signal(signal.SIGINT, previous)


def terminate(pool: cf.ProcessPoolExecutor) -> None:
    """Cancel the pool's queued tasks and end its workers now (Python 3.14 has
    `terminate_workers`; before it, the worker table is the private `_processes`). The pool's
    manager thread is waited for too: left to end while the interpreter exits, it closes its
    wake-up pipe as `concurrent.futures`' exit hook writes to it, and Python 3.11 prints
    "Exception ignored ... Bad file descriptor" after bertforge's one line (seen once, on a
    Ctrl-C, in a test that sends seven)."""
    manager = getattr(pool, "_executor_manager_thread", None)  # None once shut down
    if hasattr(pool, "terminate_workers"):
        pool.terminate_workers()  # novermin: Python 3.14, checked by hasattr
    else:
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            p.terminate()
        for p in processes:
            p.join()
    if manager is not None:
        manager.join(timeout=10)


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may run on (its affinity mask), capped by its cgroup's CPU quota."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere the whole machine
    n = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(n, quota) if quota else n)


def cgroup_dirs(root: Path, proc_cgroup: Path, controller: str | None = None) -> list[Path]:
    """Where this process's cgroup limits are kept: its own cgroup, then each one above it up
    to the root, as a limit set on any of them holds (systemd sets them on slices, a job
    scheduler on the job's cgroup above its steps). cgroup v2 (controller None) names the
    own cgroup in /proc/self/cgroup as "0::/PATH"; v1 as "4:memory:/PATH" for the controller's
    hierarchy under ROOT/memory. Inside a container the named path may not be there (the
    container sees its own cgroup as the root): only the root is read then."""
    base = root if controller is None else root / controller
    own = ""
    with contextlib.suppress(OSError):
        for line in proc_cgroup.read_text().splitlines():
            number, names, path = [*line.split(":", 2), "", ""][:3]
            v2_line = number == "0" and not names
            if v2_line if controller is None else controller in names.split(","):
                own = path.strip("/")
    parts = Path(own).parts if own else ()
    above = [base.joinpath(*parts[:k]) for k in range(len(parts), 0, -1)]
    return [d for d in above if d.is_dir()] + [base]


def limit_dirs(
    root: Path, proc_cgroup: Path, v2_file: str, controller: str
) -> tuple[bool, list[Path]]:
    """Whether the limit is cgroup v2's (its `v2_file`, cpu.max or memory.max, is kept in
    some cgroup of this process's), and the directories to read it from, the process's own
    first (`cgroup_dirs`): v2's, or else v1's `controller` hierarchy."""
    dirs = cgroup_dirs(root, proc_cgroup)
    if any((d / v2_file).is_file() for d in dirs):
        return True, dirs
    return False, cgroup_dirs(root, proc_cgroup, controller)


def cgroup_numbers(d: Path, name: str) -> list[int] | None:
    """The integers in one cgroup file ("250000 100000"), or None where it is missing,
    unreadable, unbounded ("max") or not numbers."""
    try:
        return [int(x) for x in (d / name).read_text().split()]
    except (OSError, ValueError):
        return None


def cgroup_cpu_quota(root: Path, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """CPUs the cgroup quotas allow (the least along the process's cgroup and those above it,
    rounded up), or None: no quota, or no cgroup to read. cgroup v2 keeps "QUOTA PERIOD" (or
    "max PERIOD") in cpu.max; v1 keeps cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us
    under cpu/."""
    quotas = []
    v2, dirs = limit_dirs(root, proc_cgroup, "cpu.max", "cpu")
    files = ("cpu.max",) if v2 else ("cpu.cfs_quota_us", "cpu.cfs_period_us")
    for d in dirs:
        pair = [n for name in files for n in cgroup_numbers(d, name) or []]
        if len(pair) == 2 and pair[0] > 0 and pair[1] > 0:
            quotas.append(pair[0] / pair[1])
    return math.ceil(min(quotas)) if quotas else None


def available_memory(
    root: Path = Path("/sys/fs/cgroup"),
    meminfo: Path = Path("/proc/meminfo"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> int | None:
    """Bytes this process can still take: the machine's MemAvailable, capped by what the
    cgroup memory limits leave (a container's: docker --memory, Kubernetes' limits; a
    systemd slice's, a job scheduler's), the least along its cgroup and those above it, or
    None where neither can be read (not Linux). cgroup v2 keeps the limit in memory.max
    ("max": none) and the use in memory.current; v1 in memory/.../memory.limit_in_bytes (a
    huge number: none) and memory.usage_in_bytes."""
    free = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    left = []
    v2, dirs = limit_dirs(root, proc_cgroup, "memory.max", "memory")
    limit_file, use_file = ("memory.max", "memory.current") if v2 else (
        "memory.limit_in_bytes", "memory.usage_in_bytes")  # fmt: skip
    for d in dirs:
        limit, use = cgroup_numbers(d, limit_file), cgroup_numbers(d, use_file)
        if limit and use and limit[0] < 1 << 60:  # v1's "no limit": 2**63 less a page
            left.append(limit[0] - use[0])
    known = [x for x in (free, *left) if x is not None]
    return max(0, min(known)) if known else None


def cap_torch_threads() -> None:
    """torch's CPU thread pool follows the affinity mask but not a cgroup CPU quota: in a
    container limited to 4 CPUs of a 64-core host it would run 64 threads on 4 CPUs' time.
    Cap it at `usable_cpus`, unless OMP_NUM_THREADS (torchrun sets it) already chose."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > (n := usable_cpus()):
        torch.set_num_threads(n)
