"""What making the next batches costs a host-bound training step: the trainer's compiled step
(`forward_backward`, `update`, FlatAdamW) on a model whose arithmetic is small (the model
size's layers and tensors at hidden 8, fp32, one micro-batch of 4 instances a step, so that a
step is mostly Python and dispatch, as a GPU step's host side is), while full batches of
`--batch-size` instances with dynamic masks are made for it: precomputed (nothing runs beside
the step), by a thread (`batches.Prefetcher`, sharing the step's GIL), or by the trainer's
worker process (`batches.ProcessPrefetcher`). Interleaved, in rounds; prints each round and,
last, one JSON object with the medians.

    python bench/loader_contention.py --model-size base --batch-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from train_throughput import VOCAB, host_sized, synthetic_data

from bertforge.batches import (
    IGNORE,
    Prefetcher,
    ProcessPrefetcher,
    slice_rows,
    step_rows,
)
from bertforge.config import TrainConfig
from bertforge.distributed import Dist
from bertforge.model import BertConfig, BertForPretraining
from bertforge.train import (
    Ledger,
    Objective,
    compile_step,
    device_skip,
    forward_backward,
    make_optimizer,
    update,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-size", default="base")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=256, help="instances a batch is made of")
    ap.add_argument("--micro", type=int, default=4, help="instances a step computes")
    ap.add_argument("--steps", type=int, default=50, help="steps a side a round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile the step as the trainer does on a GPU (--no-compile: eager, quicker)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    preset = BertConfig.preset(
        args.model_size, VOCAB, max_position_embeddings=max(512, args.seq_len)
    )
    config = host_sized(preset)
    model = BertForPretraining(config)
    optimizer = make_optimizer(TrainConfig(data="-", output="-", flat_optimizer=True), model)
    d = Dist(0, 1, 0, torch.device("cpu"))
    seq, batch, micro = args.seq_len, args.batch_size, args.micro
    tmp = tempfile.TemporaryDirectory()
    data, spec, order = synthetic_data(Path(tmp.name), seq, batch)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ledger = Ledger(device_skip(optimizer, scaler), 0)
    forward = compile_step(Objective(model)) if args.compile else Objective(model)

    def make(s: int):
        return step_rows(data, order, spec, 1, s, batch)

    def step(rows) -> None:
        part = slice_rows(rows, 0, micro)
        masked = int((part.labels != IGNORE).sum())
        sums = forward_backward(forward, None, part, micro, (masked, micro), d,
                                contextlib.nullcontext(), scaler, False, args.compile)  # fmt: skip
        update(model, optimizer, scaler, sums, 1.0, ledger)
        optimizer.zero_grad()

    made = [make(s) for s in range(args.steps)]
    for rows in made[:5]:  # compile
        step(rows)

    def timed(kind: str) -> float:
        if kind == "precomputed":
            start = time.perf_counter()
            for rows in made:
                step(rows)
            return (time.perf_counter() - start) / args.steps * 1e3
        loader_class = Prefetcher if kind == "thread" else ProcessPrefetcher
        loader = loader_class(make, 0, args.steps + 1)
        batches = iter(loader)
        next(batches)  # the process's first batch is made in this one: leave it out
        time.sleep(0.3)  # the loader fills its queue or ring, as in a run's steady state
        start = time.perf_counter()
        for _, rows in batches:
            step(rows)
        elapsed = time.perf_counter() - start
        loader.close()
        return elapsed / args.steps * 1e3

    results: dict[str, list[float]] = {"precomputed": [], "thread": [], "process": []}
    for r in range(args.rounds):
        for kind, got in results.items():
            got.append(timed(kind))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in results.items()))
    median = {k: statistics.median(v) for k, v in results.items()}
    print(json.dumps({
        "model_size": args.model_size,
        "batch_size": batch,
        "micro": micro,
        "compiled": args.compile,
        "ms_per_step": {k: round(v, 2) for k, v in median.items()},
        "thread_over_precomputed_ms": round(median["thread"] - median["precomputed"], 2),
        "process_over_precomputed_ms": round(median["process"] - median["precomputed"], 2),
        "device": "cpu",
    }))  # fmt: skip
    tmp.cleanup()


if __name__ == "__main__":
    main()
