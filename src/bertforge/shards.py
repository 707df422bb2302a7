"""bertforge's native shard format: fixed-size records, memory-mappable with numpy alone.

Written here because it is the product's own format. A shard is

    bytes 0-7    magic b"BFSHARD\\0"
    bytes 8-11   format version, uint32 little endian (1)
    bytes 12-15  header length H, uint32 little endian
    bytes 16-    H bytes of UTF-8 JSON, padded with spaces so records start at a multiple of 64
    then         num_records fixed-size records (a packed numpy structured dtype)

The JSON holds num_records, the record dtype as a list of [name, dtype, shape], and the data
settings (max_seq_length, max_predictions_per_seq, static_masking, vocab_size). Reading one:

    header = json.loads(raw[16 : 16 + header_length]); offset = ceil64(16 + header_length)
    records = np.memmap(path, dtype=np.dtype([(n, d, tuple(s)) for n, d, s in header["dtype"]]),
                        mode="r", offset=offset, shape=(header["num_records"],))

Records hold instances before masking: `input_ids` ([CLS] A [SEP] B [SEP], 0-padded),
`length` (real tokens), `sep_a` (index of the first [SEP]) and `next_sentence_label` (1 when
B is a random segment). Segment ids follow: 1 for sep_a < i < length. With static masking,
`input_ids` is already masked and `masked_lm_positions`, `masked_lm_ids` and `num_masked` are
stored too. Token ids are uint16 when the vocabulary has at most 65,536 entries, else uint32.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from bertforge.errors import UserError

MAGIC = b"BFSHARD\0"
VERSION = 1
ALIGN = 64
FILES_HEADROOM = 256  # open files left for everything else when shards are held open
MIN_HELD = 16  # shards held open however low the limit
BLOCK_BYTES = 8 << 20  # what a start-up pass reads at a time, per thread


def is_shard(path: str | Path) -> bool:
    """Whether the file starts as a native shard does (its magic), not as a TFRecord."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def record_dtype(
    vocab_size: int, max_seq_length: int, max_predictions_per_seq: int, static_masking: bool
) -> np.dtype:
    ids = id_dtype(vocab_size)
    fields: list[tuple[str, Any, tuple[int, ...]]] = [
        ("input_ids", ids, (max_seq_length,)),
        ("length", np.dtype("<u2"), ()),
        ("sep_a", np.dtype("<u2"), ()),
        ("next_sentence_label", np.dtype("u1"), ()),
    ]
    if static_masking:
        fields += [
            ("masked_lm_positions", np.dtype("<u2"), (max_predictions_per_seq,)),
            ("masked_lm_ids", ids, (max_predictions_per_seq,)),
            ("num_masked", np.dtype("<u2"), ()),
        ]
    return np.dtype(fields)


def _describe(dtype: np.dtype) -> list[list[Any]]:
    out = []
    for name in dtype.names or ():
        sub = dtype.fields[name][0]  # type: ignore[index]
        base, shape = (sub.base, list(sub.shape)) if sub.shape else (sub, [])
        out.append([name, base.str, shape])
    return out


def _dtype_from(description: list[list[Any]]) -> np.dtype:
    return np.dtype([(name, np.dtype(d), tuple(shape)) for name, d, shape in description])


@dataclass(frozen=True)
class ShardHeader:
    num_records: int
    dtype: np.dtype
    offset: int  # byte offset of the first record
    meta: dict[str, Any]  # everything in the JSON

    @property
    def static_masking(self) -> bool:
        return "masked_lm_positions" in (self.dtype.names or ())


def encode_header(records: np.ndarray, meta: dict[str, Any]) -> bytes:
    body = dict(meta, num_records=len(records), dtype=_describe(records.dtype),
                record_bytes=records.dtype.itemsize)  # fmt: skip
    text = json.dumps(body, sort_keys=True).encode()
    size = 16 + len(text)
    text += b" " * (-size % ALIGN)
    return MAGIC + struct.pack("<II", VERSION, len(text)) + text


def write_shard(f: BinaryIO, records: np.ndarray, meta: dict[str, Any]) -> None:
    """Header + records; `records` must have a dtype from record_dtype()."""
    f.write(encode_header(records, meta))
    f.write(np.ascontiguousarray(records).tobytes())


