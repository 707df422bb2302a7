"""The fused kernels inductor writes for a BERT training step on a GPU, counted on a CPU: the
bytes each moves, the SASS instructions each executes per element on sm_90 (H100, H200), and
from the two a floor on each kernel's time there.

    make bench-census   # .venv-census: torch 2.13.0 (CPU) with Triton 3.9.0, then the default run
    .venv-census/bin/python bench/kernel_census.py --layout padded --bandwidth-gbps 3350

Why: on the GPU, inductor's fused elementwise kernels took 13.9 ms of BERT-base's 44.7 ms
packed step (H200) and about as long on an H100, which has 30% less memory bandwidth: so they
are not limited by memory traffic alone. This says what does limit them, and so what custom
kernels could win, before a GPU measures it (`bench/gpu_round.sh bandwidth` and `elementwise`).

How: inductor's Triton backend for a CPU generates the step's kernels, the same generator and
fusion decisions as for CUDA (mix-order reductions, which the CPU backend leaves out, are let
in, as on CUDA). The kernels are captured instead of compiled, and the step runs with kernels
that do nothing (the matmuls run; every value is garbage). The model is compiled as the
trainer compiles it on CUDA: bf16 autocast, torch's dropout, packed batches through an opaque
op standing for the flash kernel (padded: for scaled_dot_product_attention), whose time is not
counted here, nor the matmuls', nor the optimizer's. For each kernel call of one step:
- bytes: inductor's own count of the bytes the kernel must move (`kernel_num_gb`, the figure
  of its bandwidth profile);
- instructions: pointwise kernels and persistent reductions compiled by Triton for sm_90 with
  the config inductor would start from (XBLOCK 1024 on 4 warps; 8 rows on 8 warps), their
  static SASS count (no NOPs, branches, exits) over the elements each thread handles; a looped
  reduction's count depends on its loop trips, so it is counted by bytes only.
- floor: max(bytes / bandwidth, instructions / issue rate); the defaults are an H200's 4.8
  TB/s and 132 SMs x 128 lanes x 1.98 GHz = 33.4 T instructions/s.

An estimate, not a measurement: on the GPU inductor autotunes among several configs, sizes its
split reductions by the SM count, and a static count ignores that some instructions issue at
half or quarter rate (IMAD.HI, MUFU) and that a kernel of a few microseconds loses its launch
and tail. Written against torch 2.13's inductor (three of its internals are patched here); under
2.11 (the device machine's) it runs too, but mix-order reductions stay out (2.11 checks for a
CUDA device inline).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib.util
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import ToolchainOnly, sm90_sass
from train_throughput import VOCAB, bench_config, predictions, synthetic_shard

from bertforge import kernels as kernels_module
from bertforge import model as bert_model
from bertforge import train
from bertforge.batches import Order, PretrainingData, step_rows
from bertforge.masking import MaskSpec
from bertforge.model import BertForPretraining, Dropout
from bertforge.train import Objective, model_batch, objective_args

POINTWISE = {"XBLOCK": 1024}, 4
PERSISTENT_ROWS, PERSISTENT_WARPS = 8, 8
H200_SMS = 132  # a persistent kernel's programs on the GPU (kernels._programs)


@dataclass(frozen=True)
class Own:
    """One of bertforge's Triton kernels (kernels.py), which inductor calls as written and
    counts no bytes for: the [T, width] tensors it reads and writes; the parameters naming a
    row's width and a tile's (constants, or the width a runtime argument); fp32 bytes a row
    besides; rows of fp32 partial column sums each program writes (a persistent backward) or
    0; the runtime argument giving T. A matmul (`kernels.feed_forward`'s): `tensors` are what
    its epilogue reads and writes beyond a plain matmul's input and output (whose bytes the
    census leaves to the matmuls, as it does cuBLAS's), its partial sums a row per
    FFN_BLOCK_M rows, and its instructions are not counted (its time is the product's)."""

    tensors: tuple[str, ...]
    width: str
    tile: str
    row_bytes: int = 0
    partial_rows: int = 0
    mask_bits: int = 0  # bits an element of a stored dropout mask
    rows: str = "t"
    matmul: bool = False


OWN = {
    "_forward_kernel": Own(("h_ptr", "res_ptr", "y_ptr", "zhat_ptr"), "n", "n", 4, 0, 1),
    "_backward_kernel": Own(("dy_ptr", "zhat_ptr", "dres_ptr", "dh_ptr"), "n", "n", 4, 3, 1),
    "_gelu_forward_kernel": Own(("h_ptr", "y_ptr"), "f", "columns"),
    "_gelu_backward_kernel": Own(("dy_ptr", "h_ptr", "du_ptr"), "f", "columns", 0, 1),
    # GELU's output written beside the product; the product at GELU's input read beside it
    "_ffn_forward_kernel": Own(("y_ptr",), "n", "block_n", rows="m", matmul=True),
    "_ffn_backward_kernel": Own(("h_ptr",), "n", "block_n", 0, 1, rows="m", matmul=True),
}


@dataclass
class Kernel:
    name: str
    source: str
    calls: list[dict[str, int]] = field(default_factory=list)  # each call's xnumel, r0_numel...

    @property
    def gb(self) -> float | None:
        """Inductor's count of the bytes one call moves, in GB (None where it made none)."""
        found = re.search(r"'kernel_num_gb': ([0-9.e+-]+)", self.source)
        return float(found.group(1)) if found else None

    @property
    def own(self) -> Own | None:
        """What bertforge's own kernel this is (None: one of inductor's)."""
        return OWN.get(self.name)

    @functools.cached_property
    def constants(self) -> dict[str, Any]:
        """The constexpr values inductor compiled a user-defined kernel with."""
        found = re.search(r"'constants': (\{[^}]*\})", self.source)
        return ast.literal_eval(found.group(1)) if found else {}

    def total_gb(self) -> float | None:
        """The bytes all calls of one step move, in GB: inductor's count per call times the
        calls, or for bertforge's kernels the [T, width] tensors each reads and writes, the
        per-row vectors and the partial sums of the programs it would run on an H200."""
        own = self.own
        if own is None:
            return None if self.gb is None else self.gb * len(self.calls)
        sizes = {"bf16": 2, "fp16": 2, "fp32": 4}
        per_element = sum(sizes[self.signature[name].lstrip("*")] for name in own.tensors)
        total = 0
        for call in self.calls:
            t, width = call[own.rows], self.width(call)
            total += t * (width * per_element + own.row_bytes + width * own.mask_bits / 8)
            if own.matmul:
                programs = -(-t // kernels_module.FFN_BLOCK_M)
            else:
                blocks = -(-width // self.constants[own.tile])
                programs = min(-(-t // 2), H200_SMS * kernels_module.PROGRAMS_PER_SM // blocks)
            total += max(1, programs) * own.partial_rows * width * 4
        return total / 1e9

    def width(self, call: dict[str, int]) -> int:
        """A row's width for bertforge's kernel: a constant, or the call's argument."""
        assert self.own is not None
        return self.constants.get(self.own.width) or call[self.own.width]

    @functools.cached_property
    def signature(self) -> dict[str, str]:
        """The kernel's parameters and their Triton types, from inductor's triton_meta."""
        found = re.search(r"'signature': (\{[^}]*\})", self.source)
        assert found, self.name
        return ast.literal_eval(found.group(1))

    @property
    def kind(self) -> str:
        """poi (pointwise), per (persistent reduction) or red (looped reduction)."""
        return self.name.split("_")[1]

    def note_call(self, args: tuple[Any, ...]) -> None:
        if self.own:  # its runtime parameters first (then what its grid is made of)
            runtime = [name for name, kind in self.signature.items() if kind != "constexpr"]
            named = dict(zip(runtime, args, strict=False))
            self.calls.append({n: named[n] for n in (self.own.rows, self.own.width) if n in named})
            return
        # the wrapper passes every parameter but the block sizes (inductor's configs set those)
        names = [name for name in self.signature if not name.endswith("BLOCK")]
        numels = {n: a for n, a in zip(names, args, strict=False) if n.endswith("numel")}
        self.calls.append(numels)

    def elements(self, numels: dict[str, int]) -> int:
        """Elements a call works on: the product of its ranges (x, y; r0 of a reduction);
        rows x width for bertforge's kernels."""
        if self.own:
            return numels[self.own.rows] * self.width(numels)
        return int(np.prod(list(numels.values())))


class Capture:
    """Stands for a compiled kernel: notes each call's ranges and does nothing."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def run(self, *args: Any, **kwargs: Any) -> None:
        self.kernel.note_call(args)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def captured_kernels(own: bool = False) -> Iterator[list[Kernel]]:
    """Inductor generating Triton kernels for a CPU, each captured instead of compiled."""
    import torch._inductor.config as inductor
    import torch._inductor.scheduler as scheduler
    import torch.utils._triton as triton_utils
    from torch._inductor.async_compile import AsyncCompile

    kernels: list[Kernel] = []

    def capture(self: Any, kernel_name: str, source_code: str, device_str: str = "") -> Capture:
        kernels.append(Kernel(kernel_name, source_code))
        return Capture(kernels[-1])

    patches = [
        (inductor, "cpu_backend", "triton"),
        (inductor, "benchmark_kernel", True),  # kernel_num_gb in each kernel's metadata
        (triton_utils, "triton_hash_with_backend", lambda: "census"),
        (AsyncCompile, "triton", capture),
    ]
    if hasattr(scheduler, "_is_gpu_triton_backend"):  # torch 2.12 on: mix-order reductions
        patches.append((scheduler, "_is_gpu_triton_backend", lambda a, b: True))
    else:
        print("kernel_census: this torch's inductor keeps mix-order reductions to CUDA; left out")
    if own:  # user-defined kernels: inductor reads from their TTIR what they write
        from triton.runtime import driver

        patches.append((driver, "_active", ToolchainOnly()))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield kernels
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


@torch.library.custom_op("bertforge_census::attention", mutates_args=())
def opaque_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stands for the flash / cuDNN kernel: the output's shape, no work."""
    return torch.empty_like(q)


@opaque_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("bertforge_census::attention_backward", mutates_args=())
def opaque_attention_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> list[torch.Tensor]:
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]


@opaque_attention_backward.register_fake
def _(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]


def _attention_setup(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _attention_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(opaque_attention_backward(grad, *ctx.saved_tensors))


opaque_attention.register_autograd(_attention_backward, setup_context=_attention_setup)


def attention_as_on_cuda(packed: bool) -> None:
    """Route the model's attention as on CUDA, to the opaque op: packed batches to the flash
    varlen call ([T, nh, hs]), padded ones to scaled_dot_product_attention ([B, nh, S, hs],
    after the model's transposes)."""
    if packed:
        train.flash_varlen_available = lambda device: True
        bert_model.flash_varlen_fits = lambda dtype, head_size: True
        bert_model.flash_varlen = lambda q, k, v, layout, dropout: opaque_attention(q, k, v)
    else:
        bert_model.ops.attention_faster = lambda q, p: False
        torch.nn.functional.scaled_dot_product_attention = (
            lambda q, k, v, attn_mask=None, dropout_p=0.0: opaque_attention(q, k, v)
        )


def run_step(args: argparse.Namespace) -> tuple[list[Kernel], int]:
    """One compiled training step's kernels, and its real tokens."""
    packed = args.layout == "packed"
    attention_as_on_cuda(packed)
    model = BertForPretraining(bench_config(args))
    model.compile_regions = not args.whole_graph
    model.prune_last_layer = not args.full_last_layer
    own = args.fused_norm or args.fused_gelu or args.fused_ffn or args.fused_attention
    if own:
        kernels_module.usable = lambda x: True
    model.set_layer_options(**{name: getattr(args, name) for name in bert_model.LAYER_OPTIONS})
    for m in model.modules():
        if isinstance(m, Dropout):
            m.bits = args.draws  # False: torch's dropout, the CUDA default (ops.compiled_draws)
    (rows,) = synthetic_rows(args.seq_len, (args.batch_size,))
    with captured_kernels(own) as kernels:
        compiled_steps(model, [rows], packed)
    return [k for k in kernels if k.calls], int(rows.lengths.sum())


def synthetic_rows(seq: int, batches: tuple[int, ...]) -> list[Any]:
    """One step's rows for each batch size, from synthetic pretraining data at seq (masked as
    the data stage masks)."""
    p = predictions(seq)
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "shard-00000.bin"
        synthetic_shard(shard, max(batches), seq, p, np.random.default_rng(0))
        data = PretrainingData(str(shard))
        spec = MaskSpec(0.15, p, False, VOCAB, 103, np.zeros(VOCAB, dtype=bool))
        return [step_rows(data, Order(len(data), 1), spec, 1, 0, batch) for batch in batches]


def compiled_steps(model: BertForPretraining, batches: list[Any], packed: bool) -> None:
    """The model's training step compiled as the trainer compiles it on CUDA (bf16 autocast),
    forward and backward on each batch's rows in turn: a new batch size recompiles it, with
    dynamic sizes."""
    step = train.compile_step(Objective(model))
    for rows in batches:
        b, lengths, layout = model_batch(rows, torch.device("cpu"), packed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mlm, nsp, _ = step(*objective_args(b, lengths, layout))
        (mlm + nsp).backward()


def kernel_function(kernel: Kernel, workdir: Path) -> Any:
    """The @triton.jit function of a captured kernel's source, with CUDA's libdevice."""
    body = kernel.source[kernel.source.index("@triton.jit") :]
    body = body[: body.index("\ndef get_args")]
    path = workdir / f"{kernel.name}.py"
    path.write_text(
        "import triton\nimport triton.language as tl\n"
        "from triton.language import math as tl_math\n"
        "from triton.language.extra.cuda import libdevice\n"
        "from torch._inductor.runtime import triton_helpers\n\n" + body
    )
    spec = importlib.util.spec_from_file_location(kernel.name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, kernel.name)


def instructions_per_element(kernel: Kernel, workdir: Path) -> float | None:
    """Static sm_90 SASS instructions over elements per thread; None for a looped reduction."""
    import triton

    signature = kernel.signature
    if kernel.own:
        return None if kernel.own.matmul else own_instructions(kernel, workdir)
    if kernel.kind == "poi":
        constexprs, warps = POINTWISE
        per_thread = constexprs["XBLOCK"] / (warps * 32)
    elif kernel.kind == "per":
        columns = kernel.calls[0]["r0_numel"]
        constexprs = {"XBLOCK": PERSISTENT_ROWS, "R0_BLOCK": triton.next_power_of_2(columns)}
        warps = PERSISTENT_WARPS
        per_thread = PERSISTENT_ROWS * columns / (warps * 32)
    else:
        return None
    constexprs = {
        name: constexprs.get(name, 1) for name, kind in signature.items() if kind == "constexpr"
    }
    fn = kernel_function(kernel, workdir)
    return len(sm90_sass(fn, signature, constexprs, warps, workdir)) / per_thread


def own_instructions(kernel: Kernel, workdir: Path) -> float:
    """Static sm_90 SASS instructions per element of bertforge's kernel, compiled from
    bertforge.kernels with the constants it runs with, over the rows x hidden elements of one
    tile (the backward's loop body and its set-up counted once, as for one tile: an
    overestimate by the set-up's share); the fewest among the configurations its autotuner
    times on the GPU."""
    tuner = getattr(kernels_module, kernel.name)
    signature = {name: kernel.signature[name] for name in tuner.fn.arg_names}
    counts = []
    for config in tuner.configs:
        constants = {**kernel.constants, **config.kwargs}
        opcodes = sm90_sass(tuner.fn, signature, constants, config.num_warps, workdir)
        tile = constants[kernel.own.tile]  # type: ignore[union-attr]
        counts.append(len(opcodes) / (constants["rows_per"] * tile / (config.num_warps * 32)))
    return min(counts)


def floor_ms(gb: float, instructions: float | None, gbps: float, tops: float) -> dict[str, Any]:
    """A kernel's time floor from its bytes and instructions (None: bytes only)."""
    memory = gb / gbps * 1e3
    compute = None if instructions is None else instructions / (tops * 1e12) * 1e3
    bound = "memory" if compute is None or memory >= compute else "instructions"
    return {"memory_ms": memory, "instructions_ms": compute, "floor_ms": max(memory, compute or 0),
            "bound": bound}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-size", default="base")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--layout", choices=["packed", "padded"], default="packed")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--hidden-act", choices=list(bert_model.ACTIVATIONS), default="gelu")
    ap.add_argument(
        "--draws",
        action="store_true",
        help="dropout from bertforge's 15-bit draws (ops.dropout) instead of torch's",
    )
    ap.add_argument(
        "--whole-graph",
        action="store_true",
        help="every layer traced into the step's graph (the trainer compiles one layer as a "
        "nested region reused by all)",
    )
    ap.add_argument(
        "--fused-norm",
        action="store_true",
        help="each layer's bias + dropout + residual + LayerNorm as bertforge's Triton kernels "
        "(kernels.py, the trainer's --fused-norm) instead of inductor's fusion",
    )
    ap.add_argument(
        "--fused-gelu",
        action="store_true",
        help="the feed-forward's bias + GELU as bertforge's Triton kernels (--fused-gelu)",
    )
    ap.add_argument(
        "--fused-ffn",
        action="store_true",
        help="the feed-forward's GELU in the epilogues of bertforge's Triton matmuls "
        "(--fused-ffn): their bytes beyond a plain matmul's counted",
    )
    ap.add_argument(
        "--split-qkv",
        action="store_true",
        help="q, k and v as three matmuls on the qkv weight's blocks (the trainer's "
        "--split-qkv): their gradients are not concatenated",
    )
    ap.add_argument(
        "--fused-attention",
        action="store_true",
        help="packed attention as bertforge's Triton kernels (--fused-attention): traced and "
        "generated into the step as inductor does on a GPU, listed, not counted (bench/"
        "attention_kernel.py --count counts them)",
    )
    ap.add_argument(
        "--full-last-layer",
        action="store_true",
        help="the last layer computes every token's row (the trainer's --no-prune-last-layer) "
        "instead of the rows the heads read",
    )
    ap.add_argument("--bandwidth-gbps", type=float, default=4800.0, help="H200: 4,800 GB/s")
    ap.add_argument("--issue-tops", type=float, default=33.4, help="T instructions/s (H200: 33.4)")
    ap.add_argument("--top", type=int, default=16, help="kernels listed")
    args = ap.parse_args()

    kernels, tokens = run_step(args)
    uncounted = [k.name for k in kernels if k.total_gb() is None]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in kernels:
            gb = k.total_gb()
            if gb is None:
                continue
            per_element = instructions_per_element(k, Path(tmp))
            elements = sum(k.elements(ints) for ints in k.calls)
            instructions = None if per_element is None else per_element * elements
            est = floor_ms(gb, instructions, args.bandwidth_gbps, args.issue_tops)
            rows.append({"name": k.name, "calls": len(k.calls), "gb": gb,
                         "instructions_per_element": per_element, **est})  # fmt: skip
    rows.sort(key=lambda r: -r["floor_ms"])
    total = {key: sum(r[key] or 0 for r in rows) for key in ("gb", "memory_ms", "floor_ms")}
    excess = total["floor_ms"] - total["memory_ms"]
    print(
        f"{args.model_size}, seq {args.seq_len}, batch {args.batch_size}, {args.layout} "
        f"({tokens:,} tokens), dropout {args.dropout}{' (15-bit draws)' if args.draws else ''}, "
        f"{args.hidden_act}{', whole graph' if args.whole_graph else ''}"
        f"{', --fused-norm' if args.fused_norm else ''}"
        f"{', --fused-gelu' if args.fused_gelu else ''}"
        f"{', --fused-ffn' if args.fused_ffn else ''}"
        f"{', --split-qkv' if args.split_qkv else ''}"
        f"{', --fused-attention' if args.fused_attention else ''}"
        f"{', --full-last-layer' if args.full_last_layer else ''}"
        f": {len(rows)} kernels, {sum(r['calls'] for r in rows)} calls a step"
    )
    print(
        f"bytes {total['gb']:.2f} GB ({total['gb'] * 1e6 / tokens:.0f} KB a token): "
        f"{total['memory_ms']:.2f} ms at {args.bandwidth_gbps:,.0f} GB/s; floor with "
        f"instructions {total['floor_ms']:.2f} ms (+{excess:.2f} ms where instructions bound)"
    )
    if uncounted:
        print(f"left out, inductor counted no bytes for them: {', '.join(uncounted)}")
    print(f"{'floor ms':>9} {'memory':>7} {'instr':>7} {'GB':>7} {'SASS/el':>7} calls  kernel")
    for r in rows[: args.top]:
        per_element = r["instructions_per_element"]
        instr = "-" if r["instructions_ms"] is None else f"{r['instructions_ms']:.3f}"
        sass = "-" if per_element is None else f"{per_element:.1f}"
        print(
            f"{r['floor_ms']:9.3f} {r['memory_ms']:7.3f} {instr:>7} {r['gb']:7.3f} {sass:>7} "
            f"{r['calls']:5d}  {r['name']}"
        )
    print(json.dumps({
        "model_size": args.model_size, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "layout": args.layout, "dropout": args.dropout, "draws": args.draws,
        "hidden_act": args.hidden_act, "whole_graph": args.whole_graph,
        "fused_norm": args.fused_norm, "fused_gelu": args.fused_gelu, "fused_ffn": args.fused_ffn,
        "split_qkv": args.split_qkv,
        "fused_attention": args.fused_attention, "full_last_layer": args.full_last_layer,
        "tokens": tokens, "torch": torch.__version__, "bandwidth_gbps": args.bandwidth_gbps,
        "issue_tops": args.issue_tops, "gb": round(total["gb"], 3), "uncounted": uncounted,
        "memory_ms": round(total["memory_ms"], 3), "floor_ms": round(total["floor_ms"], 3),
        "kernels": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                    for r in rows],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
