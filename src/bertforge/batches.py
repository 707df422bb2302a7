"""Training batches from native shards or TFRecords: split, order, dynamic masks, prefetch.

Everything a step sees is a pure function of (seed, step): the order of the training
instances is a permutation per epoch drawn from (seed, epoch), and a native shard's masks are
drawn for the whole global batch from (seed, step), so a resumed run, a run with another
micro-batch size and a run on several processes all see the same batches and masks. The
held-out split is the last `eval_records` instances (the end of the corpus, whole documents
but one) and is never trained on.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import functools
import hashlib
import itertools
import json
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertforge.datacheck import Batch, data_files, data_vocab, tf_batch_raw, tfrecord_batches
from bertforge.errors import UserError
from bertforge.fileio import write_json
from bertforge.malloc import release_freed_memory
from bertforge.masking import MaskSpec, RowRng, mask_batch
from bertforge.shards import ShardSet, is_shard, segment_ids
from bertforge.tfrecord import FRAMING, read_records
from bertforge.workers import usable_cpus

IGNORE = -100  # label of an unused prediction slot
TF_CHUNK = 4096  # TFRecords decoded at a time: 14 KB each while decoding (56 MB)
TF_HEAP = 1.06  # resident memory per byte of arrays, reading TFRecords (1.04-1.06 measured)
SCAN_VERSION = 1  # of the file `PretrainingData.save_scan` writes
MAX_SCAN_THREADS = 8  # shards a start-up pass reads at once (more buys nothing from one disk)

# a part of the start-up pass: (largest token id, first damaged record as (shard, message))
ScanPart = tuple[int, tuple[int, str] | None]


def scan_threads(processes: int = 1) -> int:
    """Threads for the start-up pass of one of `processes` on this machine: two per usable
    CPU, to keep the disk busy while numpy checks a block (6 GB from this 2-core machine's
    disk, timed by hand: 1 thread 3.6-4.0 s, 2 threads 2.9-3.2 s, 4 threads 2.7 s), at most
    MAX_SCAN_THREADS, shared among the processes."""
    return max(1, min(MAX_SCAN_THREADS, 2 * usable_cpus()) // processes)


@dataclass(frozen=True)
class DataInfo:
    """What the data says about itself (the manifest, or the records of Google's TFRecords)."""

    source: str
    max_seq_length: int
    max_predictions_per_seq: int
    static_masking: bool
    vocab_size: int | None  # None: Google's TFRecords carry no vocabulary facts
    vocab_path: str | None
    vocab_sha256: str | None
    do_lower_case: bool | None
    masked_lm_prob: float | None
    do_whole_word_mask: bool
    num_records: int


@dataclass
class Rows:
    """Instances as numpy arrays; masks are set for static data and after dynamic masking."""

    input_ids: np.ndarray  # [n, S] int64
    lengths: np.ndarray  # [n]
    sep_a: np.ndarray | None  # [n] native shards only (dynamic masking needs it)
    token_type_ids: np.ndarray  # [n, S]
    next_sentence: np.ndarray  # [n]
    positions: np.ndarray | None  # [n, P]
    labels: np.ndarray | None  # [n, P], IGNORE in unused slots


ROW_FIELDS = tuple(Rows.__dataclass_fields__)


class PretrainingData:
    """Every instance of a data directory or of TFRecord files, addressed by a global index.

    Native shards are read by position (`shards.ShardSet`: nothing is loaded or mapped);
    TFRecords are parsed into memory (under torchrun once per machine: `shared_tfrecords`)."""

    def __init__(self, path: str, local: tuple[int, int] | None = None) -> None:
        """`local`: (this process's rank on its machine, the processes there) under torchrun,
        whose processes on a machine decode TFRecords once and share them
        (`shared_tfrecords`)."""
        files, manifest = data_files(path)
        self.files = files
        self.manifest = manifest
        self.native: ShardSet | None = None
        self.tf_rows: Rows | None = None
        self.tf_shared: str | None = None  # a note how the TFRecords were shared, or a warning
        if is_shard(files[0]):
            self.native = ShardSet(files)
            sizes = self.native.sizes.tolist()
            seq = self.native.dtype["input_ids"].shape[0]
            static = "masked_lm_positions" in (self.native.dtype.names or ())
            meta = self.native.headers[-1].meta
            p_max = meta.get("max_predictions_per_seq") if manifest is None else None
        else:
            if local is not None and local[1] > 1:
                loaded, self.tf_sizes, self.tf_shared = shared_tfrecords(files, *local)
            else:
                loaded, self.tf_sizes = load_tfrecords(files)
            if loaded is None:
                raise UserError(f"--data: {path} holds no records.")
            self.tf_rows = loaded
            sizes = [len(self.tf_rows.lengths)]
            seq = self.tf_rows.input_ids.shape[1]
            static = True
            p_max = self.tf_rows.positions.shape[1]
        self.offsets = np.cumsum([0, *sizes])
        n = int(self.offsets[-1])
        if n == 0:
            raise UserError(f"--data: {path} holds no records.")
        if manifest is not None:
            c = manifest["config"]
            self.info = DataInfo(
                source=path,
                max_seq_length=c["max_seq_length"],
                max_predictions_per_seq=c["max_predictions_per_seq"],
                static_masking=manifest["format"]["static_masking"],
                vocab_size=manifest["vocab"]["size"],
                vocab_path=manifest["vocab"]["path"],
                vocab_sha256=manifest["vocab"]["sha256"],
                do_lower_case=c["do_lower_case"],
                masked_lm_prob=c["masked_lm_prob"],
                do_whole_word_mask=c["do_whole_word_mask"],
                num_records=n,
            )
            assert self.info.max_seq_length == seq and self.info.static_masking == static, path
        else:
            self.info = DataInfo(
                path, seq, int(p_max or 0), static, None, None, None, None, None, False, n
            )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def identity(self) -> str:
        """What the records are, wherever they are read from (a resumed run may find its data
        moved): a data directory's shards by name and sha256 (its manifest lists them), files
        given by name or glob by name and size. Nothing is read."""
        if self.manifest is not None:
            key: list[Any] = [[s["file"], s["sha256"]] for s in self.manifest["shards"]]
        else:
            key = [[f.name, f.stat().st_size] for f in self.files]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    def max_token_id(self) -> int:
        """The largest token id of the data (masked-LM labels included)."""
        return self._scan[1]

    def reuse_scan(self, path: Path) -> bool:
        """Take the start-up pass's result (`_scan`) from `path` (`save_scan`) if it was made
        on these shards as they are now, so that a resumed run does not read the whole data
        again (6 GB: 6.9 s from this machine's disk; 100 GB on network storage, minutes).
        Whether it did; an unreadable or stale file is passed over."""
        if self.native is None:
            return False
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved["version"] != SCAN_VERSION or saved["shards"] != self.native.stat_key():
                return False
            self.__dict__["_scan"] = (saved["shards"], int(saved["max_token_id"]), None)
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def save_scan(self, path: Path) -> None:
        """Write the start-up pass's result for `reuse_scan`: only for native shards found
        whole (a damaged record stops the run anyway)."""
        key, top, damaged = self._scan
        if key is not None and damaged is None:
            write_json(path, {"version": SCAN_VERSION, "shards": key, "max_token_id": top})

    def damaged_record(self) -> str | None:
        """The first native record whose fields contradict each other, as "FILE: record N:
        what", or None. Such a record (a damaged shard: bertforge writes none) would train
        silently on garbage, or fail deep in a step with no word of where: a length beyond
        max_seq_length, the first [SEP] outside the instance, a next-sentence label not 0 or
        1, masked positions outside the instance or more of them than max_predictions_per_seq.
        TFRecords (a checksum per record, checked as they are read, but written by other
        tools too): a length below 2, segment ids or a next-sentence label not 0 or 1, a
        masked position outside the instance."""
        return self._scan[2]

    @functools.cached_property
    def _scan(self) -> tuple[list[list[Any]] | None, int, str | None]:
        """(the shards' `stat_key` as they were read, or None for TFRecords; max_token_id;
        damaged_record) from one pass over the data. Native shards are read in threads
        (`scan_part`), from disk where the page cache does not hold them: 6 GB of shards on
        this 2-core machine took 3.2-4.2 s from disk and 0.57-0.67 s from the page cache,
        where one thread took 3.9-6.3 s and 0.78-0.93 s (`bench/data_check.py`). Under
        torchrun the processes share the pass (`train.share_data_check`)."""
        if self.tf_rows is not None:
            t = self.tf_rows
            labels = t.labels.max(initial=0) if t.labels is not None else 0
            top = int(max(t.input_ids.max(initial=0), labels))
            what = _tf_contradiction(t)
            if what is None:
                return None, top, None
            i, text = what
            ends = np.cumsum(self.tf_sizes)
            f = int(np.searchsorted(ends, i, side="right"))
            return None, top, f"{self.files[f]}: record {i - (ends[f] - self.tf_sizes[f])}: {text}"
        assert self.native is not None
        key = self.native.stat_key()  # before the pass: the shards as they were read
        return self._joined(key, [self.scan_part(range(len(self.files)), scan_threads())])

    def scan_part(self, shards: Sequence[int], threads: int) -> ScanPart:
        """The start-up pass over these native shards, `threads` shards read at once
        (`os.pread` and numpy's reductions let go of the GIL): (largest token id, the first
        damaged record as (shard, "FILE: record N: what") or None). A shard cut short is a
        UserError naming it."""
        assert self.native is not None
        native = self.native

        def one(k: int) -> ScanPart:
            top, damaged = 0, None
            for start, block in native.blocks(k):
                for name in ("input_ids", "masked_lm_ids"):
                    if name in (block.dtype.names or ()):
                        top = max(top, int(block[name].max(initial=0)))
                if damaged is None and (what := _contradiction(block)) is not None:
                    damaged = (k, f"{native.paths[k]}: record {start + what[0]}: {what[1]}")
            return top, damaged

        with cf.ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            parts = list(pool.map(one, shards))
        return self._merged(parts)

    @staticmethod
    def _merged(parts: Sequence[ScanPart]) -> ScanPart:
        """Parts of the pass as one: the largest id, and the damaged record of the first shard."""
        damaged = [p[1] for p in parts if p[1] is not None]
        return max((p[0] for p in parts), default=0), min(damaged, default=None)

    def take_scan(self, key: list[list[Any]], parts: Sequence[ScanPart]) -> None:
        """The start-up pass's result from parts read elsewhere (each process of a torchrun
        job reads some of the shards: `train.share_data_check`)."""
        self.__dict__["_scan"] = self._joined(key, parts)

    def _joined(
        self, key: list[list[Any]], parts: Sequence[ScanPart]
    ) -> tuple[list[list[Any]], int, str | None]:
        top, damaged = self._merged(parts)
        return key, top, None if damaged is None else damaged[1]

    def rows(self, index: np.ndarray) -> Rows:
        """The instances at global indices `index`, in that order."""
        if self.tf_rows is not None:
            t = self.tf_rows  # held narrow (`load_tfrecords`); a batch's rows widened
            return Rows(
                t.input_ids[index].astype(np.int64),
                t.lengths[index],
                None,
                t.token_type_ids[index].astype(np.int64),
                t.next_sentence[index],
                t.positions[index].astype(np.int64),
                t.labels[index].astype(np.int64),
            )
        assert self.native is not None
        rec = self.native.records(index)
        lengths = rec["length"].astype(np.int64)
        sep_a = rec["sep_a"].astype(np.int64)
        types = segment_ids(rec)
        positions = labels = None
        if "masked_lm_positions" in (rec.dtype.names or ()):
            positions = rec["masked_lm_positions"].astype(np.int64)
            used = np.arange(positions.shape[1]) < rec["num_masked"].astype(np.int64)[:, None]
            labels = np.where(used, rec["masked_lm_ids"].astype(np.int64), IGNORE)
        return Rows(
            rec["input_ids"].astype(np.int64),
            lengths,
            sep_a,
            types,
            rec["next_sentence_label"].astype(np.int64),
            positions,
            labels,
        )


def load_tfrecords(files: Sequence[Path]) -> tuple[Rows | None, list[int]]:
    """Every record of Google's TFRecord files, in memory (None: none), and each file's
    count. Decoded TF_CHUNK records at a time, each part narrowed at once (`narrow`: token
    ids and positions int32, segment ids int8), then joined field by field, the freed memory
    handed back as it goes: 0.8 KB an instance of 128 tokens where int64 took 2.4 KB, at a
    peak of about 1.6 times what is held (bench/RESULTS.md, session 51)."""
    parts: list[dict[str, np.ndarray]] = []
    sizes = []
    first: dict[str, tuple[int, Path]] = {}  # each width as the first file had it
    for path in files:
        count = 0
        for b in tfrecord_batches(path, chunk=TF_CHUNK):
            count += len(b)
            parts.append(narrowed(b))
            for name, what in (("input_ids", "max_seq_length"),
                               ("positions", "max_predictions_per_seq")):  # fmt: skip
                width = parts[-1][name].shape[1]
                was, where = first.setdefault(name, (width, Path(path)))
                if width != was:
                    raise UserError(
                        f"--data: {where} was made with {what} {was}, {path} with {width}; "
                        f"train on files made with one {what}."
                    )
        sizes.append(count)
    if not parts:
        return None, sizes
    release_freed_memory()  # the decoding's
    joined = {}
    for name in list(parts[0]):  # each part's arrays let go as their field is joined
        joined[name] = np.concatenate([part.pop(name) for part in parts])
        release_freed_memory()
    return Rows(sep_a=None, **joined), sizes


SHARE_POLL = 0.2  # seconds between looks for what another process of the machine wrote


def shared_tfrecords(
    files: Sequence[Path], local_rank: int, local_world: int
) -> tuple[Rows | None, list[int], str | None]:
    """`load_tfrecords` for the `local_world` processes torchrun starts on one machine,
    which each held a whole copy (8 GPUs: 8 times the memory). Local process 0 decodes the
    files and writes the arrays into a folder of the temporary directory (TMPDIR, else
    /tmp); the others wait for it by looking for the folder (no collective: a long decode
    does not meet a collective's timeout), and all map the arrays read-only, so the machine
    holds one copy, in its page cache. Once every process has mapped them, process 0
    deletes the folder (the mappings stay), so a crash later on leaves nothing on disk.
    Where the arrays cannot be written (the temporary directory is full), each process
    decodes its own copy, as before. The folder is named by the files and by the torchrun
    agent that started this machine's processes (their parent, and its restarts), so
    another run never reads it. Also returns how they were shared, as a note, or why not,
    as a warning."""
    key: list[Any] = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # the agent restarts them
    key += [socket.gethostname(), os.getppid(), restarts]
    name = "bertforge-tfrecords-" + hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / name
    failed = folder.with_name(name + ".failed")  # process 0 did not write them
    if local_rank == 0:
        rows, sizes = load_tfrecords(files)
        why = "no records" if rows is None else None
        if rows is not None:
            try:
                size = write_arrays(rows, sizes, folder)
            except OSError as e:
                why = f"{folder.parent}: {e.strerror or e}"
        if why is not None:  # each process decodes its own copy (or finds none)
            failed.touch()  # an empty file: a full disk still takes it
            seen = [failed.with_name(f"{failed.name}-{rank}") for rank in range(1, local_world)]
            wait_for(seen)
            for path in [failed, *seen]:
                path.unlink(missing_ok=True)
            unshared = (
                "bertforge: warning: the TFRecords' arrays could not be written for the "
                f"{local_world} processes on this machine to share ({why}), so each holds its "
                "own copy; set TMPDIR to a directory with room for them."
            )
            return rows, sizes, None if rows is None else unshared
        del rows
        release_freed_memory()
        try:
            mapped, sizes = map_arrays(folder)
            wait_for([folder / f"mapped-{rank}" for rank in range(1, local_world)])
        finally:  # stopped while waiting (another process failed): nothing left behind either
            shutil.rmtree(folder, ignore_errors=True)  # the mappings stay
        note = (
            "train: the TFRecords were decoded once on this machine and are shared by its "
            f"{local_world} processes through {folder.parent} ({size / 1e6:,.0f} MB, deleted "
            "once mapped)"
        )
        return mapped, sizes, note
    while not (folder / "sizes.json").exists():
        if failed.exists():
            failed.with_name(f"{failed.name}-{local_rank}").touch()
            rows, sizes = load_tfrecords(files)
            return rows, sizes, None
        time.sleep(SHARE_POLL)
    mapped, sizes = map_arrays(folder)
    (folder / f"mapped-{local_rank}").touch()
    return mapped, sizes, None


def wait_for(paths: Sequence[Path]) -> None:
    """Until every one of `paths` exists (what the other processes of the machine write)."""
    for path in paths:
        while not path.exists():
            time.sleep(SHARE_POLL)


def write_arrays(rows: Rows, sizes: list[int], folder: Path) -> int:
    """Rows' fields as .npy files in `folder`, made whole under another name and renamed
    (the others take the folder as ready once it exists); the bytes written."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(mode=0o700)  # the temporary directory is everyone's: this user's only
    try:
        size = 0
        for name in ROW_FIELDS:
            if (a := getattr(rows, name)) is not None:
                np.save(partial / f"{name}.npy", a)
                size += a.nbytes
        write_json(partial / "sizes.json", sizes)
        os.rename(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return size


def map_arrays(folder: Path) -> tuple[Rows, list[int]]:
    """The Rows `write_arrays` wrote, mapped read-only, and the files' record counts."""
    if folder.stat().st_uid != os.getuid():
        raise UserError(
            f"{folder} belongs to another user; TFRecords are shared between the processes of "
            "a machine through it: delete it, or set TMPDIR to a directory of your own."
        )
    fields = {f.stem: np.load(f, mmap_mode="r") for f in folder.glob("*.npy")}
    sizes = json.loads((folder / "sizes.json").read_text(encoding="utf-8"))
    return Rows(**{name: fields.get(name) for name in ROW_FIELDS}), sizes


def narrowed(b: Batch) -> dict[str, np.ndarray]:
    """Decoded TFRecords as `load_tfrecords` holds them: Rows' fields, narrowed."""
    assert b.positions is not None and b.labels is not None and b.counts is not None
    used = np.arange(b.labels.shape[1]) < b.counts[:, None]
    return {
        "input_ids": narrow(b.input_ids, np.int32),
        "lengths": b.lengths,
        "token_type_ids": narrow(b.segment_ids, np.int8),
        "next_sentence": b.next_sentence,
        "positions": narrow(b.positions, np.int32),
        "labels": narrow(np.where(used, b.labels, IGNORE), np.int32),
    }


def tfrecord_peak(files: Sequence[Path]) -> int:
    """The bytes `load_tfrecords` will take at its peak for these files: what it holds and,
    as it joins the fields one by one, the widest field again, and malloc's pages beside
    them (TF_HEAP; 1.68 times the files' size at length 128 with a 30,522-token vocabulary,
    bench/RESULTS.md session 52). Told from the first TF_CHUNK records of the first file
    that has any, as the files' bytes a record vary with the token ids (a varint: ids under
    128 take one byte, under 16,384 two) and with the length."""
    for path in files:  # the first that holds a record
        with open(path, "rb") as f:
            if raw := list(itertools.islice(read_records(f, str(path)), TF_CHUNK)):
                break
    else:
        return 0
    taken = sum(FRAMING + len(r) for r in raw)  # the sample's bytes of file
    fields = [a.nbytes for a in narrowed(tf_batch_raw(raw, path)).values()]
    per_byte = TF_HEAP * (sum(fields) + max(fields)) / taken
    return int(per_byte * sum(f.stat().st_size for f in files))


def narrow(a: np.ndarray, dtype: type) -> np.ndarray:
    """`a` as `dtype` where every value fits in it, else as it is (a damaged record's wild
    value is kept to be named by the start-up check, not wrapped)."""
    info = np.iinfo(dtype)
    if a.size and (a.min() < info.min or a.max() > info.max):
        return a
    return a.astype(dtype)


def _contradiction(rec: np.ndarray) -> tuple[int, str] | None:
    """(index, what) of the first of these native records whose fields contradict each other.
    The fields are compared in their stored widths (uint16): a pass costs about a fifth of
    reading the token ids."""
    seq = rec["input_ids"].shape[1]
    length, sep_a, label = rec["length"], rec["sep_a"], rec["next_sentence_label"]
    checks: list[tuple[np.ndarray, str, Any]] = [
        (length > seq, "length {}, beyond max_seq_length " + str(seq), length),
        (length < 2, "length {}, shorter than [CLS] [SEP]", length),
        ((sep_a < 1) | (sep_a >= length), "its first [SEP] at {}, outside the instance", sep_a),
        (label > 1, "next-sentence label {}, not 0 or 1", label),
    ]
    if "masked_lm_positions" in (rec.dtype.names or ()):
        count, pos = rec["num_masked"], rec["masked_lm_positions"]
        cap = pos.shape[1]
        outside = (np.arange(cap) < count[:, None]) & (pos >= length[:, None])
        checks += [
            (count > cap, "{} masked positions, beyond the " + str(cap) + " slots", count),
            (outside.any(axis=1), "masked positions {} outside the instance", (outside, pos)),
        ]
    return _first_contradiction(checks)


def _tf_contradiction(rows: Rows) -> tuple[int, str] | None:
    """(index, what) of the first row read from TFRecords that would fail a step or train on
    what is not there: `_contradiction`'s checks for the fields Google's records hold."""
    assert rows.positions is not None and rows.labels is not None
    length, types, label = rows.lengths, rows.token_type_ids, rows.next_sentence
    pos = rows.positions
    not_01 = (types < 0) | (types > 1)
    outside = (rows.labels != IGNORE) & ((pos < 0) | (pos >= length[:, None]))
    return _first_contradiction([
        (length < 2, "length {}, shorter than [CLS] [SEP]", length),
        (not_01.any(axis=1), "segment ids {}, not 0 or 1", (not_01, types)),
        ((label < 0) | (label > 1), "next-sentence label {}, not 0 or 1", label),
        (outside.any(axis=1), "masked positions {} outside the instance", (outside, pos)),
    ])  # fmt: skip


def _first_contradiction(checks: list[tuple[np.ndarray, str, Any]]) -> tuple[int, str] | None:
    """Of (rows failing a check, what it says, the field), the first failing row and the
    first check it fails, the field's value filled in: a row's value, or for (where, values)
    the row's values where it fails."""
    bad = np.logical_or.reduce([failing for failing, _, _ in checks])
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    text, value = next((text, value) for failing, text, value in checks if failing[i])
    if isinstance(value, tuple):
        where, values = value
        return i, text.format(sorted(set(values[i][where[i]].tolist())))
    return i, text.format(int(value[i]))


def apply_mask(rows: Rows, spec: MaskSpec | None, rng: np.random.Generator | RowRng) -> Rows:
    """Rows with masks: static rows as stored, others masked afresh with rng."""
    if rows.positions is not None:
        return rows
    assert spec is not None and rows.sep_a is not None, "dynamic masking needs a MaskSpec"
    m = mask_batch(rows.input_ids, rows.lengths, rows.sep_a, spec, rng)
    used = np.arange(m.positions.shape[1]) < m.counts[:, None]
    return Rows(
        m.input_ids,
        rows.lengths,
        rows.sep_a,
        rows.token_type_ids,
        rows.next_sentence,
        m.positions,
        np.where(used, m.labels.astype(np.int64), IGNORE),
    )


@dataclass(frozen=True)
class Split:
    """Training and held-out index ranges: [0, num_train) and [num_train, total)."""

    num_train: int
    total: int

    @classmethod
    def of(cls, total: int, eval_records: int) -> Split:
        return cls(total - eval_records, total)


class Order:
    """Which training instances step `step` uses: permutation per epoch from (seed, epoch).

    A permutation is held as int32 below 2**31 instances: the same shuffle as numpy's int64
    `permutation(n)` (the draws do not depend on the array's type) in half the memory, which
    grows with the corpus (22 million instances of a 6 GB corpus: 88 MB an epoch, not 176)."""

    def __init__(self, num_train: int, seed: int) -> None:
        self.num_train = num_train
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            rng = np.random.default_rng([self.seed, 0, epoch])
            dtype = np.int32 if self.num_train < 2**31 else np.int64
            order = np.arange(self.num_train, dtype=dtype)
            rng.shuffle(order)
            self._cache[epoch] = order
        return self._cache[epoch]

    def indices(self, step: int, batch: int) -> np.ndarray:
        pos = step * batch + np.arange(batch, dtype=np.int64)
        epoch, within = np.divmod(pos, self.num_train)
        out = np.empty(batch, dtype=np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self.permutation(int(e))[within[sel]]
        return out


def step_rows(
    data: PretrainingData,
    order: Order,
    spec: MaskSpec | None,
    seed: int,
    step: int,
    batch: int,
    part: tuple[int, int] | None = None,
) -> Rows:
    """Rows [lo, hi) (`part`; default all) of the global batch of a training step, masked.

    A row's instance and masks depend only on (seed, step, its place in the batch), so each
    process reads and masks only its share, and the shares put together are the batch one
    process would train on (the same on every rank, every run and any number of processes)."""
    lo, hi = part or (0, batch)
    rows = data.rows(order.indices(step, batch)[lo:hi])
    return apply_mask(rows, spec, RowRng([seed, 1, step], lo, hi))


def eval_rows(
    data: PretrainingData, split: Split, spec: MaskSpec | None, seed: int, chunk: int, batch: int
) -> Rows:
    """The `chunk`-th batch of the held-out split, with fixed masks."""
    start = split.num_train + chunk * batch
    index = np.arange(start, min(start + batch, split.total), dtype=np.int64)
    return apply_mask(data.rows(index), spec, np.random.default_rng([seed, 2, chunk]))


def to_tensors(
    rows: Rows, device: torch.device, trim: bool = True, packed: bool = False, bucket: int = 0
) -> dict[str, torch.Tensor]:
    """Torch tensors of rows, padded [B, S] or packed.

    Padded: columns beyond the longest instance are cut (exact: padded keys are masked out
    anyway) to a multiple of 8 unless trim is False. Packed: input_ids, token_type_ids and
    position_ids hold the real tokens of all instances back to back, [T], and cu_seqlens
    [B+1] (int32) where each instance starts; built here on the host, so the model never
    looks for padding on the device. A packed batch with `bucket` (a multiple of S) has its
    token count rounded up to a multiple of it by filler sequences after the instances (see
    `filler_lengths`), so that steps take a few shapes only (one CUDA graph each)."""
    seq = rows.input_ids.shape[1]
    if trim and len(rows.lengths):
        seq = min(seq, int(-(-int(rows.lengths.max()) // 8) * 8))
    arrays = {
        "input_ids": rows.input_ids[:, :seq],
        "token_type_ids": rows.token_type_ids[:, :seq],
        "lengths": rows.lengths,
        "positions": rows.positions,
        "labels": rows.labels,
        "next_sentence": rows.next_sentence,
    }
    lengths = rows.lengths
    if packed:
        real = np.arange(seq)[None, :] < rows.lengths[:, None]
        arrays["input_ids"] = arrays["input_ids"][real]
        arrays["token_type_ids"] = arrays["token_type_ids"][real]
        arrays["position_ids"] = np.broadcast_to(np.arange(seq), real.shape)[real]
        if bucket:
            filler = filler_lengths(int(rows.lengths.sum()), bucket, rows.input_ids.shape[1])
            lengths = np.concatenate([rows.lengths, filler])
            zeros = np.zeros(int(filler.sum()), dtype=np.int64)
            arrays["input_ids"] = np.concatenate([arrays["input_ids"], zeros])
            arrays["token_type_ids"] = np.concatenate([arrays["token_type_ids"], zeros])
            within = np.arange(len(zeros)) - np.repeat(np.cumsum(filler) - filler, filler)
            arrays["position_ids"] = np.concatenate([arrays["position_ids"], within])
    pin = device.type == "cuda"

    def move(a: np.ndarray, dtype: type) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))
        return (t.pin_memory() if pin else t).to(device, non_blocking=True)

    out = {name: move(a, np.int64) for name, a in arrays.items()}
    if packed:
        out["cu_seqlens"] = move(np.concatenate([[0], np.cumsum(lengths)]), np.int32)
    return out


def filler_lengths(tokens: int, bucket: int, seq: int) -> np.ndarray:
    """Lengths of the filler sequences that round a packed batch of `tokens` up to a multiple
    of `bucket` (a multiple of seq): always bucket // seq + 1 of them, each 1 to seq tokens
    long (an empty or over-long sequence would leave attention outputs unwritten), so a
    batch's cu_seqlens keeps one shape."""
    assert bucket % seq == 0 and bucket // seq <= seq, (bucket, seq)
    count = bucket // seq + 1
    total = -(-(tokens + count) // bucket) * bucket - tokens  # count to count + bucket - 1
    return total // count + (np.arange(count) < total % count)


def slice_rows(rows: Rows, start: int, stop: int) -> Rows:
    return Rows(
        *(
            None if (v := getattr(rows, f)) is None else v[start:stop]
            for f in Rows.__dataclass_fields__
        )
    )


class Prefetcher:
    """Prepares the numpy batches of upcoming steps in a background thread.

    numpy releases the GIL for the heavy parts (gather, sort, masking), so one thread keeps
    several steps ahead of the GPU; `depth` bounds the memory held."""

    def __init__(self, make: Any, start: int, stop: int, depth: int = 3) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, start, stop), daemon=True)
        self._thread.start()

    def _run(self, make: Any, start: int, stop: int) -> None:
        try:
            for step in range(start, stop):
                if not self._put((step, make(step))):
                    return
            self._put((None, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._put((None, e))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[int, Rows]]:
        while True:
            step, item = self._queue.get()
            if step is None:
                if item is None:
                    return
                raise item
            yield step, item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# Workers not closed yet: killed at exit, where multiprocessing would otherwise wait for them
# (it sends its daemons SIGTERM, which they ignore, and joins them)
_LIVE_WORKERS: set[Any] = set()


def _kill_live_workers() -> None:
    for worker in list(_LIVE_WORKERS):
        if worker.is_alive():
            worker.kill()


class ProcessPrefetcher:
    """Prefetcher's interface, the batches made in a forked worker process instead of a thread.

    A thread shares the trainer's GIL: on a GPU the main thread's Python (launching kernels,
    autograd, the optimizer) is the slower side of a step, and each time it lets go of the GIL
    the loader thread can take it and hold the main thread up (`bench/loader_contention.py`:
    a host-bound step 2.4 ms slower while a thread made BERT-base's batches, 0.65 ms while
    this worker did, on 2 cores). The worker writes each batch into a ring of `depth` slots
    of shared memory; the main thread reads it in place and gives the slot back when it asks
    for the next batch, so a batch must not be used after that (the trainer's steps copy
    theirs to the device, or finish with it, first).
    Nothing runs before the first batch is asked for; that one is made here, in the parent,
    and fixes the slots' layout.

    fork: the worker inherits `make` and the data it reads (open shards, parsed
    TFRecords) without pickling, as torch's DataLoader workers do; it touches no GPU. It
    ignores Ctrl-C and SIGTERM (the trainer decides when to stop; `close` kills it) and dies
    with its parent (workers.py); an error in it is raised here."""

    def __init__(self, make: Any, start: int, stop: int, depth: int = 3) -> None:
        self._make, self._start, self._stop, self._depth = make, start, stop, depth
        self._worker: Any = None  # started by the first batch asked for, as the thread is

    def _begin(self) -> Rows:
        """The first batch, made here; then the slots it lays out and the worker for the rest."""
        import mmap
        import multiprocessing

        first = self._make(self._start)
        self._layout: list[tuple[str, int, tuple[int, ...], np.dtype] | None] = []
        size = 0
        for name in ROW_FIELDS:
            a = getattr(first, name)
            if a is None:
                self._layout.append(None)
                continue
            self._layout.append((name, size, a.shape, a.dtype))
            size += -(-a.nbytes // 64) * 64
        self._slot = max(size, 64)
        self._ring = mmap.mmap(-1, self._depth * self._slot)  # shared with the forked worker
        ctx = multiprocessing.get_context("fork")
        self._free_r, self._free_w = ctx.Pipe(duplex=False)
        self._ready_r, self._ready_w = ctx.Pipe(duplex=False)
        args = (self._make, self._start + 1, self._stop, os.getpid())
        self._worker = ctx.Process(target=self._fill, args=args, daemon=True)
        # The worker starts with Ctrl-C and SIGTERM blocked, until it has set them aside: one
        # sent to the process group as it starts would otherwise end it (here they wait the
        # few lines to this process's own handlers).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._worker.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if not _LIVE_WORKERS:  # registered after multiprocessing's own exit hook: runs first
            atexit.unregister(_kill_live_workers)
            atexit.register(_kill_live_workers)
        _LIVE_WORKERS.add(self._worker)
        self._ready_w.close()  # the worker's end
        self._free_r.close()
        for slot in range(self._depth):
            self._free_w.send(slot)
        return first

    def _views(self, slot: int) -> dict[str, np.ndarray]:
        base = slot * self._slot
        return {
            name: np.ndarray(shape, dtype, buffer=self._ring, offset=base + offset)
            for name, offset, shape, dtype in filter(None, self._layout)
        }

    def _fill(self, make: Any, start: int, stop: int, parent: int) -> None:
        from bertforge import workers

        workers.ignore_ctrl_c()
        # SIGTERM too (a batch system's stop reaches the whole process group): the trainer
        # finishes its step and saves, and with several processes it may need a few more
        # batches before they agree to stop; close() kills the worker, the kernel does if the
        # trainer dies first
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # pending ones: ignored
        workers.die_with_parent(parent)
        self._ready_r.close()
        self._free_w.close()
        try:
            for step in range(start, stop):
                slot = self._free_r.recv()
                rows = make(step)
                views = self._views(slot)
                for name, spec in zip(ROW_FIELDS, self._layout, strict=True):
                    a = getattr(rows, name)
                    if (a is None) != (spec is None) or (a is not None and a.shape != spec[2]):
                        raise RuntimeError(f"batch of step {step}: {name} changed shape")
                    if a is not None:
                        views[name][...] = a
                self._ready_w.send((step, slot))
            self._ready_w.send((None, None))
        except EOFError:  # the parent closed its end: stopping
            pass
        except BaseException as e:
            try:
                self._ready_w.send((None, e))
            except Exception:  # an exception that does not pickle
                self._ready_w.send((None, RuntimeError(f"{type(e).__name__}: {e}")))
        finally:
            os._exit(0)

    def __iter__(self) -> Iterator[tuple[int, Rows]]:
        if self._start >= self._stop:
            return
        yield self._start, self._begin()
        while True:
            try:
                step, item = self._ready_r.recv()
            except EOFError:
                raise RuntimeError("the batch loader's worker process died") from None
            if step is None:
                if item is None:
                    return
                raise item
            views = self._views(item)
            yield step, Rows(**{name: views.get(name) for name in ROW_FIELDS})
            with contextlib.suppress(BrokenPipeError):  # the worker may have made its last
                self._free_w.send(item)  # asked for the next batch: done with this one

    def close(self) -> None:
        if self._worker is None:
            return
        if self._worker.is_alive():
            self._worker.kill()
        self._worker.join(timeout=5)
        _LIVE_WORKERS.discard(self._worker)
        for end in (self._free_w, self._ready_r):
            end.close()


def prefetcher(make: Any, start: int, stop: int, process: bool = True) -> Any:
    """The batches of steps start..stop-1 made ahead: in a worker process where fork is
    (Linux), else (or with process False) in a thread."""
    if process and sys.platform.startswith("linux"):
        return ProcessPrefetcher(make, start, stop)
    return Prefetcher(make, start, stop)


def vocab_dir(info: DataInfo, given: str | None) -> Path | None:
    """The vocabulary directory or vocab.txt to use: --vocab, else the data's own."""
    if given:
        return Path(given)
    if info.vocab_path is None:
        return None
    folder, recorded = Path(info.source), Path(info.vocab_path)
    if folder.is_dir():  # a data directory: the copy it keeps, if the named one is gone
        found = data_vocab(folder, {"vocab": {"path": info.vocab_path,
                                              "sha256": info.vocab_sha256}})  # fmt: skip
        return recorded.parent if found == recorded else found
    return recorded.parent
