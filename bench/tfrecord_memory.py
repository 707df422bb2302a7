"""Memory and time of reading Google's TFRecords into memory for training: the narrowed,
part-by-part reader (`batches.load_tfrecords`, session 51) against the int64 one it replaced,
side by side in one run.

`bertforge train --data FILES.tfrecord` holds every record in memory, in every process. Up to
session 50 each file was decoded whole into int64 arrays (`datacheck.read_tfrecord`), the
masked-LM labels rewritten, and the files joined: 2.4 KB an instance of 128 tokens, with the
decoding's temporaries on top. This writes `--mb` MB of TFRecords in Google's feature layout
(max_seq_length 128, 20 predictions, token ids drawn from a 30,522-token vocabulary, so their
varints take as many bytes as a real vocabulary's; 4,096 distinct records repeated, which
costs the reader the same), in files of about 25 MB as `bertforge data --format tfrecord`
writes them, then in a fresh process per side reads them and prints the resident memory
held after the read and the peak (VmHWM), both above the process's memory before it, as
multiples of the files' size, and the time. Sides alternate over `--rounds`; the page
cache is warm for all. Last, the peak `train`'s warning expects (`batches.tfrecord_peak`).

    python bench/tfrecord_memory.py [--mb 500] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import HERE, machine, made_once, side_json

SEQ, PREDICTIONS, VOCAB = 128, 20, 30522
DISTINCT = 4096
FILE_MB = 25
SIDES = {"int64": "int64, file by file (to session 50)",
         "narrow": "narrowed, part by part (load_tfrecords)"}  # fmt: skip


def write_tfrecords(directory: Path, mb: float, seed: int = 0) -> None:
    """Valid BERT pretraining TFRecords of about `mb` MB (`DISTINCT` records, repeated)."""
    from bertforge.tfrecord import encode_example, frame

    rng = np.random.default_rng(seed)
    framed = []
    for _ in range(DISTINCT):
        length = int(rng.integers(16, SEQ + 1))
        ids = np.zeros(SEQ, dtype=np.int64)
        ids[:length] = rng.integers(999, VOCAB, size=length)
        sep = int(rng.integers(2, length - 2))
        ids[0], ids[sep], ids[length - 1] = 101, 102, 102
        segments = np.zeros(SEQ, dtype=np.int64)
        segments[sep + 1 : length] = 1
        count = min(PREDICTIONS, max(1, round(length * 0.15)))
        positions = np.zeros(PREDICTIONS, dtype=np.int64)
        positions[:count] = np.sort(rng.choice(np.arange(1, length - 1), count, replace=False))
        labels = np.zeros(PREDICTIONS, dtype=np.int64)
        labels[:count] = rng.integers(999, VOCAB, size=count)
        example = {
            "input_ids": ids, "input_mask": (np.arange(SEQ) < length).astype(np.int64),
            "segment_ids": segments, "masked_lm_positions": positions,
            "masked_lm_ids": labels,
            "masked_lm_weights": (np.arange(PREDICTIONS) < count).astype(np.float32),
            "next_sentence_labels": [int(rng.integers(0, 2))],
        }  # fmt: skip
        framed.append(frame(encode_example(example, {"masked_lm_weights"})))
    block = b"".join(framed)
    directory.mkdir(parents=True, exist_ok=True)
    per_file = max(1, FILE_MB * 10**6 // len(block))
    blocks = max(1, round(mb * 1e6 / len(block)))
    for k, start in enumerate(range(0, blocks, per_file)):
        with open(directory / f"shard-{k:05d}.tfrecord", "wb") as f:
            for _ in range(min(per_file, blocks - start)):
                f.write(block)


def read_int64(files: list[Path]) -> Any:
    """The reader to session 50: each file decoded whole into int64, then all joined."""
    from bertforge.batches import IGNORE, ROW_FIELDS, Rows
    from bertforge.datacheck import read_tfrecord

    rows = []
    for path in files:
        b = read_tfrecord(path)
        used = np.arange(b.labels.shape[1]) < b.counts[:, None]
        rows.append(Rows(b.input_ids, b.lengths, None, b.segment_ids, b.next_sentence,
                         b.positions, np.where(used, b.labels, IGNORE)))  # fmt: skip
    joined = Rows(*(np.concatenate([getattr(r, f) for r in rows]) if f != "sep_a" else None
                    for f in ROW_FIELDS))  # fmt: skip
    return joined


def mb(field: str) -> float:
    """A /proc/self/status figure (its "kB" are KiB) in MB, as the files' size is counted."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 / 1e6 for line in f if line.startswith(field + ":"))


def side(directory: Path, name: str) -> dict[str, float]:
    """One side, in this (fresh) process."""
    from bertforge.batches import PretrainingData

    files = sorted(directory.glob("*.tfrecord"))
    before = mb("VmRSS")
    start = time.perf_counter()
    if name == "int64":
        held = read_int64(files)
        records = len(held.lengths)
    else:
        held = PretrainingData(str(directory / "*.tfrecord"))
        records = len(held)
    seconds = time.perf_counter() - start  # measured below while `held` holds the records
    return {"records": records, "seconds": seconds, "held_mb": mb("VmRSS") - before,
            "peak_mb": mb("VmHWM") - before}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=HERE / "work" / "tfrecord_memory")
    ap.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    directory = args.work / f"tfrecords_{args.mb:g}mb"
    if args.side:
        print(json.dumps(side(directory, args.side)))
        return
    size = made_once(directory, lambda path: write_tfrecords(path, args.mb)) / 1e6
    files = list(directory.iterdir())
    print(f"{machine()}; TFRecords {size:.0f} MB in {len(files)} files\n")
    print("| reader | records | seconds | held MB (x files) | peak MB (x files) |")
    print("|---|---|---|---|---|")
    for _ in range(args.rounds):
        for name, label in SIDES.items():
            cmd = [sys.executable, __file__, "--mb", str(args.mb), "--work", str(args.work),
                   "--side", name]  # fmt: skip
            r = side_json(cmd)
            held, peak = r["held_mb"], r["peak_mb"]
            print(f"| {label} | {r['records']:,} | {r['seconds']:.1f} | {held:.0f} "
                  f"({held / size:.2f}x) | {peak:.0f} ({peak / size:.2f}x) |",
                  flush=True)  # fmt: skip
    from bertforge.batches import tfrecord_peak

    estimate = tfrecord_peak(sorted(directory.glob("*.tfrecord"))) / 1e6
    print(f"\ntrain's warning puts the narrowed reader's peak at {estimate:.0f} MB "
          f"({estimate / size:.2f}x; `batches.tfrecord_peak`, from the first file's first "
          "records)")  # fmt: skip
    if os.environ.get("KEEP_TFRECORDS") != "1":
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
