"""How many workers: the affinity mask and the cgroup CPU quota, not the machine's core count."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bertforge.workers import available_memory, cgroup_cpu_quota, start_all, usable_cpus


def fake_cgroup(tmp_path: Path, files: dict[str, str], own: str | None = None) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    if own is None or ":" not in own:  # a cgroup v2 path, or a v1 line of /proc/self/cgroup
        own = f"0::/{own}" if own else "12:cpu,cpuacct:/"
    proc.write_text(f"1:name=systemd:/user.slice\n{own}\n")
    return root, proc


@pytest.mark.parametrize(
    ("files", "own", "want"),
    [
        ({"cpu.max": "250000 100000\n"}, None, 3),  # docker --cpus 2.5: three workers
        ({"cpu.max": "max 100000\n"}, None, None),  # no limit
        ({"job/cpu.max": "400000 100000\n", "cpu.max": "max 100000\n"}, "job", 4),  # own cgroup
        ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, None, 2),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None, None),
        ({"cpu.max": "garbage\n"}, None, None),
        ({}, None, None),  # no cgroup filesystem at all
        ({"slice/cpu.max": "100000 100000\n", "slice/job/cpu.max": "400000 100000\n"},
         "slice/job", 1),  # a slice's quota above the process's own cgroup holds too
        ({"slice/cpu.max": "max 100000\n", "slice/job/cpu.max": "150000 100000\n"},
         "slice/job", 2),
        ({"cpu.max": "300000 100000\n"}, "docker/4f2a", 3),  # a container: its own path unseen
        ({"cpu/job/cpu.cfs_quota_us": "200000\n", "cpu/job/cpu.cfs_period_us": "100000\n",
          "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
         "5:cpu,cpuacct:/job", 2),  # cgroup v1, the process's own cgroup
    ],
)  # fmt: skip
def test_cgroup_cpu_quota(tmp_path, files, own, want):
    root, proc = fake_cgroup(tmp_path, files, own)
    assert cgroup_cpu_quota(root, proc) == want


@pytest.mark.parametrize(
    ("files", "own", "meminfo", "want"),
    [
        ({"memory.max": "1000000\n", "memory.current": "400000\n"}, None, 2000, 600_000),
        ({"memory.max": "max\n", "memory.current": "400000\n"}, None, 2000, 2_048_000),
        ({"job/memory.max": "900000\n", "job/memory.current": "100000\n",
          "memory.max": "max\n"}, "job", 2000, 800_000),  # its own cgroup's limit
        ({"memory.max": "1000\n", "memory.current": "5000\n"}, None, 2000, 0),  # over it
        ({"memory/memory.limit_in_bytes": "3000000\n", "memory/memory.usage_in_bytes": "1000\n"},
         None, 9000, 2_999_000),  # cgroup v1
        ({"memory/memory.limit_in_bytes": "9223372036854771712\n",
          "memory/memory.usage_in_bytes": "1000\n"}, None, 9000, 9_216_000),  # v1, no limit
        ({"memory.max": "garbage\n"}, None, 2000, 2_048_000),
        ({}, None, 2000, 2_048_000),  # no cgroup filesystem
        ({"memory.max": "1000000\n", "memory.current": "400000\n"}, None, None, 600_000),
        ({}, None, None, None),  # not Linux: nothing to read
        ({"slice/memory.max": "500000\n", "slice/memory.current": "100000\n",
          "slice/job/memory.max": "max\n", "slice/job/memory.current": "50000\n"},
         "slice/job", 2000, 400_000),  # a limit on the slice above the process's cgroup
        ({"slice/memory.max": "5000000\n", "slice/memory.current": "100000\n",
          "slice/job/memory.max": "700000\n", "slice/job/memory.current": "50000\n"},
         "slice/job", 9000, 650_000),  # its own, tighter
        ({"memory/job/memory.limit_in_bytes": "2000000\n",
          "memory/job/memory.usage_in_bytes": "500000\n",
          "memory/memory.limit_in_bytes": "9223372036854771712\n",
          "memory/memory.usage_in_bytes": "900000\n"}, "9:memory:/job", 9000, 1_500_000),  # v1
        ({"memory.max": "800000\n", "memory.current": "100000\n"}, "docker/4f2a", 2000,
         700_000),  # a container: the path named in /proc/self/cgroup is not in its view
    ],
)  # fmt: skip
def test_available_memory_is_the_least_of_the_machine_and_the_cgroup(
    tmp_path, files, own, meminfo, want
):
    root, proc = fake_cgroup(tmp_path, files, own)
    info = tmp_path / "meminfo"
    if meminfo is not None:
        info.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {meminfo} kB\n")
    assert available_memory(root, info, proc) == want


def test_usable_cpus_caps_the_affinity_mask_by_the_quota(tmp_path):
    assert usable_cpus(tmp_path / "none") == len(os.sched_getaffinity(0))
    root, _ = fake_cgroup(tmp_path, {"cpu.max": "50000 100000\n"})
    assert usable_cpus(root) == 1  # half a CPU still gets one worker


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_usable_cpus_follows_the_affinity_mask():
    """A process pinned to one core (taskset, a Slurm job step) gets one worker."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from bertforge.workers import usable_cpus; print(usable_cpus())"
    )
    assert subprocess.check_output([sys.executable, "-c", code]).strip() == b"1"


