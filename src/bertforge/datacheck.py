"""`bertforge data verify`, `inspect` and `convert`, and reading instances back.

Instances are read into one common form (`Batch`) from native shards and from TFRecords
(Google's or ours), so inspection, statistics and tests treat both formats alike. `convert`
turns Google's TFRecords into native shards, streaming: train reads native shards as it goes
but parses TFRecords into memory (about 2.5 KB per instance of length 128), which does not
scale to the TFRecords of a large corpus.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import glob
import itertools
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from bertforge.errors import UserError
from bertforge.fileio import (
    MANIFEST,
    RUN_STATE,
    atomic_open,
    output_lock,
    prepare_output_dir,
    read_manifest,
    sha256_file,
    write_manifest,
)
from bertforge.shards import (
    VERSION,
    encode_header,
    is_shard,
    open_shard,
    read_header,
    record_dtype,
    segment_ids,
)
from bertforge.tfrecord import decode_example, example_lists, read_records, varint_values
from bertforge.tokenization import copy_vocab, find_vocab_file, load_vocab, read_vocab_file
from bertforge.workers import finished, process_pool, usable_cpus


@dataclass
class Batch:
    """Instances in a common form; masks are None for dynamically masked native shards."""

    input_ids: np.ndarray  # [n, seq]
    lengths: np.ndarray  # [n]
    segment_ids: np.ndarray  # [n, seq]
    next_sentence: np.ndarray  # [n] 1 = random next
    positions: np.ndarray | None  # [n, p]
    labels: np.ndarray | None  # [n, p]
    counts: np.ndarray | None  # [n] masked tokens

    def __len__(self) -> int:
        return len(self.lengths)


def concat(batches: Sequence[Batch]) -> Batch:
    def cat(name: str) -> Any:
        values = [getattr(b, name) for b in batches]
        return None if any(v is None for v in values) else np.concatenate(values)

    names = ("input_ids", "lengths", "segment_ids", "next_sentence", "positions", "labels")
    return Batch(*(cat(n) for n in names), cat("counts"))


def read_native(path: str | Path, limit: int | None = None) -> Batch:
    _, rec = open_shard(path)
    rec = rec[:limit]
    static = "masked_lm_positions" in (rec.dtype.names or ())
    return Batch(
        np.asarray(rec["input_ids"], dtype=np.int64),
        np.asarray(rec["length"], dtype=np.int64),
        segment_ids(rec),
        np.asarray(rec["next_sentence_label"], dtype=np.int64),
        np.asarray(rec["masked_lm_positions"], dtype=np.int64) if static else None,
        np.asarray(rec["masked_lm_ids"], dtype=np.int64) if static else None,
        np.asarray(rec["num_masked"], dtype=np.int64) if static else None,
    )


def read_tfrecord(path: str | Path, limit: int | None = None) -> Batch:
    """Parse BERT pretraining records (Google's feature spec)."""
    batches = list(tfrecord_batches(path, limit=limit))
    if not batches:
        empty = np.zeros((0, 0), np.int64)
        return Batch(empty, np.zeros(0, np.int64), empty, np.zeros(0, np.int64), None, None, None)
    return concat(batches)


def tfrecord_batches(
    path: str | Path, chunk: int = 1 << 14, limit: int | None = None
) -> Iterator[Batch]:
    """The records of a TFRecord file, `chunk` at a time (memory stays bounded)."""
    raw: list[bytes] = []
    first = 0
    with open(path, "rb") as f:
        for i, record in enumerate(read_records(f, str(path))):
            if limit is not None and i >= limit:
                break
            raw.append(record)
            if len(raw) == chunk:
                yield tf_batch_raw(raw, path, first)
                raw, first = [], first + len(raw)
    if raw:
        yield tf_batch_raw(raw, path, first)


def tf_batch_raw(raw: list[bytes], path: str | Path, first: int = 0) -> Batch:
    """Batch of raw BERT records, each feature's values decoded for all records at once (the
    per-value Python loop of decode_example was the cost); falls back to it for records whose
    lists are not packed or hold varints of 9 bytes or more."""
    lists = [example_lists(r) for r in raw]
    if any(x is None for x in lists):
        return _tf_batch([decode_example(r) for r in raw], path)
    need = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
            "masked_lm_weights", "next_sentence_labels")  # fmt: skip
    missing = [n for n in need if n not in lists[0]]  # type: ignore[operator]
    if missing:
        raise UserError(f"{path}: not BERT pretraining data (no {', '.join(sorted(missing))}).")

    def column(name: str) -> np.ndarray:
        parts = [x.get(name, b"") for x in lists]  # type: ignore[union-attr]
        data = b"".join(parts)
        if name == "masked_lm_weights":
            values = np.frombuffer(data, dtype="<f4")
            counts = np.array([len(p) // 4 for p in parts])
        else:
            try:
                values, ends = varint_values(data)
            except ValueError:
                return np.array([decode_example(r)[name] for r in raw], dtype=np.int64)
            bounds = np.cumsum([len(p) for p in parts])
            counts = np.diff(np.searchsorted(ends, bounds, side="left"), prepend=0)
        if len(counts) and (counts != counts[0]).any():
            i = int(np.flatnonzero(counts != counts[0])[0])
            raise UserError(
                f"{path}, record {first + i}: {name} has {counts[i]} values, record {first} "
                f"{counts[0]}; not BERT pretraining data of one length."
            )
        return values.reshape(len(raw), -1)

    ids, weights = column("input_ids"), column("masked_lm_weights")
    return Batch(ids, column("input_mask").sum(1), column("segment_ids"),
                 column("next_sentence_labels")[:, 0], column("masked_lm_positions"),
                 column("masked_lm_ids"), (weights > 0).sum(1))  # fmt: skip


def _tf_batch(rows: list[dict[str, list]], path: str | Path) -> Batch:
    missing = {"input_ids", "input_mask", "segment_ids", "next_sentence_labels"} - set(rows[0])
    if missing:
        raise UserError(f"{path}: not BERT pretraining data (no {', '.join(sorted(missing))}).")

    def arr(name: str) -> np.ndarray:
        return np.array([r[name] for r in rows], dtype=np.int64)

    weights = np.array([r["masked_lm_weights"] for r in rows])
    return Batch(arr("input_ids"), arr("input_mask").sum(1), arr("segment_ids"),
                 arr("next_sentence_labels")[:, 0], arr("masked_lm_positions"),
                 arr("masked_lm_ids"), (weights > 0).sum(1))  # fmt: skip


def data_files(path: str) -> tuple[list[Path], dict[str, Any] | None]:
    """The files of a data directory (from its manifest), or TFRecord files / globs / lists."""
    p = Path(path)
    if p.is_dir():
        manifest = read_manifest(p, "data")
        if manifest is None:
            raise UserError(no_manifest(p))
        return [p / s["file"] for s in manifest["shards"]], manifest
    files: list[Path] = []
    for part in path.split(","):
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matches:
            raise UserError(f"{part} matches no file" + (f" (in {path})." if part != path else "."))
        files += [Path(m) for m in matches]
    if folder := next((f for f in files if f.is_dir()), None):
        raise UserError(
            f"{path}: {folder} is a directory, which is read alone (a `bertforge data` output: "
            "one at a time); give one data directory, or TFRecord files."
        )
    missing = [str(f) for f in files if not f.is_file()]
    if missing == [path]:
        raise UserError(f"{path} does not exist (give a `bertforge data` directory, or TFRecord "
                        "files).")  # fmt: skip
    if not files or missing:
        raise UserError(f"{path}: no such data file(s): {', '.join(missing) or path}.")
    return files, None


def data_vocab(folder: Path, manifest: Mapping[str, Any]) -> Path:
    """The vocab.txt a data directory's manifest names or, where that is gone or changed (the
    data moved to another machine, was made from a relative path in another directory, or the
    vocabulary was trained again in place), the copy the directory keeps beside its records
    (`tokenization.copy_vocab`; data made before it kept one has none). Whichever is read,
    its sha256 must be the manifest's (checked by the reader, who says so otherwise)."""
    recorded, sha256 = Path(manifest["vocab"]["path"]), manifest["vocab"].get("sha256")
    own = folder / recorded.name  # vocab.txt, or the tokenizer.json it was read from
    if recorded.is_file() and (sha256 is None or sha256_file(recorded) == sha256):
        return recorded
    return own if own.is_file() and sha256_file(own) == sha256 else recorded


def folder_manifest(files: Sequence[Path]) -> tuple[Path, dict[str, Any]] | None:
    """The `bertforge data` output that holds every one of `files` (data given by name or
    glob, as Google's TFRecords are): its folder and manifest, or None."""
    folders = {Path(f).parent for f in files}
    if len(folders) != 1:
        return None
    folder = folders.pop()
    try:
        manifest = read_manifest(folder, "data")
    except UserError:  # another stage's output, or a damaged manifest: not this one's
        return None
    return None if manifest is None else (folder, manifest)


def check_recorded_vocab(files: Sequence[Path], vocab_file: Path, sha256: str) -> None:
    """Records hold token ids only: read with another vocabulary they are other words, and
    nothing in them tells. Files given by name or glob from a `bertforge data` output are
    checked against the vocabulary its manifest names (a directory is checked as it is read)."""
    found = folder_manifest(files)
    if found is None:
        return
    folder, manifest = found
    made = manifest.get("vocab") or {}
    if made.get("sha256") not in (None, sha256):
        raise UserError(
            f"--vocab: {vocab_file} is not the vocabulary the records in {folder} were made "
            f"with: its manifest.json names {made.get('path')}; give that one (the records "
            "hold token ids, which another vocabulary reads as other words)."
        )


def no_manifest(folder: Path) -> str:
    """What a directory without a data manifest is, and what to do: an unfinished `bertforge
    data` output (its .parts/ folder, or native shards), files of another tool (Google's
    TFRecords most likely, which are given by name or glob: no manifest lists them), folders
    alone, or nothing."""
    entries = [e for e in folder.iterdir() if e.name[:1] != "."]
    files = sorted(e for e in entries if e.is_file())
    if (folder / RUN_STATE).is_file() and (folder / "data" / MANIFEST).is_file():
        return (f"{folder} is a `bertforge run` directory; its pretraining data is "
                f"{folder / 'data'}: give that.")  # fmt: skip
    if (folder / ".parts").is_dir() or (files and is_shard(files[0])):
        return (f"{folder}: no manifest.json, so not a finished `bertforge data` output (rerun "
                "the same data command to finish it).")  # fmt: skip
    if not entries:
        return f"{folder}: an empty directory, not the output of `bertforge data`."
    if not files:
        return (f"{folder}: no manifest.json, so not a `bertforge data` output (it holds "
                "folders only; give the data directory itself).")  # fmt: skip
    suffixes = {f.suffix for f in files}
    pattern = folder / f"*{suffixes.pop()}" if len(suffixes) == 1 else folder / "*"
    return (
        f"{folder}: no manifest.json, so not a `bertforge data` output; give TFRecord "
        f"files (Google's create_pretraining_data.py) by name or glob: '{pattern}'."
    )


def read_any(path: Path, limit: int | None = None) -> Batch:
    return read_native(path, limit) if is_shard(path) else read_tfrecord(path, limit)


def verify(directory: str) -> dict[str, Any]:
    """Check every shard of a data directory against its manifest; raise on any mismatch.
    Shards are hashed in threads, one per usable CPU (hashlib lets go of the GIL while it
    hashes): a 6 GB corpus's 5.8 GB of shards in 2.2 s on 2 cores, 5.5-5.8 s in one thread
    (page cache warm)."""
    files, manifest = data_files(directory)
    if manifest is None:
        raise UserError(f"{directory}: verify takes a `bertforge data` output directory.")
    with cf.ThreadPoolExecutor(max_workers=usable_cpus()) as pool:
        found = pool.map(shard_problem, files, manifest["shards"])
        problems = [problem for problem in found if problem is not None]
    if problems:
        raise UserError(
            f"{directory}: {len(problems)} of {len(files)} shard(s) fail verification: "
            + "; ".join(problems[:5])
            + ("; ..." if len(problems) > 5 else "")
            + ". Recreate the data (bertforge data ... --overwrite)."
        )
    return {"shards": len(files), "records": sum(s["records"] for s in manifest["shards"])}


def shard_problem(path: Path, shard: Mapping[str, Any]) -> str | None:
    """What is wrong with one shard against its manifest entry, or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    if path.stat().st_size != shard["bytes"]:
        return f"{path.name} has {path.stat().st_size} bytes, the manifest {shard['bytes']}"
    if sha256_file(path) != shard["sha256"]:
        return f"{path.name} does not match its sha256 (changed or damaged)"
    if path.suffix == ".bin":
        found = read_header(path).num_records
    else:
        with open(path, "rb") as f:
            found = sum(1 for _ in read_records(f, str(path)))
    if found != shard["records"]:
        return f"{path.name} holds {found} records, the manifest {shard['records']}"
    return None


def summarize(instances: int, tokens: int, random_next: int, masked: int | None,
              histogram: Sequence[int], seq: int) -> dict[str, Any]:  # fmt: skip
    """Instance statistics from totals (the manifest's counts and `inspect` share them);
    masked is None for dynamically masked data."""
    out: dict[str, Any] = {
        "instances": instances,
        "mean_length": round(tokens / instances, 3),
        "padding_share": round(1 - tokens / (instances * seq), 6),
        "random_next_share": round(random_next / instances, 6),
        "masked_share": None if masked is None else round(masked / (tokens - 3 * instances), 6),
        "mean_masked": None if masked is None else round(masked / instances, 3),
        "length_histogram": [int(x) for x in histogram],
    }
    return out


def statistics(batch: Batch, seq: int) -> dict[str, Any]:
    masked = None if batch.counts is None else int(batch.counts.sum())
    return summarize(len(batch), int(batch.lengths.sum()), int(batch.next_sentence.sum()),
                     masked, np.bincount(batch.lengths, minlength=seq + 1), seq)  # fmt: skip


def inspect(path: str, n: int = 5, vocab: str | None = None, max_records: int = 100_000,
            file: TextIO | None = None) -> dict[str, Any]:  # fmt: skip
    """Print n instances as tokens (Google's log format), then statistics; returns them."""
    files, manifest = data_files(path)
    tokens: list[str] | None = None
    vocab_path = vocab or (manifest and data_vocab(Path(path), manifest))
    if vocab_path:
        vocab_file = find_vocab_file(vocab_path, "--vocab")
        if manifest is None:
            check_recorded_vocab(files, vocab_file, sha256_file(vocab_file))
        elif vocab and sha256_file(vocab_file) != manifest["vocab"]["sha256"]:
            raise UserError(
                f"--vocab: {vocab_file} is not the vocabulary the data in {path} was made with "
                f"({manifest['vocab']['path']}); leave --vocab out to read its own."
            )
        tokens = read_vocab_file(vocab_file)
    batches, total = [], 0
    for f in files:
        if total >= max_records:
            break
        batches.append(read_any(f, max_records - total))
        total += len(batches[-1])
    batch = concat(batches)
    if len(batch) == 0:
        raise UserError(f"{path}: holds no instances.")
    seq = batch.input_ids.shape[1]

    def show(ids: Sequence[int]) -> str:
        return " ".join(tokens[i] if tokens and i < len(tokens) else str(i) for i in ids)

    if n and tokens is None:  # Google's TFRecords do not name their vocabulary
        print(f"(token ids: {path} names no vocabulary; --vocab shows them as words)", file=file)
    for i in range(min(n, len(batch))):
        length = int(batch.lengths[i])
        print(f"instance {i}:", file=file)
        print(f"  {'tokens' if tokens else 'token ids'}: {show(batch.input_ids[i, :length])}",
              file=file)  # fmt: skip
        print(f"  segment_ids: {' '.join(map(str, batch.segment_ids[i, :length]))}", file=file)
        print(f"  is_random_next: {bool(batch.next_sentence[i])}", file=file)
        if batch.positions is not None and batch.labels is not None and batch.counts is not None:
            m = int(batch.counts[i])
            print(f"  masked_lm_positions: {' '.join(map(str, batch.positions[i, :m]))}", file=file)
            print(f"  masked_lm_labels: {show(batch.labels[i, :m])}", file=file)
        else:
            print("  (dynamic masking: masks are drawn at training time)", file=file)
    stats = statistics(batch, seq)
    scope = f"first {len(batch):,}" if total >= max_records else f"all {len(batch):,}"
    print(f"statistics over {scope} instances in {len(files)} file(s):", file=file)
    print(f"  mean length {stats['mean_length']:.1f} of {seq}, padding "
          f"{stats['padding_share']:.1%}, random next {stats['random_next_share']:.1%}",
          file=file)  # fmt: skip
    if stats["masked_share"] is not None:
        print(f"  masked {stats['masked_share']:.2%} of maskable tokens, "
              f"{stats['mean_masked']:.2f} per instance", file=file)  # fmt: skip
    print("  length histogram:", file=file)
    hist = np.array(stats["length_histogram"])
    edges = np.linspace(0, seq + 1, 9).astype(int)
    for lo, hi in itertools.pairwise(edges):
        share = hist[lo:hi].sum() / len(batch)
        print(f"    {lo:>5}-{hi - 1:<5} {share:6.1%} {'#' * round(share * 50)}", file=file)
    return stats


# ----------------------------------------------------------------------------- convert

SHARD_RECORDS = 1 << 20  # records per native shard written by convert (~300 MB at length 128)
CONVERT_CHUNK = 4096  # records a worker decodes at a time


def oldest(window: collections.deque[cf.Future]) -> Any:
    """The result of the window's first future, waited for as `workers.finished` waits."""
    finished({window[0]})
    return window.popleft().result()


def _raw_chunks(files: Sequence[Path]) -> Iterator[tuple[list[bytes], str, int]]:
    """(raw records, file, index of the first) of every file, CONVERT_CHUNK at a time."""
    for path in files:
        with open(path, "rb") as f:
            records = read_records(f, str(path))
            first = 0
            while chunk := list(itertools.islice(records, CONVERT_CHUNK)):
                yield chunk, str(path), first
                first += len(chunk)


def _convert_chunk(raw: list[bytes], path: str, first: int, vocab_size: int,
                   vocab_name: str) -> tuple[np.ndarray, dict[str, Any], str]:  # fmt: skip
    """Decode and check one chunk of TFRecords (in a worker); its native records."""
    where = f"{path}, records {first}-{first + len(raw) - 1}"
    b = tf_batch_raw(raw, path, first)
    seq, p = b.input_ids.shape[1], b.positions.shape[1]  # type: ignore[union-attr]
    if int(b.input_ids.max(initial=0)) >= vocab_size:
        raise UserError(
            f"{where}: token id {int(b.input_ids.max())} is beyond {vocab_name} "
            f"({vocab_size} tokens); give the vocab.txt the data was made with."
        )
    rec = np.zeros(len(b), dtype=record_dtype(vocab_size, seq, p, True))
    rec["input_ids"], rec["length"] = b.input_ids, b.lengths
    rec["sep_a"] = ((b.segment_ids == 0) & (np.arange(seq) < b.lengths[:, None])).sum(1) - 1
    rec["next_sentence_label"] = b.next_sentence
    rec["masked_lm_positions"], rec["masked_lm_ids"] = b.positions, b.labels
    rec["num_masked"] = b.counts
    bad = np.flatnonzero((segment_ids(rec) != b.segment_ids).any(1))
    if len(bad):
        raise UserError(
            f"{path}, record {first + int(bad[0])}: segment ids are not [CLS] A [SEP] B [SEP] "
            "followed by padding; not BERT pretraining data."
        )
    stats = {"tokens": int(b.lengths.sum()), "random_next": int(b.next_sentence.sum()),
             "masked": int(b.counts.sum())}  # type: ignore[union-attr]  # fmt: skip
    return rec, stats, where


def convert(inputs: str, vocab_path: str, output: str, do_lower_case: bool | None = None,
            overwrite: bool = False, workers: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Google's TFRecords (files, globs, comma lists) -> a native data directory with their
    static masks, which train reads as it goes. Streams: memory stays bounded whatever the size.
    Every record is checked (shape, token ids within the vocabulary, segment layout); the
    manifest is written last, so an interrupted conversion is never taken as data. Records
    are decoded by `workers` processes (default: every usable CPU), a bounded window at a time."""
    with output_lock(output, "data convert", "--output"):
        return _convert(inputs, vocab_path, output, do_lower_case, overwrite, workers)


def _convert(inputs: str, vocab_path: str, output: str, do_lower_case: bool | None,
             overwrite: bool, workers: int | None) -> dict[str, Any]:  # fmt: skip
    workers = workers or usable_cpus()
    files, manifest = data_files(inputs)
    if manifest is not None:
        raise UserError(f"{inputs}: already a `bertforge data` directory; train reads it as is.")
    vocab = load_vocab(vocab_path, do_lower_case)
    if vocab.casing_doubt:
        print(vocab.casing_doubt, file=sys.stderr)
    check_recorded_vocab(files, vocab.path, vocab.sha256)
    out = prepare_output_dir(output, "data", overwrite, "--output")
    earlier = [*out.glob("manifest.json"), *out.glob("shard-*"), *out.glob("run.json")]
    if earlier and not overwrite:
        raise UserError(
            f"--output: {out} already holds data; pass --overwrite to replace it, or use "
            "another directory."
        )
    for old in earlier:
        old.unlink()
    shape: tuple[int, int] | None = None
    pending: list[np.ndarray] = []
    shards: list[dict[str, Any]] = []
    totals = {"tokens": 0, "random_next": 0, "masked": 0}
    histogram = np.zeros(0, np.int64)

    def flush(limit: int) -> None:
        """Write the first `limit` pending records as the next shard."""
        everything = np.concatenate(pending)
        records, rest = everything[:limit], everything[limit:]
        pending[:] = [rest] if len(rest) else []
        name = f"shard-{len(shards):05d}.bin"
        meta = {"unit": len(shards), "max_seq_length": shape[0],  # type: ignore[index]
                "max_predictions_per_seq": shape[1], "vocab_size": vocab.size,  # type: ignore[index]
                "static_masking": True, "converted_from": "tfrecord"}  # fmt: skip
        with atomic_open(out / name) as f:
            f.write(encode_header(records, meta))
            f.write(records.tobytes())
        shards.append({"file": name, "records": len(records), "sha256": sha256_file(out / name),
                       "bytes": (out / name).stat().st_size})  # fmt: skip

    def take(done: tuple[np.ndarray, dict[str, Any], str]) -> None:
        """Add a converted chunk (in input order), checking it has the first chunk's shape."""
        nonlocal shape, histogram
        rec, stats, where = done
        this = (rec["input_ids"].shape[1], rec["masked_lm_positions"].shape[1])
        if shape is None:
            shape, histogram = this, np.zeros(this[0] + 1, np.int64)
        if this != shape:
            raise UserError(
                f"{where}: length {this[0]} and {this[1]} predictions, but the first file's "
                f"records have {shape[0]} and {shape[1]}; convert files made with the same "
                "settings together."
            )
        for key in totals:
            totals[key] += stats[key]
        histogram += np.bincount(rec["length"], minlength=shape[0] + 1)
        pending.append(rec)
        while sum(len(r) for r in pending) >= SHARD_RECORDS:
            flush(SHARD_RECORDS)

    if workers == 1:
        for task in _raw_chunks(files):
            take(_convert_chunk(*task, vocab.size, str(vocab.path)))
    else:
        with process_pool(workers) as pool:
            window: collections.deque[cf.Future] = collections.deque()
            for task in _raw_chunks(files):
                window.append(pool.submit(_convert_chunk, *task, vocab.size, str(vocab.path)))
                if len(window) >= 2 * workers:
                    take(oldest(window))
            while window:
                take(oldest(window))
    if pending:
        flush(SHARD_RECORDS)
    if shape is None:
        raise UserError(f"{inputs}: holds no records.")
    instances = sum(s["records"] for s in shards)
    config = {"max_seq_length": shape[0], "max_predictions_per_seq": shape[1],
              "do_lower_case": vocab.do_lower_case, "masked_lm_prob": None,
              "do_whole_word_mask": False, "vocab": str(vocab.path.parent),
              "vocab_size": vocab.size, "converted_from": "tfrecord"}  # fmt: skip
    counts = {"tokens": totals["tokens"],
              **summarize(instances, totals["tokens"], totals["random_next"], totals["masked"],
                          histogram, shape[0])}  # fmt: skip
    copy_vocab(vocab, out)  # the records hold token ids only: their words travel with them
    return write_manifest(
        out, "data", config,
        inputs=[{"path": str(f), "bytes": f.stat().st_size} for f in files], counts=counts,
        extra={"vocab": {"path": str(vocab.path.resolve()), "sha256": vocab.sha256,
                         "size": vocab.size},
               "shards": shards,
               "format": {"kind": "native", "static_masking": True, "shard_version": VERSION}},
    )  # fmt: skip
