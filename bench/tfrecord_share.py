"""Memory of Google's TFRecords held by the processes of one machine: each process decoding
its own copy (to session 52) against one copy decoded by process 0 and mapped by the others
(`batches.shared_tfrecords`, session 53), side by side in one run.

Under torchrun, `bertforge train --data FILES.tfrecord` held every record in every process:
8 GPUs, 8 copies. This writes `--mb` MB of TFRecords (`tfrecord_memory.write_tfrecords`:
length 128, a 30,522-token vocabulary), then per side starts `--processes` fresh processes
as torchrun's of one machine are (children of one parent), each reading the records as
`train` does and then touching every page of them (training reads them all over an epoch).
Once all hold them, each reports its proportional set size (Pss: a page shared by k
processes counts 1/k in each, so their sum is what the machine holds for them), its
resident size and its peak (VmHWM), each above what it held before the read (once all had
imported bertforge); the table gives the sums and the slowest read. Sides
alternate over `--rounds`. TMPDIR (where process 0 writes the arrays) is the system's.

    python bench/tfrecord_share.py [--mb 200] [--processes 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import HERE, machine, made_once
from tfrecord_memory import mb, write_tfrecords

SIDES = {"own": "a copy per process (to session 52)",
         "shared": "one copy, mapped (shared_tfrecords)"}  # fmt: skip


def pss() -> float:
    """This process's proportional set size in MB (/proc's "kB" are KiB)."""
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 / 1e6 for line in f if line.startswith("Pss:"))


def wait_all(folder: Path, stage: str, processes: int) -> None:
    """Until all `processes` of a side have reached `stage` (a file each in `folder`)."""
    (folder / f"{stage}-{os.getpid()}").touch()
    while len(list(folder.glob(f"{stage}-*"))) < processes:
        time.sleep(0.05)


def side(directory: Path, name: str, rank: int, processes: int, meeting: Path) -> None:
    """One process of a side: read, touch every page, report once all have read."""
    from bertforge.batches import ROW_FIELDS, PretrainingData

    wait_all(meeting, "ready", processes)  # all imported: the libraries' pages shared alike
    before = {"pss": pss(), "rss": mb("VmRSS")}
    start = time.perf_counter()
    local = (rank, processes) if name == "shared" else None
    data = PretrainingData(str(directory / "*.tfrecord"), local)
    seconds = time.perf_counter() - start
    assert data.tf_rows is not None
    for field in ROW_FIELDS:  # every page, as an epoch reads them
        if (a := getattr(data.tf_rows, field)) is not None:
            int(np.asarray(a).sum(dtype=np.int64))
    wait_all(meeting, "read", processes)
    figures = {"seconds": seconds,
               "pss": pss() - before["pss"], "rss": mb("VmRSS") - before["rss"],
               "peak": mb("VmHWM") - before["rss"]}  # fmt: skip
    print(json.dumps(figures), flush=True)
    wait_all(meeting, "told", processes)  # the others' mappings stay until all have measured


def run_side(args: argparse.Namespace, name: str) -> list[dict[str, float]]:
    meeting = Path(tempfile.mkdtemp(prefix="bertforge-bench-"))
    try:
        children = []
        for rank in range(args.processes):
            cmd = [sys.executable, __file__, "--mb", str(args.mb), "--work", str(args.work),
                   "--side", name, "--rank", str(rank), "--processes", str(args.processes),
                   "--meeting", str(meeting)]  # fmt: skip
            children.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        outputs = [c.communicate()[0] for c in children]
        if any(c.returncode for c in children):
            raise SystemExit(f"a {name} process failed")
        return [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    finally:
        shutil.rmtree(meeting, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=HERE / "work" / "tfrecord_memory")
    ap.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--meeting", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    directory = args.work / f"tfrecords_{args.mb:g}mb"
    if args.side:
        side(directory, args.side, args.rank, args.processes, args.meeting)
        return
    size = made_once(directory, lambda path: write_tfrecords(path, args.mb)) / 1e6
    print(f"{machine()}; TFRecords {size:.0f} MB; {args.processes} processes; TMPDIR "
          f"{tempfile.gettempdir()}\n")  # fmt: skip
    print("| side | slowest read s | sum of Pss MB (x files) | sum of RSS MB | sum of peaks MB |")
    print("|---|---|---|---|---|")
    pss = {name: [] for name in SIDES}
    for _ in range(args.rounds):
        for name, label in SIDES.items():
            r = run_side(args, name)
            total = sum(x["pss"] for x in r)
            pss[name].append(total)
            print(f"| {label} | {max(x['seconds'] for x in r):.1f} | {total:,.0f} "
                  f"({total / size:.2f}x) | {sum(x['rss'] for x in r):,.0f} | "
                  f"{sum(x['peak'] for x in r):,.0f} |", flush=True)  # fmt: skip
    ratio = min(pss["own"]) / min(pss["shared"])
    print(
        f"\nthe machine holds {ratio:.2f}x less for the records with one shared copy "
        "(sums of Pss, best round of each side)"
    )
    if os.environ.get("KEEP_TFRECORDS") != "1":
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
