"""How far each speed option's gradients are from the default step's in fp32: `train --tune`'s
gradient check (bertforge/tune.py: `check_gradients`, `gradients_agree`) for one option at a
time, on eight synthetic rows, with its margin under tune's rule.

    python bench/tune_check.py --model-size mini --precision bf16
    TRITON_INTERPRET=1 .venv-census/bin/python bench/tune_check.py --model-size mini  # + Triton's

Why: a trial passes where each parameter's gradient (and its norm, and the loss) is within
ROUNDING times the default step's own distance from fp32 plus a floor. That rule stands on
these figures: in bf16 the default step's rounding moves some gradients by 10% and more, and
an option that rounds elsewhere (--fused-norm) lands as far from the default step while
nearer fp32 (bench/RESULTS.md, "Session 36"). On a GPU it gives the kernels' own figures.

Options: packed and --split-qkv everywhere; bertforge's Triton kernels (--fused-norm,
--fused-gelu, --fused-ffn, --fused-attention: packed batches only) where they run (CUDA, or a
CPU under Triton's interpreter). Each is compared with the default step of its own layout.
Per option: its largest distance from fp32 (of a parameter's norm) and where, the default
step's, its largest distance from the default step at the run's precision (what the check
compared before session 36, with a 10% tolerance in bf16), and its margin: the largest of
distance - limit over parameters and the three measures (negative passes).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from train_throughput import VOCAB, synthetic_data

from bertforge import kernels, tune
from bertforge.batches import step_rows
from bertforge.config import TrainConfig
from bertforge.distributed import Dist
from bertforge.model import BertConfig
from bertforge.train import autocast_to

TRITON_OPTIONS = ("fused_norm", "fused_gelu", "fused_ffn", "fused_attention")


def margin(
    got: dict[str, Any], default: dict[str, Any], exact: dict[str, Any], name: str
) -> tuple[float, str, float, float]:
    """The largest of (distance - limit) over parameters and measures, with the limits
    `gradients_agree` checks (`tune.limits`, the precision's floor): the margin, where it is
    (a parameter's gradient or its norm, or the loss), and that distance and limit."""
    moved, stretched, loss = tune.distances(got, exact)
    moved_limit, stretched_limit, loss_limit = tune.limits(default, exact, tune.CHECK_FLOOR[name])
    names = exact["names"]
    candidates = [(float(loss - loss_limit), "the loss", float(loss), float(loss_limit))]
    for what, distance, limit in (("gradient", moved, moved_limit),
                                  ("gradient norm", stretched, stretched_limit)):  # fmt: skip
        i = int(np.argmax(distance - limit))
        candidates.append((float(distance[i] - limit[i]), f"{names[i]}'s {what}",
                           float(distance[i]), float(limit[i])))  # fmt: skip
    return max(candidates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-size", default="mini")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--step", type=int, default=0, help="which synthetic batch (its seed)")
    ap.add_argument("--options", help="comma-separated; default: every one that runs here")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    data, spec, order = synthetic_data(Path(tempfile.mkdtemp()), args.seq_len, tune.CHECK_ROWS)
    rows = step_rows(data, order, spec, 1, args.step, tune.CHECK_ROWS)
    bert = BertConfig.preset(args.model_size, VOCAB, max_position_embeddings=max(512, args.seq_len))
    d = Dist(0, 1, 0, device)
    triton = kernels.usable(torch.empty(0, device=device))
    options = args.options.split(",") if args.options else [
        "split_qkv", *(TRITON_OPTIONS if triton else ())]  # fmt: skip
    base = TrainConfig(data="-", output="-")
    print(f"{args.model_size}, seq {args.seq_len}, {tune.CHECK_ROWS} rows, {args.precision} on "
          f"{device}; torch {torch.__version__}; Triton's kernels: {triton}",
          flush=True)  # fmt: skip

    def signature(at: torch.dtype, packed: bool, **on: bool) -> dict[str, Any]:
        cfg = dataclasses.replace(base, **on)
        return tune.check_gradients(cfg, bert, d, autocast_to(at, device), packed, rows)

    references = {}  # per layout: the default step in fp32 and at the run's precision
    for packed in (False, True):
        exact, default = signature(torch.float32, packed), signature(dtype, packed)
        references[packed] = exact, default
        own = tune.distances(default, exact)[0]
        print(f"{'packed' if packed else 'padded'}: the default step, {100 * own.max():.2f}% from "
              f"fp32 (in {exact['names'][int(own.argmax())]}); per parameter, median "
              f"{100 * np.median(own):.2f}%", flush=True)  # fmt: skip
    # (option, its layout, the options on, the layout of the default step it is checked against)
    tried = [("packed", True, {}, False)]
    for packed in (False, True):
        tried += [(o, packed, {o: True}, packed) for o in options
                  if packed or o != "fused_attention"]  # fmt: skip
    results = []
    for name, packed, on, against in tried:
        exact, default = references[against]
        start = time.perf_counter()
        got = references[packed][1] if not on else signature(dtype, packed, **on)
        moved = tune.distances(got, exact)[0]
        row = {
            "layout": "packed" if packed else "padded",
            "option": name,
            "from_fp32": round(float(moved.max()), 5),
            "where": got["names"][int(moved.argmax())],
            "default_from_fp32": round(float(tune.distances(default, exact)[0].max()), 5),
            "from_default": round(float(tune.distances(got, default)[0].max()), 5),
            "seconds": round(time.perf_counter() - start, 1),
        }
        value, at, distance, limit = margin(got, default, exact, args.precision)
        row |= {"margin": round(value, 5), "margin_at": at,
                "margin_distance": round(distance, 5), "margin_limit": round(limit, 5)}  # fmt: skip
        results.append(row)
        verdict = "passes" if row["margin"] <= 0 else "FAILS"
        print(f"  {row['layout']} {name:16s} {100 * row['from_fp32']:6.2f}% from fp32 (the "
              f"default step {100 * row['default_from_fp32']:.2f}%), "
              f"{100 * row['from_default']:6.2f}% from the default step; margin "
              f"{100 * row['margin']:+.2f}%, in {at} ({100 * distance:.2f}% against "
              f"{100 * limit:.2f}%): {verdict} ({row['seconds']} s)",
              flush=True)  # fmt: skip
    print(json.dumps({"model_size": args.model_size, "seq_len": args.seq_len,
                      "precision": args.precision, "device": str(device), "triton": triton,
                      "rounding": tune.ROUNDING, "floor": tune.CHECK_FLOOR[args.precision],
                      "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
