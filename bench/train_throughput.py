"""Training throughput: bertforge's train step against the usual stack, interleaved in one process.

bertforge: BertForPretraining (padded and/or packed batches, --layouts, each measured on its own
model and optimizer in the same interleaving; MLM head at masked positions, vocab padded to 64)
fed by its real loader (a native shard, dynamic masking, background
prefetch), fused AdamW, the trainer's own forward_backward and update. Peer: transformers'
BertForPreTraining with its default attention, torch.optim.AdamW, autocast, MLM logits over
every position, batches already on the device. Blocks of steps alternate so machine drift
affects both alike; a block is timed as a whole, with no device sync between its steps, as
both training loops run (bertforge's trainer reads its step sums back every READ_EVERY
steps, the block length).

Tokens are real tokens (padding excluded). Instance lengths follow the data stage's shape: 90%
near max length, 10% short (Google's short_seq_prob). MFU uses training FLOPs per token =
6 x non-embedding parameters + 12 x layers x hidden x seq + the MLM head at masked positions
(`BertConfig.training_flops_per_token`, the figure `bertforge train` logs as MFU), against the
device's dense bf16/fp16 peak (`train.PEAK_HALF_FLOPS`: 989 TFLOP/s for an H100 SXM). That
counts every token's rows in the last layer, which bertforge's step computes at the rows the
heads read only (`BertForPretraining.prune_last_layer`; '+fulllast' computes them all):
mfu_executed leaves out the FLOPs it skips (`BertConfig.pruned_flops_per_token`).

Peak memory (GiB): on CUDA, torch's max_memory_allocated during a side's blocks (with every
side's model resident); on a CPU, which keeps no such count, a side's weights, gradients and
optimizer state (`resident_bytes`) plus the most that one step allocates beyond them, from
the allocations torch's profiler records (`step_peak_bytes`).

    python bench/train_throughput.py --model-size mini --seq-len 128 --batch-size 32 --device cpu
    python bench/train_throughput.py --model-size base --batch-size 256 --compile \
        --layouts padded,packed
    python bench/train_throughput.py --compile both   # compiled and eager, interleaved
    python bench/train_throughput.py --compile --compiled-dropout both   # dropout's draws
    python bench/train_throughput.py --compile --dropout 0 --hidden-act relu   # their floor

The last line printed is a JSON object with the figures: the fastest layout's as
bertforge_tokens_per_s / ratio / mfu, each layout's under "layouts".
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import itertools
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertforge import kernels
from bertforge.batches import IGNORE, Order, PretrainingData, prefetcher, step_rows, to_tensors
from bertforge.config import TrainConfig
from bertforge.distributed import Dist
from bertforge.malloc import keep_freed_memory
from bertforge.masking import MaskSpec
from bertforge.model import ACTIVATIONS, BertConfig, BertForPretraining, Dropout
from bertforge.shards import record_dtype, write_shard
from bertforge.train import (
    READ_EVERY,
    FlopsMeter,
    Ledger,
    Objective,
    autocast_to,
    device_skip,
    forward_backward,
    make_optimizer,
    quiet_inductor_notes,
    resolve_precision,
    root_cause,
    update,
)

VOCAB = 30522


def synthetic_shard(path: Path, n: int, seq: int, p: int, rng: np.random.Generator) -> None:
    rec = np.zeros(n, dtype=record_dtype(VOCAB, seq, p, static_masking=False))
    short = rng.random(n) < 0.1
    lengths = np.where(short, rng.integers(8, seq + 1, n), rng.integers(seq - 12, seq + 1, n))
    ids = rng.integers(1000, VOCAB, (n, seq))
    ids[np.arange(seq)[None, :] >= lengths[:, None]] = 0
    sep_a = np.maximum(2, lengths // 2)
    ids[:, 0] = 101
    ids[np.arange(n), sep_a] = 102
    ids[np.arange(n), lengths - 1] = 102
    rec["input_ids"], rec["length"], rec["sep_a"] = ids, lengths, sep_a
    rec["next_sentence_label"] = rng.integers(0, 2, n)
    with open(path, "wb") as f:
        write_shard(f, rec, {"max_seq_length": seq, "max_predictions_per_seq": p})


def predictions(seq: int) -> int:
    """max_predictions_per_seq of the synthetic data: 15% of the length, as Google's scripts."""
    return max(1, round(seq * 0.15))


def synthetic_data(folder: Path, seq: int, batch: int) -> tuple[PretrainingData, MaskSpec, Order]:
    """A shard of random instances in `folder` (8 batches, at least 4,096 instances), read as
    the trainer reads data, with dynamic masks over VOCAB and the order of seed 1."""
    shard = folder / "shard-00000.bin"
    p = predictions(seq)
    synthetic_shard(shard, max(4096, batch * 8), seq, p, np.random.default_rng(0))
    data = PretrainingData(str(shard))
    spec = MaskSpec(0.15, p, False, VOCAB, 103, np.zeros(VOCAB, dtype=bool))
    return data, spec, Order(len(data), 1)


