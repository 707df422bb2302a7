"""Resident memory and speed of training's reads of a large data directory: shards read by
position (`shards.ShardSet`) against the memory maps they were read through before, side by
side in one run.

Through a memory map, every page a process reads stays in its resident memory (RssFile)
until the kernel needs it back: the start-up checks read every record, and training's random
batches map more of the shards at every step. This writes `--gb` GB of valid native shards
(dynamic masking, max_seq_length 128, random token ids, 16,384 records a shard as `bertforge
data` writes them; a 6 GB corpus gives about as much), then in a fresh process per side does
what training does to them: `PretrainingData` (or the old reader, `MappedData`), the
start-up passes (`max_token_id`, `damaged_record`), then `--steps` global batches of
`--batch` instances with dynamic masks (`step_rows`, as the loader makes them). It prints
resident memory (anonymous and file-backed, /proc/self/status) after the start-up and at the
end, the start-up's time and the batches'. A third side reads by position under a hard limit
on open files of half the shards' count, so that shards are opened and closed as rows come.
Sides alternate over `--rounds`; the page cache is warm for all (the shards were just
written or read).

    python bench/shard_memory.py [--gb 6] [--steps 2000] [--batch 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import HERE, machine, made_once, side_json

SEQ, PREDICTIONS, VOCAB = 128, 20, 30522
SIDES = {"mapped": "memory-mapped (before)", "pread": "read by position (ShardSet)",
         "limited": "read by position, {} shards held open (hard limit)"}  # fmt: skip
SHARD_RECORDS = 1 << 14  # about 4 MB, as `bertforge data` writes them (a shard per unit)


def write_shards(directory: Path, gb: float, seed: int = 0) -> None:
    """Valid dynamic-masking shards of about `gb` GB: random token ids, lengths 8..SEQ."""
    from bertforge.shards import record_dtype, write_shard

    dtype = record_dtype(VOCAB, SEQ, PREDICTIONS, static_masking=False)
    total = int(gb * 1e9) // dtype.itemsize
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"max_seq_length": SEQ, "max_predictions_per_seq": PREDICTIONS,
            "static_masking": False, "vocab_size": VOCAB}  # fmt: skip
    for k, start in enumerate(range(0, total, SHARD_RECORDS)):
        n = min(SHARD_RECORDS, total - start)
        rec = np.zeros(n, dtype=dtype)
        lengths = rng.integers(8, SEQ + 1, size=n)
        ids = rng.integers(999, VOCAB, size=(n, SEQ), dtype=np.uint16)
        ids[np.arange(SEQ) >= lengths[:, None]] = 0
        sep_a = rng.integers(2, lengths - 2)
        ids[:, 0] = 101
        ids[np.arange(n), sep_a] = ids[np.arange(n), lengths - 1] = 102
        rec["input_ids"], rec["length"], rec["sep_a"] = ids, lengths, sep_a
        rec["next_sentence_label"] = rng.integers(0, 2, size=n)
        with open(directory / f"shard-{k:05d}.bin", "wb") as f:
            write_shard(f, rec, {**meta, "num_records": n})


def rss_mb() -> dict[str, float]:
    """This process's resident memory by kind, MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "VmHWM:")):
                name, kb = line.split()[:2]
                out[name.rstrip(":")] = int(kb) / 1024
    return out


