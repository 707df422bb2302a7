"""glibc's malloc told to keep freed memory, for training on a CPU.

A training step allocates and frees the same large tensors every step: activations,
gradients, logits, megabytes each. Left at its defaults, glibc's malloc serves a large
allocation with fresh pages from mmap (above its mmap threshold: 128 KiB at start, raised
as large blocks are freed, to at most 32 MiB) and hands the free top of its heap back to the
system beyond its trim threshold; either way the next step writes to pages the kernel must
fault in and zero, 4 KiB at a time. The demo's training step (a tiny BERT, bf16 on this
machine's 2 cores) took 14,600 page faults a step and 63-68 ms; with the settings below, 17
faults and 46-49 ms (`bench/RESULTS.md`). PyTorch's CPU performance guide recommends tcmalloc
or jemalloc for the same reason, but those need LD_PRELOAD before the process starts;
`mallopt` sets glibc's own allocator from inside, which is all this module does (ctypes:
no library wraps mallopt), besides handing freed memory back on request (`malloc_trim`).

What it costs: up to TRIM_THRESHOLD of freed memory stays with the process instead of going
back to the system, and a freed block below MMAP_THRESHOLD is reused rather than unmapped;
so the process's resident memory stays near its peak rather than falling between steps.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 256 << 20  # blocks larger than this still come from mmap and go back on free
TRIM_THRESHOLD = 1 << 30  # free heap top kept before any is handed back
TOP_PAD = 64 << 20  # the heap grows in steps of this much beyond the request
FALLBACK_MMAP_THRESHOLD = 32 << 20  # the most older glibc accepts


def keep_freed_memory() -> bool:
    """Set glibc malloc's thresholds so that freed memory is reused, not returned and faulted
    in anew. Whether they were set: False off Linux/glibc (musl, macOS), changing nothing.
    Process-wide, and idempotent."""
    mallopt = glibc("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    # the mmap threshold first: setting either fixes both (glibc stops adjusting them), and a
    # trim threshold alone would leave every block above 128 KiB to mmap
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and not mallopt(
        M_MMAP_THRESHOLD, FALLBACK_MMAP_THRESHOLD
    ):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_TOP_PAD, TOP_PAD))


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc's malloc_trim), which neither
    the defaults nor `keep_freed_memory` do for free blocks below the heap's top: after a
    load that freed much in many small pieces (the TFRecords' decoding). Whether it ran."""
    trim = glibc("malloc_trim", [ctypes.c_size_t])
    if trim is None:
        return False
    trim(0)
    return True


def glibc(name: str, argtypes: list[Any]) -> Any | None:
    """glibc's function `name` returning an int, or None off Linux or where the C library
    has none (musl has no malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function