def test_torch_threads_are_capped_by_a_cpu_quota_unless_omp_num_threads_chose():
    """Training and embedding on a CPU in a container limited to one CPU run one thread."""
    code = (
        "import torch, bertforge.workers as w; torch.set_num_threads(2); "
        "w.usable_cpus = lambda: 1; "
        "from bertforge.distributed import setup; from bertforge.inference import pick_device; "
        "setup('cpu'); a = torch.get_num_threads(); torch.set_num_threads(2); "
        "pick_device('cpu'); print(a, torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    run = subprocess.check_output([sys.executable, "-c", code], env=env)
    assert run.split() == [b"1", b"1"]
    chosen = subprocess.check_output(
        [sys.executable, "-c", code], env={**env, "OMP_NUM_THREADS": "2"}
    )
    assert chosen.split() == [b"2", b"2"]


def _sigint_handler() -> str:
    return repr(signal.getsignal(signal.SIGINT))


def test_workers_are_started_with_ctrl_c_already_ignored():
    """The ignore is inherited through exec, so it holds while a worker still imports
    (before any initializer could set it); the parent gets its own handler back."""
    before = signal.getsignal(signal.SIGINT)
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(2, mp_context=context) as plain:
        assert "default_int_handler" in plain.submit(_sigint_handler).result()
    with cf.ProcessPoolExecutor(2, mp_context=context) as pool:
        start_all(pool, 2)
        assert signal.getsignal(signal.SIGINT) is before
        handlers = {pool.submit(_sigint_handler).result() for _ in range(8)}
    assert handlers == {repr(signal.SIG_IGN)}


class Stop(Exception):
    pass


def test_a_signal_to_the_parent_of_a_pool_waits_for_a_wait():
    """Ctrl-C and SIGTERM reach the parent of a pool only in `finished` (between its slices,
    holding none of the futures' locks), or at the block's end; their handlers are back after."""
    import time

    from bertforge.workers import finished, process_pool

    def stop(signum, frame):
        raise Stop(signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        for signum, raised in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Stop)):
            reached = False
            with pytest.raises(raised), process_pool(2) as pool:
                futures = {pool.submit(time.sleep, 0.3)}
                os.kill(os.getpid(), signum)
                time.sleep(0.05)  # the handler has run: the signal is only noted
                reached = True
                finished(futures)
            assert reached
        with pytest.raises(KeyboardInterrupt), process_pool(2):
            os.kill(os.getpid(), signal.SIGINT)  # noted, then raised as the block ends
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is stop
    finally:
        signal.signal(signal.SIGTERM, before)
