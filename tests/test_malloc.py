"""glibc malloc told to keep freed memory on a CPU (malloc.py): a large block comes from the
heap and stays there when freed, rather than being mapped and unmapped. Each case runs in a
fresh process, as the setting is process-wide and this one may already have it."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

from bertforge import distributed, malloc

# above glibc's default mmap threshold's ceiling (32 MiB) and above malloc.TOP_PAD (which the
# heap keeps whatever the trim threshold), below malloc.MMAP_THRESHOLD
BLOCK = 192 << 20

PROBE = f"""
import ctypes, json, sys
import numpy as np
from bertforge.malloc import keep_freed_memory

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else False
block = np.ones({BLOCK}, dtype=np.uint8)  # written, so its pages are really there
live = libc.mallinfo2()
del block
freed = libc.mallinfo2()
print(json.dumps({{"tuned": tuned, "mapped_live": live.hblkhd, "heap_free_after": freed.fordblks}}))
"""


def has_mallinfo2() -> bool:
    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")


def probe(mode: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not has_mallinfo2(), reason="needs glibc 2.33+ (mallinfo2)")
def test_a_freed_block_stays_in_the_heap_for_the_next_step() -> None:
    assert malloc.TOP_PAD < BLOCK < malloc.MMAP_THRESHOLD
    default, tuned = probe("default"), probe("tuned")
    # glibc's defaults: a 192 MiB block is mapped for itself and unmapped when freed, so the
    # next step's block of that size faults in fresh pages
    assert default["mapped_live"] >= BLOCK
    assert default["heap_free_after"] < BLOCK
    # tuned: it comes from the heap, and the heap keeps it when it is freed (the trim
    # threshold is above it)
    assert tuned["tuned"] is True
    assert tuned["mapped_live"] < BLOCK
    assert tuned["heap_free_after"] >= BLOCK


RELEASE = f"""
import json
import numpy as np
from bertforge.malloc import keep_freed_memory, release_freed_memory

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))

keep_freed_memory()
block = np.ones({BLOCK}, dtype=np.uint8)
held = rss()
del block  # kept by the heap (above), so still resident
kept = rss()
released = release_freed_memory()
print(json.dumps({{"held": held, "kept": kept, "after": rss(), "released": released}}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_memory_the_heap_keeps_goes_back_on_request() -> None:
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True,
                         check=True)  # fmt: skip
    r = json.loads(out.stdout)
    assert r["released"] is True
    assert r["kept"] > r["held"] - BLOCK // 2  # freed, but resident
    assert r["after"] < r["kept"] - BLOCK // 2  # handed back


def test_off_glibc_it_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(malloc.sys, "platform", "darwin")
    assert malloc.keep_freed_memory() is False
    assert malloc.release_freed_memory() is False


def test_a_process_training_on_the_cpu_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(distributed, "keep_freed_memory", lambda: calls.append(True) or True)
    distributed.setup("cpu")
    assert calls == [True]
