"""The tests' own helpers that a test's outcome rests on (conftest.py)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import run_group


def gone(pid: int) -> bool:
    """Whether the process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_a_timed_out_command_takes_its_childrens_children_with_it(tmp_path):
    """As torchrun's workers: a grandchild of the command is killed with it on a timeout, not
    left running for the rest of the suite."""
    pid_file = tmp_path / "pid"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    with pytest.raises(subprocess.TimeoutExpired):
        run_group(["sh", "-c", script], timeout=2)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(pid)


def test_a_finished_command_gives_its_output_and_status():
    done = run_group(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=30,
                     capture_output=True, text=True)  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    with pytest.raises(subprocess.CalledProcessError):
        run_group(["sh", "-c", "exit 3"], timeout=30, check=True)
