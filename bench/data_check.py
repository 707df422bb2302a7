"""Training's start-up check of the data (the largest token id, damaged records): one thread
against the threads training uses, and two torchrun processes sharing it, side by side.

Before its first step, training reads every record of the data once
(`PretrainingData._scan`): token ids beyond the vocabulary and fields that contradict each
other stop the run there, not hours in. This writes `--gb` GB of valid native shards
(`shard_memory.write_shards`: 16,384 records of max_seq_length 128 a shard, as `bertforge
data` writes them), then times the pass in a fresh process per side:

- one thread: `scan_part` over every shard with one thread (the pass as it was to session
  46, in blocks of 8 MB rather than 65,536 records);
- threads: the pass as training runs it in one process (`scan_threads()` threads);
- 2 processes, each the whole pass: `torchrun --nproc-per-node 2`, gloo, every process
  reading every shard in one thread (training under torchrun to session 46);
- 2 processes, sharing it: each reads every other shard, in threads
  (`train.share_data_check`).

The torchrun sides are timed between two barriers, on process 0.

Each side runs from the page cache (the shards read just before) and, where this process may
write /proc/sys/vm/drop_caches (root), from disk with the cache dropped first. Sides
alternate over `--rounds`. The last line is one JSON object.

    python bench/data_check.py [--gb 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, machine, made_once
from shard_memory import write_shards

SIDES = {"one": "one thread", "threads": "threads ({})",
         "each": "2 processes (torchrun), each the whole pass in one thread (before)",
         "shared": "2 processes (torchrun), sharing it, {} threads each"}  # fmt: skip
DROP = Path("/proc/sys/vm/drop_caches")


def side(directory: Path, name: str) -> dict[str, float]:
    """One side, in this (fresh) process or, for "shared", in each torchrun process."""
    from bertforge import distributed, train
    from bertforge.batches import PretrainingData, scan_threads

    pattern = str(directory / "shard-*.bin")
    if name in ("each", "shared"):
        d = distributed.setup("cpu")
        data = PretrainingData(pattern)
        distributed.barrier(d)
        start = time.perf_counter()
        if name == "each":
            data.scan_part(range(len(data.files)), threads=1)
        else:
            train.share_data_check(data, d, reused=False)
        distributed.barrier(d)
        seconds = time.perf_counter() - start
        distributed.shutdown(d)
        threads = 1 if name == "each" else scan_threads(distributed.local_processes())
    else:
        data = PretrainingData(pattern)
        start = time.perf_counter()
        if name == "one":
            top, damaged = data.scan_part(range(len(data.files)), threads=1)
            threads = 1
        else:
            top, damaged = data.max_token_id(), data.damaged_record()
            threads = scan_threads()
        seconds = time.perf_counter() - start
        assert damaged is None and top > 0
    return {"seconds": seconds, "threads": threads}


def run_side(directory: Path, name: str) -> dict[str, float]:
    me = [__file__, "--dir", str(directory), "--side", name]
    if name in ("each", "shared"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", "29531", *me]  # fmt: skip
    else:
        cmd = [sys.executable, *me]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", default="6")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=HERE / "work" / "data_check")
    ap.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        r = side(args.dir, args.side)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(r), flush=True)
        return
    directory = args.work / f"shards_{args.gb}gb"
    size = made_once(directory, lambda path: write_shards(path, float(args.gb))) / 1e9
    can_drop = os.access(DROP, os.W_OK)
    caches = ["page cache", "disk"] if can_drop else ["page cache"]
    shards = len(list(directory.iterdir()))
    note = "" if can_drop else "; not root: no from-disk side"
    print(f"{machine()}; {shards} shards, {size:.2f} GB{note}\n")
    times: dict[tuple[str, str], list[float]] = {}
    print("| side | read from | seconds |")
    print("|---|---|---|")
    for _ in range(args.rounds):
        for cache in caches:
            for name, label in SIDES.items():
                if cache == "disk":
                    os.sync()
                    DROP.write_text("1")
                else:
                    run_side(directory, "one")  # the shards in the page cache
                r = run_side(directory, name)
                times.setdefault((name, cache), []).append(r["seconds"])
                print(f"| {label.format(r['threads'])} | {cache} | {r['seconds']:.2f} |",
                      flush=True)  # fmt: skip
    summary: dict[str, object] = {"gb": round(size, 2), "cpus": os.cpu_count()}
    print()
    for cache in caches:
        one = statistics.median(times[("one", cache)])
        ratio = one / statistics.median(times[("threads", cache)])
        print(f"{cache}: threads {ratio:.2f}x one thread (medians)")
        summary[f"threads_vs_one_{cache.split()[0]}"] = round(ratio, 2)
        each = statistics.median(times[("each", cache)])
        ratio = each / statistics.median(times[("shared", cache)])
        print(f"{cache}: 2 processes sharing the pass {ratio:.2f}x each doing it (medians)")
        summary[f"shared_vs_each_{cache.split()[0]}"] = round(ratio, 2)
        for name in SIDES:
            summary[f"{name}_s_{cache.split()[0]}"] = round(
                statistics.median(times[(name, cache)]), 2
            )
    if os.environ.get("KEEP_SHARDS") != "1":
        shutil.rmtree(directory)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