class MappedData:
    """The reader as it was before ShardSet (to 7f4389b): every shard memory-mapped, the rows
    of a batch gathered shard by shard, the start-up passes over the maps."""

    def __init__(self, pattern: str) -> None:
        from bertforge.shards import open_shard

        self.paths = sorted(glob.glob(pattern))
        self.native = [open_shard(p)[1] for p in self.paths]
        self.offsets = np.cumsum([0, *[len(r) for r in self.native]])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def max_token_id(self) -> int:
        return max(int(r["input_ids"].max(initial=0)) for r in self.native)

    def damaged_record(self, chunk: int = 1 << 20) -> str | None:
        from bertforge.batches import _contradiction

        for path, records in zip(self.paths, self.native, strict=True):
            for start in range(0, len(records), chunk):
                if (what := _contradiction(records[start : start + chunk])) is not None:
                    return f"{path}: record {start + what[0]}: {what[1]}"
        return None

    def rows(self, index: np.ndarray) -> Any:
        from bertforge.batches import Rows
        from bertforge.shards import segment_ids

        shard = np.searchsorted(self.offsets, index, side="right") - 1
        order = np.argsort(shard, kind="stable")
        parts = []
        for s in np.unique(shard):
            local = index[order[shard[order] == s]] - self.offsets[s]
            parts.append(self.native[s][local])
        rec = np.concatenate(parts)[np.argsort(order, kind="stable")]
        return Rows(rec["input_ids"].astype(np.int64), rec["length"].astype(np.int64),
                    rec["sep_a"].astype(np.int64), segment_ids(rec),
                    rec["next_sentence_label"].astype(np.int64), None, None)  # fmt: skip


def side(directory: Path, name: str, steps: int, batch: int) -> dict[str, float]:
    """One side, in this (fresh) process: what training's data reading does."""
    import bertforge.batches as batches
    from bertforge.masking import MaskSpec

    pattern = str(directory / "shard-*.bin")
    if name == "limited":  # a hard limit on open files below the shards' count
        shards = len(glob.glob(pattern))
        resource.setrlimit(resource.RLIMIT_NOFILE, (shards // 2 + 256, shards // 2 + 256))
    start = time.perf_counter()
    data: Any = MappedData(pattern) if name == "mapped" else batches.PretrainingData(pattern)
    top = data.max_token_id()
    assert data.damaged_record() is None and top < VOCAB
    startup = time.perf_counter() - start
    after_startup = rss_mb()
    spec = MaskSpec(0.15, PREDICTIONS, False, VOCAB, 103, np.zeros(VOCAB, dtype=bool))
    order = batches.Order(len(data), 12345)
    peak_file = 0.0
    start = time.perf_counter()
    for step in range(steps):
        batches.step_rows(data, order, spec, 12345, step, batch)
        if step % 50 == 0:
            peak_file = max(peak_file, rss_mb()["RssFile"])
    per_step = (time.perf_counter() - start) / steps * 1e3
    end = rss_mb()
    return {"records": len(data), "startup_s": startup, "startup_anon": after_startup["RssAnon"],
            "startup_file": after_startup["RssFile"], "end_anon": end["RssAnon"],
            "end_file": end["RssFile"], "peak_file": max(peak_file, end["RssFile"]),
            "hwm": end["VmHWM"], "ms_per_step": per_step,
            "held": getattr(getattr(data, "native", None), "held", 0)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=6.0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=HERE / "work" / "shard_memory")
    ap.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    directory = args.work / f"shards_{args.gb:g}gb"
    if args.side:
        print(json.dumps(side(directory, args.side, args.steps, args.batch)))
        return
    size = made_once(directory, lambda path: write_shards(path, args.gb)) / 1e9
    print(f"{machine()}; shards {size:.2f} GB; {args.steps} steps of {args.batch}\n")
    print(
        "| side | start-up s | RSS after start-up, anon / file MB | RSS file, peak over the "
        "steps MB | RSS at the end, anon / file MB | peak RSS (VmHWM) MB | ms a batch |"
    )
    print("|---|---|---|---|---|---|---|")
    for _ in range(args.rounds):
        for name, label in SIDES.items():
            cmd = [sys.executable, __file__, "--gb", str(args.gb), "--steps",
                   str(args.steps), "--batch", str(args.batch), "--work", str(args.work),
                   "--side", name]  # fmt: skip
            r = side_json(cmd)
            if name == "limited":
                label = label.format(r["held"])
            print(f"| {label} | {r['startup_s']:.1f} | {r['startup_anon']:.0f} / "
                  f"{r['startup_file']:.0f} | {r['peak_file']:.0f} | {r['end_anon']:.0f} / "
                  f"{r['end_file']:.0f} | {r['hwm']:.0f} | {r['ms_per_step']:.2f} |",
                  flush=True)  # fmt: skip
    if os.environ.get("KEEP_SHARDS") != "1":
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
