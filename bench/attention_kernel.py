"""A packed batch's attention alone, forward and backward: bertforge's Triton kernels
(`kernels.attention`, the trainer's --fused-attention) against what the model takes otherwise
(flash varlen attention with dropout on CUDA; elsewhere its pad / attend / unpad path),
interleaved in one process.

    python bench/attention_kernel.py --model-size base --batch-size 256 --seq-len 128

q, k and v are views of one [T, 3, heads, head] projection, as the model hands them; the
sequences' lengths are drawn as the data stage makes them (BERT's short_seq_prob 0.1: one
sequence in ten a random length from 2 to seq, the others full; about 5% padding at 128, where
the benchmarks' data had 9%). Prints per round the milliseconds of each side's forward and of
its forward + backward for one layer, and last one JSON object: the medians, the ratio, the
attention FLOPs (4 x T x seq-ish products, counted per sequence) as TFLOP/s, and the bytes the
forward and backward must move (q, k, v, o, do read and dq, dk, dv written, and the forward's
writes) at the device's bandwidth where `--peak-gbps` gives it. On a CPU it runs under
Triton's interpreter (TRITON_INTERPRET=1) for a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import numpy as np
import torch

from bertforge import kernels
from bertforge.model import BertConfig, Packed, attend, flash_varlen_available


def lengths_of(batch: int, seq: int, rng: np.random.Generator) -> list[int]:
    """One sequence in ten of a random length in [2, seq], the others seq long."""
    short = rng.random(batch) < 0.1
    return [int(rng.integers(2, seq + 1)) if s else seq for s in short]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-size", default="base")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="calls per side per round")
    ap.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth, GB/s")
    args = ap.parse_args()
    device = torch.device(args.device)
    if not kernels.usable(torch.empty(0, device=device)):
        ap.error(f"kernels.attention does not run on {device} here (CUDA with Triton, or a CPU "
                 "under TRITON_INTERPRET=1)")  # fmt: skip
    c = BertConfig.preset(args.model_size, 64)
    heads, head = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = lengths_of(args.batch_size, args.seq_len, np.random.default_rng(0))
    t = sum(lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    layout = Packed(cu, positions, args.seq_len, flash_varlen_available(device))
    qkv = torch.randn(t, 3, heads, head, device=device, dtype=dtype, requires_grad=True)
    do = torch.randn(t, heads, head, device=device, dtype=dtype)
    p = args.dropout

    def theirs() -> torch.Tensor:
        return attend(*qkv.unbind(1), layout, p)

    def ours() -> torch.Tensor:
        return kernels.attention(*qkv.unbind(1), cu, args.seq_len, p)

    with torch.no_grad():  # the same numbers without dropout (a wrong kernel is no benchmark)
        q, k, v = qkv.unbind(1)
        diff = attend(q, k, v, layout, 0.0) - kernels.attention(q, k, v, cu, args.seq_len, 0.0)
        diff = float(diff.abs().max())  # fmt: skip

    def timed(fn, backward: bool) -> float:  # type: ignore[no-untyped-def]
        """ms per call over args.steps calls."""
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            if backward:
                fn().backward(do)
                qkv.grad = None
            else:
                with torch.no_grad():
                    fn()
        sync()
        return (time.perf_counter() - start) * 1e3 / args.steps

    sides = {"theirs": theirs, "ours": ours}
    for fn in sides.values():  # warm-up: compiles, autotunes
        timed(fn, True)
    times: dict[str, list[float]] = {f"{s}_{w}": [] for s in sides for w in ("fwd", "fwd_bwd")}
    for r in range(args.rounds):
        for name, fn in sides.items():
            times[f"{name}_fwd"].append(timed(fn, False))
            times[f"{name}_fwd_bwd"].append(timed(fn, True))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} ms" for k, v in times.items()))
    ms = {k: statistics.median(v) for k, v in times.items()}
    # products: q k^T and p v forward; the backward recomputes q k^T (twice in ours: one
    # kernel for dq, one for dk and dv) and takes dp, dv, dq, dk; counted as flash does, once
    per_pair = 2 * head * heads  # multiply-adds of one (query, key) pair per product, x2 FLOPs
    pairs = sum(n * n for n in lengths)
    flops = {"fwd": 2 * per_pair * pairs, "fwd_bwd": 7 * per_pair * pairs}
    size = torch.finfo(dtype).bits // 8
    rows = t * heads * head * size  # one [T, heads, head] tensor
    # forward: q, k, v read, o and lse written; backward: q, k, v, o, do, lse read, delta
    # written and read, dq, dk, dv written
    moved = {"fwd": 4 * rows + 4 * t * heads, "fwd_bwd": 12 * rows + 4 * 4 * t * heads}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "theirs": "flash varlen" if layout.flash else "pad, attend, unpad",
        "model_size": args.model_size,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens": t,
        "dropout": p,
        "dtype": str(dtype).removeprefix("torch."),
        "max_abs_diff_without_dropout": diff,
        **{f"{k}_ms": round(v, 4) for k, v in ms.items()},
        "ratio_fwd": round(ms["theirs_fwd"] / ms["ours_fwd"], 3),
        "ratio_fwd_bwd": round(ms["theirs_fwd_bwd"] / ms["ours_fwd_bwd"], 3),
        **{f"ours_{w}_tflops": round(f / ms[f"ours_{w}"] / 1e9, 2) for w, f in flops.items()},
        **{f"{w}_gb": round(b / 1e9, 4) for w, b in moved.items()},
    }
    if args.peak_gbps:
        for w, b in moved.items():
            result[f"{w}_floor_ms"] = round(b / args.peak_gbps / 1e6, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