def read_header(path: str | Path) -> ShardHeader:
    """The header of a shard, checked: magic, version, and a size that fits the records."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(16)
        if len(head) < 16 or head[:8] != MAGIC:
            raise UserError(f"{p}: not a bertforge shard (bad magic); was it written by "
                            "`bertforge data`?")  # fmt: skip
        version, length = struct.unpack("<II", head[8:])
        if version > VERSION:
            raise UserError(f"{p}: shard format version {version} is newer than this "
                            f"bertforge reads ({VERSION}); upgrade bertforge.")  # fmt: skip
        try:
            meta = json.loads(f.read(length))
            dtype = _dtype_from(meta["dtype"])
            num = int(meta["num_records"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{p}: damaged shard header ({e}).") from None
    offset = 16 + length
    expected = offset + num * dtype.itemsize
    actual = p.stat().st_size
    if actual != expected:
        raise UserError(f"{p}: {actual} bytes where the header promises {expected} "
                        f"({num} records); the shard is truncated or damaged.")  # fmt: skip
    return ShardHeader(num, dtype, offset, meta)


def open_shard(path: str | Path) -> tuple[ShardHeader, np.ndarray]:
    """Header and a read-only memory map of the records."""
    header = read_header(path)
    if header.num_records == 0:
        return header, np.zeros(0, dtype=header.dtype)
    records = np.memmap(path, dtype=header.dtype, mode="r", offset=header.offset,
                        shape=(header.num_records,))  # fmt: skip
    return header, records


class ShardSet:
    """The records of many shards, addressed by a global index and read by position
    (`os.pread`) from files held open, rather than memory-mapped.

    Reading through a memory map leaves every page read in the process's resident memory
    until the kernel wants it back: the start-up checks read every record, and random
    batches map the page cache in large blocks (on this machine's Linux 6.18, 2,000 random
    rows of a 273 MB shard mapped all of it), so a trainer on a 6 GB corpus's shards showed
    6 GB resident, what a leak looks like and what some clusters' memory limits count. Read
    by position, the page cache holds the data as before and the process only its batch;
    and a row costs one system call (0.6 us here) instead of a page fault on a cold map.

    `bertforge data` writes a shard per 4 MB of corpus, so there are thousands to hold open:
    the limit on open files is raised as far as this process may (`allow_open_files`), and
    where even that is short of them all, the shards are opened as rows are read and the
    least recently read closed, `held` open at most (slower; `limit_note` is the warning)."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [str(p) for p in paths]
        self.headers = [read_header(p) for p in self.paths]
        self.dtype = self.headers[0].dtype
        for path, header in zip(self.paths, self.headers, strict=True):
            if header.dtype != self.dtype:
                raise UserError(f"{path}: its records are not those of {self.paths[0]} (another "
                                "max_seq_length, masking or vocabulary size); one data "
                                "directory's shards must all match.")  # fmt: skip
        self.sizes = np.array([h.num_records for h in self.headers], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])  # global index of each's first
        self.data_offsets = np.array([h.offset for h in self.headers], dtype=np.int64)
        self.held = allow_open_files(len(self.paths))
        self._open: OrderedDict[int, int] = OrderedDict()  # shard -> fd, least recently read first
        self._lock = threading.Lock()  # the loader's thread and evaluation both read
        self._all: np.ndarray | None = None  # every shard's fd, when all are held open
        self._closer = weakref.finalize(self, _close_all, self._open)
        if self.held == len(self.paths):
            for k, path in enumerate(self.paths):
                self._open[k] = os.open(path, os.O_RDONLY)
            self._all = np.array(list(self._open.values()), dtype=np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def stat_key(self) -> list[list[Any]]:
        """The shards as they are on disk now: absolute path, size, mtime and inode of each."""
        key = []
        for path in self.paths:
            s = os.stat(path)
            key.append([os.path.abspath(path), s.st_size, s.st_mtime_ns, s.st_ino])
        return key

    def limit_note(self) -> str | None:
        """A warning when not every shard can be held open, else None."""
        if self.held == len(self.paths):
            return None
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return (
            f"bertforge: warning: {len(self.paths)} shards, but this process may hold only "
            f"{self.held} open (its limit on open files is {soft}, hard limit {hard}); rows are "
            "read reopening shards as they come, slower. Raise the `nofile` limit to "
            f"{len(self.paths) + FILES_HEADROOM} (/etc/security/limits.conf, LimitNOFILE= for a "
            "systemd service, --ulimit nofile= for docker) to hold them all."
        )

    def records(self, index: np.ndarray) -> np.ndarray:
        """The records at global indices `index`, in that order (a new array)."""
        item = self.dtype.itemsize
        shard = np.searchsorted(self.starts, index, side="right") - 1
        where = (self.data_offsets[shard] + (index - self.starts[shard]) * item).tolist()
        if self._all is not None:
            fds = self._all[shard].tolist()
            data = b"".join([os.pread(fd, item, at) for fd, at in zip(fds, where, strict=True)])
        else:
            with self._lock:
                parts = [
                    self._read(k, item, at) for k, at in zip(shard.tolist(), where, strict=True)
                ]
            data = b"".join(parts)
        if len(data) != len(index) * item:
            self._cut_short(shard)
        return np.frombuffer(data, dtype=self.dtype)

    def blocks(self, k: int) -> Iterator[tuple[int, np.ndarray]]:
        """Shard k's records in order, about BLOCK_BYTES at a time: (first record, block).
        Threads may read different shards at once (`PretrainingData.scan_part`)."""
        item = self.dtype.itemsize
        size = max(1, BLOCK_BYTES // item)
        header = self.headers[k]
        for start in range(0, header.num_records, size):
            count = min(size, header.num_records - start)
            at = header.offset + start * item
            if self._all is not None:
                data = os.pread(int(self._all[k]), count * item, at)
            else:
                with self._lock:
                    data = self._read(k, count * item, at)
            if len(data) != count * item:
                self._cut_short(np.array([k]))
            yield start, np.frombuffer(data, dtype=self.dtype)

    def _read(self, k: int, size: int, at: int) -> bytes:
        """`size` bytes of shard k from `at`, opening it (and closing the least recently read
        shard) if it is not open. Under the lock: no fd is closed while another thread reads."""
        fd = self._open.pop(k, None)
        if fd is None:
            if len(self._open) >= self.held:
                os.close(self._open.popitem(last=False)[1])
            fd = os.open(self.paths[k], os.O_RDONLY)
        self._open[k] = fd
        return os.pread(fd, size, at)

    def _cut_short(self, shards: np.ndarray) -> None:
        for k in np.unique(shards).tolist():
            header, size = self.headers[k], os.stat(self.paths[k]).st_size
            if size < header.offset + header.num_records * self.dtype.itemsize:
                raise UserError(f"{self.paths[k]}: {size} bytes now, cut short while it was "
                                "being read (rewritten or truncated under a running job?); "
                                "rerun `bertforge data`, or restore the shard.")  # fmt: skip
        raise AssertionError("a short read from shards of the right size")


def _close_all(open_files: OrderedDict[int, int]) -> None:
    while open_files:
        os.close(open_files.popitem()[1])


def allow_open_files(count: int) -> int:
    """How many of `count` files this process may hold open at once, leaving FILES_HEADROOM
    open files for the rest: first its soft limit on open files (`ulimit -n`, 1,024 by
    default on many Linux systems) is raised toward its hard limit to fit them all, as the
    shell's `ulimit -n` would. A 6 GB corpus's 1,500 shards failed with "Too many open files"
    under that default when they were memory-mapped."""
    want = count + FILES_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return count
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    except (ValueError, OSError):  # macOS refuses more than OPEN_MAX (10,240)
        pass
    return min(count, max(soft - FILES_HEADROOM, MIN_HELD))


def segment_ids(records: np.ndarray) -> np.ndarray:
    """[n, seq] segment ids of records (0 for [CLS] A [SEP] and padding, 1 for B [SEP])."""
    seq = records["input_ids"].shape[1]
    pos = np.arange(seq)
    length = records["length"].astype(np.int64)[:, None]
    return ((pos > records["sep_a"].astype(np.int64)[:, None]) & (pos < length)).astype(np.int64)
