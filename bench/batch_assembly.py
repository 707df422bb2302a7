"""Host work per training step and process: reading and masking the step's rows.

Each process of a `bertforge train` run builds its batches on the host, in a background
thread, while the GPU runs the previous step. Until session 18 every process read and masked
the whole global batch and kept its share (the same rows on every rank), so that work did not
shrink as processes were added; now each reads and masks only its share
(`batches.step_rows(..., part)`, masks drawn per block of 32 rows: `masking.BlockRng`), with
the same rows and masks as before the split. Both are timed here side by side in one run, for
rank 0 of a run of W processes, on a synthetic native shard of BERT-base shape (seq 128, 20
predictions, vocab 30,522):

    python bench/batch_assembly.py [--batches 256,2048] [--worlds 1,8,64]

"whole batch" = the former way (the global batch read and masked with one generator, then
sliced); "share" = the current one. The last line is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from train_throughput import VOCAB, synthetic_shard

from bertforge.batches import Order, PretrainingData, apply_mask, slice_rows, step_rows
from bertforge.masking import MaskSpec

SEQ, PREDICTIONS = 128, 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="256,2048")
    ap.add_argument("--worlds", default="1,8,64")
    ap.add_argument("--rows", type=int, default=400_000, help="instances in the shard")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds, the best kept")
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    worlds = [int(x) for x in args.worlds.split(",")]

    tmp = tempfile.TemporaryDirectory()
    shard = Path(tmp.name) / "shard.bin"
    synthetic_shard(shard, args.rows, SEQ, PREDICTIONS, np.random.default_rng(0))
    data = PretrainingData(str(shard))
    spec = MaskSpec(0.15, PREDICTIONS, False, VOCAB, 103, np.zeros(VOCAB, dtype=bool))
    order = Order(args.rows, 1)

    def whole_batch(step: int, batch: int, lo: int, hi: int) -> None:
        rows = data.rows(order.indices(step, batch))
        rows = apply_mask(rows, spec, np.random.default_rng([1, 1, step]))
        slice_rows(rows, lo, hi)

    def share(step: int, batch: int, lo: int, hi: int) -> None:
        step_rows(data, order, spec, 1, step, batch, (lo, hi))

    ways = {"whole batch": whole_batch, "share": share}
    results = []
    for batch in batches:
        for world in worlds:
            if batch % world:
                continue
            local = batch // world
            steps = max(4, 4096 // batch)
            best = dict.fromkeys(ways, float("inf"))
            for _ in range(args.repeat):  # the two ways alternate, so drift hits both
                for name, way in ways.items():
                    t = time.perf_counter()
                    for s in range(steps):
                        way(s, batch, 0, local)
                    best[name] = min(best[name], (time.perf_counter() - t) / steps)
            row = {
                "batch": batch,
                "world": world,
                "rows_per_process": local,
                "whole_batch_ms": round(best["whole batch"] * 1e3, 3),
                "share_ms": round(best["share"] * 1e3, 3),
                "speedup": round(best["whole batch"] / best["share"], 2),
            }
            results.append(row)
            print(
                f"batch {batch:5d}, {world:3d} process(es), {local:5d} rows each: whole batch "
                f"{row['whole_batch_ms']:8.2f} ms, share {row['share_ms']:8.2f} ms "
                f"({row['speedup']:.2f}x)"
            )
    tmp.cleanup()
    print(json.dumps({"machine": platform.processor() or platform.machine(), "results": results}))


if __name__ == "__main__":
    main()