def host_sized(config: BertConfig) -> BertConfig:
    """The model's layers and tensors at hidden 8 (2 heads, feed-forward 16): a step or an
    update of it is mostly the host's work (Python, dispatch, launches)."""
    return dataclasses.replace(config, hidden_size=8, num_attention_heads=2, intermediate_size=16)


# What a side's name may add to its layout (padded, packed): see make_ours and the flags.
SUFFIXES = ("+whole", "+graphs", "+bits", "+torchdrop", "+eager", "+fusednorm", "+fusedgelu",
            "+fusedffn", "+fusedattn", "+flat", "+splitqkv", "+fulllast", "+thread")  # fmt: skip


# The side-name suffix of each layer option (model.LAYER_OPTIONS)
LAYER_SUFFIXES = {"fused_norm": "+fusednorm", "fused_gelu": "+fusedgelu",
                  "fused_ffn": "+fusedffn", "split_qkv": "+splitqkv",
                  "fused_attention": "+fusedattn"}  # fmt: skip


def named_sides(
    ap: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[dict[str, bool], list[str]]:
    """--sides: {side: compiled} and the loaders they read ("" the worker, "+thread"), each
    name checked (a layout, then known suffixes, each at most once; graphs compiled; the
    machine, as for every side: `check_sides`); padded sides first, as the flags' product
    orders them."""
    flags = ("--layouts", "--whole-graph", "--graphs", "--compiled-dropout", "--fused-norm",
             "--fused-gelu", "--fused-ffn", "--fused-attention", "--flat-optimizer", "--split-qkv",
             "--full-last-layer", "--loader")  # fmt: skip
    dests = {f: f[2:].replace("-", "_") for f in flags}
    given = [f for f, d in dests.items() if getattr(args, d) != ap.get_default(d)]
    if given:
        ap.error(f"--sides names every side in full; leave {', '.join(given)} out")
    names = [n.strip() for n in args.sides.split(",") if n.strip()]
    if not names or len(set(names)) < len(names):
        ap.error(f"--sides: {args.sides!r}; name each side once, comma-separated")
    compiled_of = {}
    for name in sorted(names, key=lambda n: not n.startswith("padded")):
        layout = next((k for k in ("padded", "packed") if name.startswith(k)), None)
        rest = re.findall(r"\+[a-z]+", name[len(layout or "") :])
        if layout is None or "".join(rest) != name[len(layout) :] or len(set(rest)) < len(rest):
            ap.error(f"--sides: {name!r}; a side is padded or packed and then any of "
                     f"{' '.join(SUFFIXES)}, each once")  # fmt: skip
        if unknown := [x for x in rest if x not in SUFFIXES]:
            ap.error(f"--sides: {name!r}: {', '.join(unknown)} is not one of {' '.join(SUFFIXES)}")
        compiled = args.compile != "no" and "+eager" not in rest
        if not compiled and {"+graphs", "+whole", "+bits", "+torchdrop"} & set(rest):
            ap.error(f"--sides: {name!r}: graphs, +whole and the dropout choice are for "
                     "compiled sides (--compile)")  # fmt: skip
        compiled_of[name] = compiled
    loaders = sorted({"+thread" if "+thread" in name else "" for name in names})
    return compiled_of, loaders


def check_sides(ap: argparse.ArgumentParser, args: argparse.Namespace, sides: list[str]) -> None:
    """What bertforge's sides, named by the variant flags or by --sides, need of the machine
    and the batch: the fused Triton kernels run on CUDA with Triton only, and the attention
    kernel takes packed batches of sequences up to kernels.ATTENTION_MAX_LEN tokens."""
    fused = [side for side in sides if re.search(r"\+fused(norm|gelu|ffn|attn)", side)]
    if fused and not (args.device == "cuda" and kernels.available()):
        ap.error(f"{', '.join(fused)}: the fused kernels (--fused-norm, --fused-gelu, "
                 "--fused-ffn, --fused-attention, +fusednorm, +fusedgelu, +fusedffn, "
                 "+fusedattn) run on CUDA with Triton only")  # fmt: skip
    attention = [side for side in sides if "+fusedattn" in side]
    if [s for s in attention if not s.startswith("packed")] or (
        attention and args.seq_len > kernels.ATTENTION_MAX_LEN
    ):
        ap.error(f"{', '.join(attention)}: the attention kernel (--fused-attention, "
                 f"+fusedattn) takes packed sides of up to {kernels.ATTENTION_MAX_LEN} tokens "
                 f"(--seq-len {args.seq_len})")  # fmt: skip


def bench_config(args: argparse.Namespace, host: bool = False) -> BertConfig:
    """The benchmarked model: the preset at VOCAB with the run's dropout and activation (with
    `host`, --host, its layers and tensors at hidden 8)."""
    config = BertConfig.preset(
        args.model_size,
        VOCAB,
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout,
        hidden_act=args.hidden_act,
        max_position_embeddings=max(512, args.seq_len),
    )
    return host_sized(config) if host else config


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


KERNEL_KINDS = (  # (kind, substrings of kernel names), first match wins
    ("attention", ("fmha", "flash", "attention", "attn")),  # bertforge's _attention_* too
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_", "sm80_", "mm_", "_mm", "matmul")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "norm_kernel")),
    # inductor's kernels, and bertforge's elementwise ones (kernels.fused_norm, bias_gelu)
    ("compiled fused", ("triton_", "_forward_kernel", "_backward_kernel")),
    ("copy/cast", ("copy", "cast", "fill", "memcpy", "memset")),
)


def kernel_kind(name: str) -> str:
    """A profiled kernel's kind (KERNEL_KINDS), "other" where none matches."""
    name = name.lower()
    return next((k for k, subs in KERNEL_KINDS if any(x in name for x in subs)), "other")


# Host calls that can hold the host back (a wait for the device, a pageable copy, a fresh
# allocation) or that launch work, matched in lower case; counted per step by `host_calls`.
# The waits (WAITS) are named with the op that made them.
WAITS = ("synchronize", "aten::item", "aten::_local_scalar_dense", "cudamemcpy")
HOST_CALLS = (*WAITS, "cudahostalloc", "cudamalloc", "cudafree", "launchkernel")


def host_calls(events: Any, n: int) -> dict[str, list[float]]:
    """{call: [calls per step, host ms per step]} of the HOST_CALLS among a profile's events
    (each event, not averages): where the host's time goes when the device waits for it. A
    wait is named with the op that made it, the nearest enclosing event that is not a wait
    ("aten::item < aten::_fused_adamw_"): what to remove for the host to run ahead."""
    calls: dict[str, list[float]] = {}

    def matches(e: Any, names: tuple[str, ...]) -> bool:
        return any(x in e.name.lower() for x in names)

    for e in events:
        if e.device_type.name != "CPU" or not matches(e, HOST_CALLS):
            continue
        key = e.name
        if matches(e, WAITS):
            parent = e.cpu_parent
            while parent is not None and matches(parent, WAITS):
                parent = parent.cpu_parent
            key = e.name if parent is None else f"{e.name} < {parent.name}"
        count, ms = calls.get(key, [0.0, 0.0])
        calls[key] = [count + 1 / n, ms + e.self_cpu_time_total / n / 1000]
    rounded = {k: [round(c, 2), round(ms, 3)] for k, (c, ms) in calls.items()}
    return dict(sorted(rounded.items(), key=lambda kv: -kv[1][1]))


def profile(step: Any, n: int, device: torch.device, table: str | None) -> dict[str, Any]:
    """Device time of n steps by kind of kernel (shares), and the top kernels printed; with
    the host's blocking and launching calls per step (`host_calls`)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with without_probe_lines(), torch_profile(activities=activities) as prof:
        for _ in range(n):
            step(False)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if e.device_type.name == device.type.upper()]

    def own(e: Any) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    times: dict[str, float] = {}
    for e in events:
        kind = kernel_kind(e.key)
        times[kind] = times.get(kind, 0.0) + own(e)
    total = sum(times.values()) or 1.0
    text = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=100)
    if table:
        Path(table).write_text(text)
    top = sorted(events, key=lambda e: -own(e))[:15]
    print(f"{device.type} time per step: {total / n / 1000:.2f} ms")
    for e in top:
        share = own(e) / total
        print(f"  {share:6.1%} {e.count // n:4d}x  {e.key[:100]}")
    averages = prof.key_averages()
    host = host_calls(prof.events(), n)
    host_ms = sum(e.self_cpu_time_total for e in averages if e.device_type.name == "CPU")
    print(f"host time per step: {host_ms / n / 1000:.2f} ms; launches and blocking calls:")
    for name, (count, ms) in host.items():
        print(f"  {count:8.1f}x {ms:8.3f} ms  {name[:90]}")
    shares = {k: round(v / total, 4) for k, v in sorted(times.items(), key=lambda kv: -kv[1])}
    return {"device_time_shares": shares, "host_calls": host}


@contextlib.contextmanager
def without_probe_lines() -> Iterator[None]:
    """Run the block with the process's stderr (file descriptor 2) going to a temporary file,
    then write back all but the "USDT:" lines: kineto's tracing probes, which some torch builds
    (2.13's CPU wheel) print at every profiler start and stop, from C++, bypassing Python."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as caught:
            os.dup2(caught.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                caught.seek(0)
                lines = caught.read().splitlines(keepends=True)
                kept = b"".join(line for line in lines if not line.startswith(b"USDT:"))
                while kept:
                    kept = kept[os.write(2, kept) :]
    finally:
        os.close(saved)


def resident_bytes(*holders: Any) -> int:
    """The bytes of the CPU tensors that modules and optimizers hold between steps: weights,
    buffers, gradients that stay (FlatAdamW's), optimizer state; memory that several tensors
    share (views, FlatAdamW's buffers) counted once."""
    seen: set[int] = set()
    spans: list[tuple[int, int]] = []

    def take(x: Any, depth: int = 0) -> None:
        if isinstance(x, torch.Tensor):
            if x.device.type == "cpu" and id(x) not in seen:
                seen.add(id(x))
                storage = x.untyped_storage()
                spans.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
                take(x.grad, depth)
        elif depth > 6 or x is None or isinstance(x, (str, int, float, bool)):
            return
        elif isinstance(x, torch.nn.Module):
            for t in itertools.chain(x.parameters(), x.buffers()):
                take(t, depth + 1)
        elif isinstance(x, dict):
            for k, v in x.items():
                take(k, depth + 1)
                take(v, depth + 1)
        elif isinstance(x, (list, tuple)):
            for v in x:
                take(v, depth + 1)
        elif isinstance(x, torch.optim.Optimizer) or dataclasses.is_dataclass(x):
            take(vars(x), depth + 1)  # state, param_groups, FlatAdamW's flat buffers

    for holder in holders:
        take(holder)
    total, end = 0, 0
    for start, stop in sorted(spans):
        total += max(0, stop - max(start, end))
        end = max(end, stop)
    return total


def step_peak_bytes(step: Any) -> int | None:
    """The most bytes that one step (not measured) holds at once on the CPU beyond what was
    allocated before it: its activations, the gradients it makes and whatever else torch's
    CPU allocator gives it, from the allocations and frees the profiler records (None where
    this torch does not expose them). Memory freed in the step but allocated before it is not
    subtracted (the profiler does not know its size), and libraries' own scratch memory
    (oneDNN's) is not seen: an upper bound on what torch allocates, a lower one on the RSS."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with (
        without_probe_lines(),
        torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        step(False)
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    changes = sorted(
        (e.start_ns(), e.nbytes())
        for e in results.events()
        if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU"
    )
    held = peak = 0
    for _, change in changes:
        held += change
        peak = max(peak, held)
    return peak


def cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def set_inductor(key: str, value: Any) -> None:
    """torch._inductor.config.KEY = value, KEY dotted for nested settings (triton.cudagraphs)."""
    import torch._inductor.config as config

    *path, name = key.split(".")
    target: Any = config
    for part in path:
        target = getattr(target, part)
    getattr(target, name)  # AttributeError for a setting that does not exist
    setattr(target, name, value)


def variant_flag(ap: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A flag that measures bertforge's sides without (no), with (yes) or both ways."""
    ap.add_argument(flag, choices=["no", "yes", "both"], default="no", help=help)


def with_without(choice: str, suffix: str) -> list[str]:
    """The side-name suffixes a variant_flag's choice measures."""
    return {"no": [""], "yes": [suffix], "both": ["", suffix]}[choice]


def arguments() -> argparse.ArgumentParser:
    """The command line (checked further in `main` and `named_sides`)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-size", default="mini")
    ap.add_argument(
        "--host",
        action="store_true",
        help="the model size's layers and tensors at hidden 8 (2 heads, feed-forward 16): the "
        "step's arithmetic shrinks to little, what is left is mostly the host's work (Python, "
        "launches, the loader); for comparing what sides cost the host",
    )
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--precision",
        default="auto",
        help="auto, fp32, bf16 or fp16 (train's --precision), for every side; a list such as "
        "fp32,bf16 measures each side, the peer too, at each ('@bf16' in its name), interleaved",
    )
    ap.add_argument("--steps", type=int, default=24, help="measured steps per side")
    ap.add_argument("--block", type=int, default=READ_EVERY, help="steps per alternation block")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--compile",
        nargs="?",
        const="yes",
        default="no",
        choices=["no", "yes", "both"],
        help="torch.compile bertforge's step; both measures each layout compiled and eager "
        "('+eager' in its name), interleaved",
    )
    ap.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode (e.g. max-autotune-no-cudagraphs); implies --compile",
    )
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after measuring, profile N of bertforge's steps and print where device time goes",
    )
    ap.add_argument("--profile-table", default=None, help="also write the full kernel table here")
    ap.add_argument(
        "--layouts",
        default="padded",
        help="bertforge's batch layouts to measure, interleaved: padded, packed or padded,packed "
        "(each its own model and optimizer; the fastest is the headline figure)",
    )
    variant_flag(
        ap,
        "--whole-graph",
        "with --compile: trace every layer into the step's graph instead of compiling one "
        "layer as a nested region reused by all (the model's default); both measures each "
        "layout both ways ('+whole' in its name)",
    )
    ap.add_argument(
        "--inductor",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set torch._inductor.config.KEY (a Python literal) for this run, e.g. "
        "coordinate_descent_tuning=True; repeatable",
    )
    variant_flag(
        ap,
        "--graphs",
        "CUDA graphs (torch.compile mode reduce-overhead; packed batches rounded up to "
        "a multiple of seq x batch/64 tokens by filler, so a few shapes are recorded); both: "
        "with and without ('+graphs' in the name), interleaved",
    )
    ap.add_argument(
        "--compiled-dropout",
        choices=["auto", "bits", "torch", "both"],
        default="auto",
        help="dropout of compiled sides: bertforge's 15-bit draws (one Philox call per four "
        "elements; '+bits' in the name), torch's (inductor's random number per element; "
        "'+torchdrop'), both, interleaved, or auto: the model's default (the draws on a CPU, "
        "torch's on CUDA)",
    )
    variant_flag(
        ap,
        "--fused-norm",
        "bertforge's sides with each layer's bias + dropout + residual + LayerNorm as one "
        "Triton kernel each way (kernels.py, the trainer's --fused-norm; '+fusednorm' in the "
        "name; CUDA with Triton); both: with and without, interleaved",
    )
    variant_flag(
        ap,
        "--fused-gelu",
        "bertforge's sides with each layer's feed-forward bias + GELU as one Triton kernel "
        "each way (kernels.bias_gelu, the trainer's --fused-gelu; '+fusedgelu' in the name; "
        "CUDA with Triton); both: with and without, interleaved",
    )
    variant_flag(
        ap,
        "--fused-ffn",
        "bertforge's sides with each layer's feed-forward GELU in the epilogues of Triton "
        "matmuls (kernels.feed_forward, the trainer's --fused-ffn; '+fusedffn' in the name; "
        "CUDA with Triton); both: with and without, interleaved",
    )
    variant_flag(
        ap,
        "--fused-attention",
        "bertforge's packed sides with attention as its Triton kernels (kernels.attention, the "
        "trainer's --fused-attention; '+fusedattn' in the name; CUDA with Triton, seq up to "
        "128) in place of flash varlen; both: with and without, interleaved",
    )
    variant_flag(
        ap,
        "--split-qkv",
        "bertforge's sides with q, k and v as three matmuls on each layer's qkv weight (the "
        "trainer's --split-qkv: their gradients are not concatenated for the backward; "
        "'+splitqkv' in the name); both: with and without, interleaved",
    )
    variant_flag(
        ap,
        "--full-last-layer",
        "bertforge's sides with the last layer computing every token's row (the trainer's "
        "--no-prune-last-layer; '+fulllast' in the name) instead of only the rows the heads "
        "read (each sequence's first token and masked positions: the default); both: with "
        "and without, interleaved",
    )
    ap.add_argument(
        "--sides",
        default=None,
        help="bertforge's sides by name, comma-separated, instead of every combination of the "
        "variant flags: a layout (padded, packed) and any of " + " ".join(SUFFIXES) + " (e.g. "
        "packed,packed+fusednorm+fusedgelu+flat+splitqkv+graphs: the plain step and every "
        "option together, interleaved; the variant flags are then left at no)",
    )
    ap.add_argument(
        "--loader",
        choices=["process", "thread", "both"],
        default="process",
        help="where bertforge's sides' batches are made: the trainer's worker process (its "
        "default on Linux), a thread of the benchmark's ('+thread' in the name; sharing its "
        "GIL), or both, interleaved",
    )
    variant_flag(
        ap,
        "--flat-optimizer",
        "bertforge's sides with the trainer's --flat-optimizer (optim.FlatAdamW: one buffer "
        "per parameter group, gradients accumulated into it; '+flat' in the name); both: with "
        "and without, interleaved",
    )
    ap.add_argument(
        "--malloc",
        choices=["auto", "tuned", "default"],
        default="auto",
        help="glibc malloc set to keep freed memory (malloc.py; process-wide, so the peer gets "
        "it too) or left at its defaults; auto: as `bertforge train` does, tuned on a CPU only",
    )
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument(
        "--dropout",
        type=float,
        default=0.1,
        help="hidden and attention dropout of every side (BERT's 0.1; 0 shows what it costs)",
    )
    ap.add_argument(
        "--hidden-act",
        choices=list(ACTIVATIONS),
        default="gelu",
        help="the feed-forward activation of every side (BERT's gelu, erf form; gelu_new is the "
        "tanh form Google's TF code computes, relu the cheapest: what GELU's arithmetic costs)",
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s for MFU where bertforge's table does not know it",
    )
    return ap


def main() -> None:
    ap = arguments()
    args = ap.parse_args()
    for setting in args.inductor:
        key, _, value = setting.partition("=")
        try:
            set_inductor(key, ast.literal_eval(value))
        except (ValueError, SyntaxError, AttributeError) as e:
            ap.error(f"--inductor {setting!r}: {e}")
    if args.compile == "no" and args.compile_mode is not None:
        args.compile = "yes"
    if args.compile == "no" and args.whole_graph != "no":
        ap.error("--whole-graph: the layers' compile regions only exist with --compile")
    names = args.precision.split(",")
    if (
        not names
        or not set(names) <= {"auto", "fp32", "bf16", "fp16"}
        or len(set(names)) < len(names)
    ):
        ap.error(f"--precision: {args.precision!r}; use auto, fp32, bf16, fp16 or a list of them")
    kinds = args.layouts.split(",")
    if not kinds or not set(kinds) <= {"padded", "packed"}:
        ap.error(f"--layouts: {args.layouts!r}; use padded, packed or padded,packed")
    # Padded sides compile first: after a packed graph (1-D inputs) dynamo would compile the
    # padded step with dynamic sizes ("automatic dynamic"), not the static graph that
    # `bertforge train` compiles (train.compile_step starts from a clean slate).
    kinds.sort(key=lambda kind: kind != "padded")
    if args.compile == "no" and args.graphs != "no":
        ap.error("--graphs: CUDA graphs come with --compile (mode reduce-overhead)")
    loaders = {"process": [""], "thread": ["+thread"], "both": ["", "+thread"]}[args.loader]
    fuseds = [
        norm + gelu + ffn + attn + flat + qkv + last + loader
        for norm in with_without(args.fused_norm, "+fusednorm")
        for gelu in with_without(args.fused_gelu, "+fusedgelu")
        for ffn in with_without(args.fused_ffn, "+fusedffn")
        for attn in with_without(args.fused_attention, "+fusedattn")
        for flat in with_without(args.flat_optimizer, "+flat")
        for qkv in with_without(args.split_qkv, "+splitqkv")
        for last in with_without(args.full_last_layer, "+fulllast")
        for loader in loaders
    ]
    regions = with_without(args.whole_graph, "+whole")
    cuda_graphs = with_without(args.graphs, "+graphs")
    ways = {"no": [""], "yes": ["compiled"], "both": ["compiled", "+eager"]}[args.compile]
    drops = {"auto": [""], "bits": ["+bits"], "torch": ["+torchdrop"]}
    drops["both"] = drops["bits"] + drops["torch"]
    compiled_of = {  # side name -> whether its step is compiled
        kind + (region + graphs + drop if way == "compiled" else way) + fused: way == "compiled"
        for kind in kinds
        for fused in fuseds
        for way in ways
        for region in (regions if way == "compiled" else [""])
        for graphs in (cuda_graphs if way == "compiled" else [""])
        for drop in (drops[args.compiled_dropout] if way == "compiled" else [""])
    }
    if args.sides is not None:
        compiled_of, loaders = named_sides(ap, args)
    check_sides(ap, args, list(compiled_of))
    device = torch.device(args.device)
    malloc = args.malloc
    if malloc == "auto":
        malloc = "tuned" if device.type == "cpu" else "default"
    if malloc == "tuned" and not keep_freed_memory():
        malloc = "default (not glibc)"
    # with several precisions every side is measured at each, named side@precision
    at = {name: f"@{name}" if len(names) > 1 else "" for name in names}
    precision_of = {at[name]: resolve_precision(name, device) for name in names}
    compiled_of = {side + mark: on for side, on in compiled_of.items() for mark in precision_of}
    layouts = list(compiled_of)
    peers = [] if args.skip_peer else ["peer" + mark for mark in precision_of]

    def mark_of(side: str) -> str:
        return side[side.index("@") :] if "@" in side else ""

    def autocast_of(side: str) -> Any:
        return autocast_to(precision_of[mark_of(side)], device)

    seq, batch = args.seq_len, args.batch_size
    c = bench_config(args, args.host)
    d = Dist(0, 1, 0, device)

    tmp = tempfile.TemporaryDirectory()
    data, spec, order = synthetic_data(Path(tmp.name), seq, batch)
    total_steps = (args.warmup + args.steps + args.block) * len(layouts)
    made = {  # "" the worker process, "+thread" a thread: the sides' streams of batches
        loader: prefetcher(
            lambda s: step_rows(data, order, spec, 1, s, batch),
            0,
            10 * total_steps,
            process=loader == "",
        )
        for loader in loaders
    }
    feeds = {loader: iter(stream) for loader, stream in made.items()}
    sides = [*layouts, *peers]
    stats = {
        side: {"time": 0.0, "tokens": 0, "steps": 0, "wait": 0.0, "masked": 0} for side in sides
    }

    def make_ours(layout: str) -> Any:
        """The trainer's step for one layout ("padded" or "packed"; "+whole": no compile
        regions; "+graphs": CUDA graphs, packed batches rounded up by filler; "+bits" /
        "+torchdrop": the 15-bit draws / torch's dropout under torch.compile; "+eager": not
        compiled; "+fusednorm" / "+fusedgelu" / "+fusedattn": kernels.fused_norm / bias_gelu /
        attention in every layer; "+flat": optim.FlatAdamW; "+splitqkv": Layer.split_qkv;
        "+fulllast": the last layer computes every row (BertForPretraining.prune_last_layer);
        "+thread": batches from a thread), on its own model (same init) and optimizer: it
        reads nothing back unless the optimizer cannot skip a bad step on the device (then
        `update` does, as in the trainer)."""
        torch.manual_seed(0)
        model = BertForPretraining(c).to(device)
        variant = layout.split("@")[0]
        model.compile_regions = "+whole" not in variant
        model.prune_last_layer = "+fulllast" not in variant
        model.set_layer_options(**{name: s in variant for name, s in LAYER_SUFFIXES.items()})
        bits = True if "+bits" in variant else False if "+torchdrop" in variant else None
        for module in model.modules():
            if isinstance(module, Dropout):
                module.bits = bits
        flat = "+flat" in variant
        feed = feeds["+thread" if "+thread" in variant else ""]
        opt = make_optimizer(
            TrainConfig(data="-", output="-", learning_rate=1e-4, flat_optimizer=flat), model
        )
        precision = precision_of[mark_of(layout)]
        autocast = autocast_of(layout)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
        objective = Objective(model)
        compiled = compiled_of[layout]
        graphs = "+graphs" in variant
        mode = "reduce-overhead" if graphs else args.compile_mode
        if compiled:
            quiet_inductor_notes()
        forward = torch.compile(objective, mode=mode) if compiled else objective
        ledger = Ledger(device_skip(opt, scaler), 0)
        packed = layout.startswith("packed")
        own = stats[layout]

        def step(measure: bool) -> None:
            t0 = time.perf_counter()
            _, rows = next(feed)
            t1 = time.perf_counter()
            masked = int((rows.labels != IGNORE).sum())
            sums = forward_backward(
                forward,
                None,
                rows,
                batch,
                (masked, batch),
                d,
                autocast,
                scaler,
                packed,
                compiled,
                graphs,
            )
            update(model, opt, scaler, sums, 1.0, ledger)
            opt.zero_grad(set_to_none=True)
            if measure:
                own["wait"] += t1 - t0
                own["tokens"] += int(rows.lengths.sum())
                own["masked"] += masked
                own["steps"] += 1

        step.holds = (model, opt)  # type: ignore[attr-defined]
        return step

    steps = {layout: make_ours(layout) for layout in layouts}
    for peer in peers:  # none with --skip-peer
        steps[peer] = make_peer(
            c, data, order, spec, batch, seq, device, autocast_of(peer), stats[peer]
        )

    warmup = dict.fromkeys(sides, 0.0)  # includes torch.compile's compile time
    failed: dict[str, str] = {}  # side: why it stopped (the others go on)

    def run(side: str, what: Any) -> None:
        """what(), or the side dropped with its error printed: one side that cannot run (a
        compile or CUDA-graph failure, out of memory) leaves the others' figures."""
        try:
            what()
        except Exception as e:  # any failure of one side
            failed[side] = root_cause(e)
            print(f"side {side} failed, left out: {failed[side]}", flush=True)
            sides.remove(side)
            (layouts if side in layouts else peers).remove(side)
            del steps[side]
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def warm(side: str) -> None:
        t0 = time.perf_counter()
        steps[side](False)
        sync(device)
        warmup[side] += time.perf_counter() - t0

    for _ in range(args.warmup):
        for side in list(sides):
            run(side, lambda side=side: warm(side))
    # Peak memory: on CUDA, the most allocated during a side's blocks (every side's model
    # stays resident, so each figure includes the others'); on a CPU, the side's own
    # weights, gradients and optimizer state and the most one step allocates beyond them.
    mem = dict.fromkeys(sides, 0.0)

    def block(side: str) -> None:
        """A block of steps timed as a whole: like the training loops, no side waits for the
        device between its steps."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.block):
            steps[side](True)
        sync(device)
        stats[side]["time"] += time.perf_counter() - t0
        if device.type == "cuda":
            mem[side] = max(mem[side], torch.cuda.max_memory_allocated(device) / 2**30)

    rounds = 0
    while layouts and min(stats[side]["steps"] for side in layouts) < args.steps:
        for side in list(sides):
            run(side, lambda side=side: block(side))
        rounds += 1
        so_far = ", ".join(  # what a run cut short still leaves in its log
            f"{side} {stats[side]['tokens'] / stats[side]['time']:,.0f}"
            for side in sides
            if stats[side]["time"]
        )
        print(f"round {rounds}: tokens/s so far: {so_far}", flush=True)
    if device.type == "cpu":  # no allocator statistics: the profiler's record of one step
        for side in sides:
            beyond = step_peak_bytes(steps[side])
            if beyond is not None:
                mem[side] = (resident_bytes(*steps[side].holds) + beyond) / 2**30
    breakdown: dict[str, Any] = {}
    for layout in list(layouts) if args.profile else []:
        run(
            layout,
            lambda layout=layout: breakdown.__setitem__(
                layout, profile(steps[layout], args.profile, device, args.profile_table)
            ),
        )
    for stream in made.values():
        stream.close()
    tmp.cleanup()

    meters = {
        mark: FlopsMeter.of(c, seq, d, dtype, args.peak_tflops or None)
        for mark, dtype in precision_of.items()
    }

    def mfu(
        tokens_per_s: float, st: dict[str, Any], side: str, executed: bool = False
    ) -> float | None:
        """MFU at a side's speed, with the masked share of `st`'s tokens (as train logs it);
        `executed`: of the FLOPs the side's step does, without those its pruned last layer
        skips (`BertConfig.pruned_flops_per_token`)."""
        meter = meters[mark_of(side)]
        if meter is None:
            return None
        masked = st["masked"] / max(st["tokens"], 1)
        value = meter.mfu(tokens_per_s, masked)
        if executed and "+fulllast" not in side:
            read = st["steps"] * batch * (1 + predictions(seq)) / max(st["tokens"], 1)
            value *= 1 - c.pruned_flops_per_token(seq, read) / c.training_flops_per_token(
                seq, masked
            )
        return round(value, 4)

    if not layouts:
        print(json.dumps({"model_size": args.model_size, "failed": failed}))
        raise SystemExit("every bertforge side failed: " + "; ".join(failed))
    tps = {
        side: stats[side]["tokens"] / stats[side]["time"] for side in sides if stats[side]["steps"]
    }
    per_layout = {}
    for layout in layouts:
        st = stats[layout]
        peer_tps = tps.get("peer" + mark_of(layout))
        per_layout[layout] = {
            "compiled": compiled_of[layout],
            "tokens_per_s": round(tps[layout], 1),
            "ratio": round(tps[layout] / peer_tps, 3) if peer_tps else None,
            "step_ms": round(1000 * st["time"] / st["steps"], 2),
            "mfu": mfu(tps[layout], st, layout),
            "mfu_executed": mfu(tps[layout], st, layout, executed=True),
            "data_wait_share": round(st["wait"] / st["time"], 4),
            "peak_memory_gib": round(mem[layout], 3) if mem[layout] else None,
            "warmup_s": round(warmup[layout], 1),
            **(breakdown.get(layout) or {"device_time_shares": None}),
        }
    best = max(layouts, key=lambda layout: tps[layout])
    head = per_layout[best]
    st = stats[layouts[0]]
    peer = "peer" + mark_of(best)  # the headline's peer: the same precision
    peer_tps = tps.get(peer)
    result = {
        "model_size": args.model_size,
        "host": args.host,
        "seq_len": seq,
        "batch_size": batch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": ",".join(str(dtype).removeprefix("torch.") for dtype in precision_of.values()),
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "inductor": args.inductor,
        "whole_graph": args.whole_graph,
        "graphs": args.graphs,
        "fused_norm": args.fused_norm,
        "fused_gelu": args.fused_gelu,
        "fused_ffn": args.fused_ffn,
        "fused_attention": args.fused_attention,
        "flat_optimizer": args.flat_optimizer,
        "split_qkv": args.split_qkv,
        "full_last_layer": args.full_last_layer,
        "loader": args.loader,
        "sides": args.sides,
        "dropout": args.dropout,
        "compiled_dropout": args.compiled_dropout,
        "hidden_act": args.hidden_act,
        "malloc": malloc,
        "bertforge_layout": best,
        "bertforge_tokens_per_s": head["tokens_per_s"],
        "peer_tokens_per_s": round(peer_tps, 1) if peer_tps else None,
        "ratio": head["ratio"],
        "bertforge_step_ms": head["step_ms"],
        "peer_step_ms": (
            round(1000 * stats[peer]["time"] / stats[peer]["steps"], 2) if peer_tps else None
        ),
        "data_wait_share": head["data_wait_share"],
        "mfu": head["mfu"],
        "mfu_executed": head["mfu_executed"],
        "peer_mfu": mfu(peer_tps, st, peer) if peer_tps else None,
        "peak_memory_gib": {
            "ours": head["peak_memory_gib"],
            "peer": round(mem[peer], 3) if mem.get(peer) else None,
        },
        "padding_share": round(1 - st["tokens"] / (st["steps"] * batch * seq), 4),
        # with --graphs: how often inductor ran a graph without CUDA graphs (0: they all ran)
        "cudagraph_skips": cudagraph_skips() if any("+graphs" in x for x in layouts) else None,
        "layouts": per_layout,
        "failed": failed,
    }
    for layout, r in per_layout.items():
        print(
            f"bertforge {layout}: {r['tokens_per_s']:,.0f} tok/s ({r['step_ms']} ms/step), "
            f"ratio {r['ratio']}, mfu {r['mfu']}, data wait {r['data_wait_share']:.2%}, "
            f"warm-up {r['warmup_s']} s, peak memory {r['peak_memory_gib']} GiB"
        )
    for side in peers:
        if side in tps:
            peak = f"{mem[side]:.3f} GiB" if mem.get(side) else None
            print(f"{side}: {tps[side]:,.0f} tok/s, peak memory {peak}")
    print(json.dumps(result))


def make_peer(
    c: BertConfig,
    data: PretrainingData,
    order: Order,
    spec: MaskSpec,
    batch: int,
    seq: int,
    device: torch.device,
    autocast: Any,
    own: dict[str, Any],
) -> Any:
    """The usual stack's step: transformers' BertForPreTraining (MLM logits at every
    position), torch.optim.AdamW, autocast, clipping; its batches already on the device."""
    import transformers

    hf_cfg = transformers.BertConfig(**{k: v for k, v in c.to_dict().items()})
    peer = transformers.BertForPreTraining(hf_cfg).to(device)
    peer_opt = torch.optim.AdamW(peer.parameters(), lr=1e-4, weight_decay=0.01)
    batches = []
    for s in range(4):
        rows = step_rows(data, order, spec, 1, 1000 + s, batch)
        b = to_tensors(rows, device, trim=False)
        labels = torch.full_like(b["input_ids"], IGNORE)
        labels.scatter_(1, b["positions"], b["labels"])
        labels[:, 0] = IGNORE  # a slot's padding position 0 is never a real target
        mask = (torch.arange(seq, device=device)[None, :] < b["lengths"][:, None]).long()
        batches.append((b, labels, mask, int(rows.lengths.sum())))
    count = itertools.count()

    def step(measure: bool) -> None:
        b, labels, mask, tokens = batches[next(count) % len(batches)]
        with autocast:
            out = peer(
                input_ids=b["input_ids"],
                token_type_ids=b["token_type_ids"],
                attention_mask=mask,
                labels=labels,
                next_sentence_label=b["next_sentence"],
            )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        peer_opt.step()
        peer_opt.zero_grad(set_to_none=True)
        if measure:
            own["tokens"] += tokens
            own["steps"] += 1

    step.holds = (peer, peer_opt)  # type: ignore[attr-defined]
    return step


if __name__ == "__main__":
    main()
