"""A packed batch's attention alone, forward and backward: bertforge's Triton kernels
(`kernels.attention`, the trainer's --fused-attention) against what the model takes otherwise
(flash varlen attention with dropout on CUDA; elsewhere its pad / attend / unpad path),
interleaved in one process.

    python bench/attention_kernel.py --model-size base --batch-size 256 --seq-len 128

q, k and v are views of one [T, 3, heads, head] projection, as the model hands them; the
sequences' lengths are drawn as the data stage makes them (BERT's short_seq_prob 0.1: one
sequence in ten a random length from 2 to seq, the others full; about 5% padding at 128, where
the benchmarks' data had 9%). Prints per round the milliseconds of each side's forward and of
its forward + backward for one layer, and the same of the model's padded attention on the same
sequences padded to seq ("padded": SDPA with a key mask, cuDNN's kernel on an H100 or H200,
which the padded step takes), and last one JSON object: the medians, the ratios, the
attention FLOPs (4 x T x seq-ish products, counted per sequence) as TFLOP/s, and the bytes the
forward and backward must move (q, k, v, o, do read and dq, dk, dv written, and the forward's
writes) at the device's bandwidth (`--peak-gbps`, by default the datasheet's for a known GPU,
bench/common.py's PEAK_GBPS). On a CPU it runs under
Triton's interpreter (TRITON_INTERPRET=1) for a check of the script, not a measurement.

    python bench/attention_kernel.py --count

counts instead, with no GPU (Triton installed, not interpreting): each kernel compiled for
sm_90 in each autotuned configuration, aligned as launches are, its SASS instructions a
program (every block of its static loops counted: an upper bound for short sequences) times
the programs the batch launches, at an H200's issue rate (132 SMs x 128 lanes x 1.98 GHz =
33.4 T instructions/s, bench/kernel_census.py's), against the bytes at --peak-gbps (an H200's
4,800 by default); for the
whole model's layers. A count, not a measurement: the matrix units, the memory latency and
the occupancy are not in it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from bertforge import kernels
from bertforge.model import BertConfig, Packed, attend, flash_varlen_available


def lengths_of(batch: int, seq: int, rng: np.random.Generator) -> list[int]:
    """One sequence in ten of a random length in [2, seq], the others seq long."""
    short = rng.random(batch) < 0.1
    return [int(rng.integers(2, seq + 1)) if s else seq for s in short]


def signature(fn) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """A kernel's tensor and scalar arguments' types for a bf16 step (constexprs left out)."""
    kinds = {"cu_ptr": "*i32", "seed_ptr": "*i64", "lse_ptr": "*fp32", "delta_ptr": "*fp32",
             "mask_ptr": "*u8", "scale": "fp32", "softmax_scale": "fp32",
             "keep_scale": "fp32", "heads": "i32"}  # fmt: skip
    return {
        name: kinds.get(name, "i32" if name.endswith("_stride") else "*bf16")
        for name in fn.arg_names
        if name.endswith(("_ptr", "_stride")) or name in kinds
    }


def bytes_moved(t: int, heads: int, head: int, size: int, block_n: int, dropout: bool):  # type: ignore[no-untyped-def]
    """{"fwd", "fwd_bwd": bytes one layer's attention must move} for t tokens: forward q, k, v
    read, o and lse written; backward q, k, v, o, do, lse read, the row sums written and read,
    dq, dk, dv written; with dropout the bits (a byte per row and eight keys of a sequence's
    block_n), written once and read by both backward kernels. size: bytes an element."""
    rows = t * heads * head * size  # one [T, heads, head] tensor
    bits = t * heads * block_n // 8 if dropout else 0
    return {"fwd": 4 * rows + 4 * t * heads + bits,
            "fwd_bwd": 12 * rows + 4 * 4 * t * heads + 3 * bits}  # fmt: skip


def count(args: argparse.Namespace) -> dict[str, object]:
    """Each kernel's configuration with the fewest instructions for the batch, its floor by
    instructions, and the whole step's by instructions and by bytes (the module docstring)."""
    from common import DEFAULT_GBPS, sm90_sass  # bench/common.py, beside this file

    c = BertConfig.preset(args.model_size, 64)
    heads, layers = c.num_attention_heads, c.num_hidden_layers
    lengths = lengths_of(args.batch_size, args.seq_len, np.random.default_rng(0))
    head = c.hidden_size // heads
    # the constexprs the op launches a bf16 step's kernels with
    q = torch.empty(0, heads, head, dtype=torch.bfloat16)
    given = kernels._attention_args(q, args.seq_len, args.dropout)
    constants = {k: given[k] for k in ("drop", "head", "block_n", "dropout", "precision")}
    tuners = {
        "forward": (kernels._attention_forward_kernel, "block_m"),
        "dq": (kernels._attention_dq_kernel, "block_m"),
        "dk_dv": (kernels._attention_dkdv_kernel, "block_k"),
    }
    got: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (tuner, block) in tuners.items():
            for config in tuner.configs:
                given = constants | config.kwargs
                types = signature(tuner.fn) | dict.fromkeys(given, "constexpr")
                opcodes = sm90_sass(
                    tuner.fn, types, given, config.num_warps, Path(tmp), aligned=True
                )
                rows = config.kwargs[block]
                programs = heads * sum(math.ceil(n / rows) for n in lengths)
                lanes = len(opcodes) * config.num_warps * 32 * programs * layers
                ms = lanes / (args.issue_tops * 1e12) * 1e3
                if name not in got or ms < got[name]["instructions_ms"]:
                    got[name] = {"block": rows, "warps": config.num_warps,
                                 "instructions_a_program": len(opcodes), "programs": programs,
                                 "instructions_ms": round(ms, 3)}  # fmt: skip
    t = sum(lengths)
    moved = bytes_moved(t, heads, head, 2, constants["block_n"], constants["dropout"])
    moved = moved["fwd_bwd"] * layers  # a step's
    return {
        "count": "sm_90",
        "model_size": args.model_size,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens": t,
        "dropout": args.dropout,
        "kernels": got,
        "instructions_ms_a_step": round(sum(k["instructions_ms"] for k in got.values()), 3),
        "gb_a_step": round(moved / 1e9, 3),
        "memory_ms_a_step": round(moved / (args.peak_gbps or DEFAULT_GBPS) / 1e6, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-size", default="base")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="calls per side per round")
    ap.add_argument(
        "--peak-gbps",
        type=float,
        default=None,
        help="memory bandwidth, GB/s (default: a known GPU's, from its name; with --count an "
        "H200's)",
    )
    ap.add_argument("--count", action="store_true", help="count for sm_90 instead (no GPU)")
    ap.add_argument("--issue-tops", type=float, default=33.4, help="T instructions/s (H200)")
    args = ap.parse_args()
    if args.count:
        print(json.dumps(count(args)))
        return
    from common import kernel_device, ms_per_call  # bench/common.py, beside this file

    device, dtype = kernel_device(ap, args, "attention")
    c = BertConfig.preset(args.model_size, 64)
    heads, head = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    lengths = lengths_of(args.batch_size, args.seq_len, np.random.default_rng(0))
    t = sum(lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    layout = Packed(cu, positions, args.seq_len, flash_varlen_available(device))
    qkv = torch.randn(t, 3, heads, head, device=device, dtype=dtype, requires_grad=True)
    do = torch.randn(t, heads, head, device=device, dtype=dtype)
    p = args.dropout

    # the same sequences padded to seq, as the model's padded batches are: [B, S, 3, heads,
    # head] with a key mask (SDPA: cuDNN's attention on an H100 or H200)
    index = layout.padded_index()
    padded = layout.pad(qkv.detach(), index).requires_grad_()
    mask, padded_do = layout.key_mask(index), layout.pad(do, index)

    def theirs() -> torch.Tensor:
        return attend(*qkv.unbind(1), layout, p)

    def ours() -> torch.Tensor:
        return kernels.attention(*qkv.unbind(1), cu, args.seq_len, p)

    def padded_side() -> torch.Tensor:
        return attend(*padded.unbind(2), mask, p)

    with torch.no_grad():  # the same numbers without dropout (a wrong kernel is no benchmark)
        q, k, v = qkv.unbind(1)
        diff = attend(q, k, v, layout, 0.0) - kernels.attention(q, k, v, cu, args.seq_len, 0.0)
        diff = float(diff.abs().max())  # fmt: skip

    def timed(fn, leaf, grad, backward: bool) -> float:  # type: ignore[no-untyped-def]
        """ms per call over args.steps calls."""
        return ms_per_call(fn, args.steps, device, grad if backward else None, [leaf])

    sides = {
        "theirs": (theirs, qkv, do),
        "ours": (ours, qkv, do),
        "padded": (padded_side, padded, padded_do),
    }
    for side in sides.values():  # warm-up: compiles, autotunes
        timed(*side, True)
    times: dict[str, list[float]] = {f"{s}_{w}": [] for s in sides for w in ("fwd", "fwd_bwd")}
    for r in range(args.rounds):
        for name, side in sides.items():
            times[f"{name}_fwd"].append(timed(*side, False))
            times[f"{name}_fwd_bwd"].append(timed(*side, True))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} ms" for k, v in times.items()))
    ms = {k: statistics.median(v) for k, v in times.items()}
    # products: q k^T and p v forward; the backward recomputes q k^T (twice in ours: one
    # kernel for dq, one for dk and dv) and takes dp, dv, dq, dk; counted as flash does, once
    per_pair = 2 * head * heads  # multiply-adds of one (query, key) pair per product, x2 FLOPs
    pairs = sum(n * n for n in lengths)
    flops = {"fwd": 2 * per_pair * pairs, "fwd_bwd": 7 * per_pair * pairs}
    block_n = kernels._attention_args(qkv[:, 0], args.seq_len, p)["block_n"]
    moved = bytes_moved(t, heads, head, torch.finfo(dtype).bits // 8, block_n, p > 0)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_gbps": args.peak_gbps,
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
        "padded_ratio_fwd_bwd": round(ms["padded_fwd_bwd"] / ms["ours_fwd_bwd"], 3),
        **{f"ours_{w}_tflops": round(f / ms[f"ours_{w}"] / 1e9, 2) for w, f in flops.items()},
        **{f"{w}_gb": round(b / 1e9, 4) for w, b in moved.items()},
    }
    if args.peak_gbps:
        for w, b in moved.items():
            result[f"{w}_floor_ms"] = round(b / args.peak_gbps / 1e6, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
