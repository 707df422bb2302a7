"""bertforge's Triton kernels for the CUDA train step: two pairs (forward, backward), for
bias + dropout + residual + LayerNorm (`fused_norm`) and for bias + GELU (`bias_gelu`, whose
own docstring says why); the feed-forward's two matmuls with GELU in their epilogues
(`feed_forward`, one kernel each way beside cuBLAS's matmuls; its docstring says why);
attention of a packed batch whose sequences fit one tile
(`attention`, one kernel forward, two backward; its docstring says why); and AdamW's update of
a flat buffer (`adamw_`, for optim.FlatAdamW: torch's fused kernel caps the blocks of a
launch, its docstring says more).

Written here because these blocks are where inductor's kernels for BERT's step are furthest
from what they must move (bench/kernel_census.py, bench/RESULTS.md "Session 25" and "Session
26"): for `LayerNorm(residual + dropout(h + bias))`, in BERT-base's packed step on an H200,
inductor draws one Philox call per element in the forward (about 100 instructions an
element), takes three kernels for LayerNorm's backward inside the per-layer compile region,
and reduces the bias gradient in looped column reductions of its own. Here:

- forward, one kernel: reads h (the matmul's output without its bias) and the residual, writes
  the output and the normalized values (for the backward), a reciprocal deviation per row and
  the dropout mask as bits (one byte per Philox call: an eighth of a byte an element).
- backward, one persistent kernel: reads the incoming gradient, the normalized values and the
  mask bits, writes the gradients of the residual and of h, and sums the gradients of
  LayerNorm's weight and bias and of the matmul's bias over the rows it handles (one row of
  partial sums per program, added up by one small reduction after it). 8 bytes an element
  each way in bf16, and the mask's eighth. Storing the mask costs far less than drawing it
  again: 16 Philox instructions an element against 1/8 byte (sm_90, bench/RESULTS.md).
- dropout's random numbers: one Philox call (128 bits, `tl.randint4x`) per eight elements, 15
  bits an element, as bertforge's dropout on a CPU (`ops.dropout`): the hidden row is cut into
  four quarters, and the call for a pair of rows at quarter position j decides element j of
  each quarter of both rows. The drop probability is p rounded to a multiple of 1/32768
  (`ops.drop_levels`; 0.1 becomes 0.1000061) and kept values are scaled by 1 / (1 - that)
  (`ops.keep_scale`), so the expected value is the input's. Inductor's own dropout draws a
  Philox call per element (32 of its 128 bits): about half of the ~100 instructions an element
  of its dropout + LayerNorm kernels (bench/kernel_census.py).

Statistics, the normalized values and the partial sums are fp32 inside the kernels; the
residual sum is never rounded before it is normalized (the unfused bf16 path rounds it).

Each pair is a torch.library `triton_op` with its autograd registered, so torch.compile traces
the kernels into its graph (no graph break) and autograd saves what the backward needs. They
run where Triton runs: on CUDA, and on a CPU under Triton's interpreter (TRITON_INTERPRET=1,
for the tests). `available()` says whether this torch can use it at all (`missing()`: why
not).
"""

from __future__ import annotations

import inspect
import math

import torch

from bertforge import ops

# The oldest Triton and torch the kernels are tested with (torch 2.11 and its Triton); older
# ones lack what they use (Triton 3.0, torch 2.4's, has no triton.knobs and fails at import;
# torch 2.10's AOT autograd fails to partition their graphs), so they are not used there.
MIN_TRITON = (3, 6)
MIN_TORCH = (2, 11)
try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch ships without Triton
    triton = None


def release(version: str) -> tuple[int, ...]:
    """A version's major and minor numbers: "3.6.0+git1a2b" -> (3, 6)."""
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


TORCH_RELEASE = release(torch.__version__)  # once: `usable` runs at every fused layer's call
OLD_TRITON = None  # the version of a Triton older than MIN_TRITON, left unused
if triton is not None and release(triton.__version__) < MIN_TRITON:
    OLD_TRITON, triton = triton.__version__, None

# (rows of a tile, warps of a program): the configurations Triton's autotuner times on the
# GPU, once per hidden size (at compile time under torch.compile). Rows are even (a Philox call
# serves a pair of rows). Compiled for sm_90 at hidden 768 (bench/RESULTS.md, session 26):
# forward 64-73 instructions an element, 44-84 registers; the backward keeps twelve tiles of
# column sums besides its working set: 2 rows take 52-70 instructions and 78-175 registers
# (fewer warps, fewer instructions, more registers), 4 rows use a stack on 8 warps and 253
# registers on 4 (left out).
FORWARD_CONFIGS = ((4, 4), (4, 8), (2, 4))
BACKWARD_CONFIGS = ((2, 4), (2, 8), (2, 2))
# bias + GELU: (rows of a tile, warps), a tile being rows x GELU_COLUMNS of the feed-forward
GELU_FORWARD_CONFIGS = ((4, 4), (8, 8), (2, 4))
GELU_BACKWARD_CONFIGS = ((4, 4), (8, 8), (2, 4))
GELU_COLUMNS = 1024
# the feed-forward's matmuls with GELU in their epilogues (`feed_forward`): (columns of a tile,
# warps, pipeline stages), a tile being FFN_BLOCK_M rows x columns, FFN_BLOCK_K deep at a step.
# Rows are fixed: the backward writes one row of the bias's partial sums per block of rows, into
# a buffer sized before the autotuner picks. Tiles among Triton's tutorial's for bf16 on sm_90
# (wgmma); compiled for sm_90 at BERT-base's sizes without spills (tests/kernels/
# test_feed_forward.py): 128 x 256 on 8 warps and 128 x 128 on 4, 128 accumulators a thread,
# spilled in the epilogue's GELU (64-368 bytes a thread) and are left out
FFN_FORWARD_CONFIGS = ((128, 8, 4), (128, 8, 3), (64, 4, 4), (64, 4, 3))
FFN_BACKWARD_CONFIGS = ((128, 8, 4), (128, 8, 3), (64, 4, 4), (64, 4, 3))
FFN_BLOCK_M = 128
FFN_BLOCK_K = 64  # the hidden size must be a multiple: the product's loop has no masks
FFN_GROUP_M = 8  # row blocks whose programs run side by side on the same columns (L2 reuse)
# AdamW over a flat buffer: elements a program, warps a program (16 fp32 an element's thread)
ADAMW_BLOCK = 4096
ADAMW_WARPS = 8
# attention of a packed batch whose sequences fit one tile (`attention`): (query rows a block,
# warps) for the forward and the backward's dq, (keys a block, warps) for its dk and dv.
# Compiled for sm_90 at head 64, 128 keys, bf16, aligned as launched (cuobjdump -res-usage):
# 69-164 registers and no stack; 128 rows, and 64 on 4 warps, spilled in a first build
# (bench/RESULTS.md, session 29)
ATTENTION_FORWARD_CONFIGS = ((64, 8), (32, 8), (32, 4))
ATTENTION_QUERY_CONFIGS = ((64, 8), (32, 8), (32, 4))
ATTENTION_KEY_CONFIGS = ((64, 8), (32, 8), (32, 4))
ATTENTION_MAX_LEN = 128
ATTENTION_HEADS = (16, 32, 64, 128)  # head sizes: a power of 2, at least tl.dot's 16
# backward programs per streaming multiprocessor: enough to hide latency, few enough that the
# partial sums (3 x hidden fp32 per program) stay a small fraction of the gradients' bytes
PROGRAMS_PER_SM = 4


def available() -> bool:
    """Whether the fused kernels can run here: Triton and torch recent enough (`missing`)."""
    return missing() is None


def missing() -> str | None:
    """Why the kernels cannot run with this torch, or None if they can."""
    if OLD_TRITON is not None:
        oldest = ".".join(map(str, MIN_TRITON))
        return f"Triton {OLD_TRITON} is older than {oldest}, the oldest bertforge's kernels take"
    if triton is None:
        return "Triton is not installed"
    if TORCH_RELEASE < MIN_TORCH:
        oldest = ".".join(map(str, MIN_TORCH))
        return f"torch {torch.__version__} is older than {oldest}, the oldest they are tested with"
    return None


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors): TRITON_INTERPRET=1."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x`: on CUDA, or on a CPU under the interpreter."""
    return available() and (x.is_cuda or (x.device.type == "cpu" and interpreted()))


if triton is not None:
    # Triton 3.9's fdiv can divide approximately; 3.6's (torch 2.11's) cannot be asked to
    APPROX_DIVISION = tl.constexpr("approx" in inspect.signature(tl.math.fdiv).parameters)

    # Triton's interpreter multiplies bf16 as the integers that hold it (3.9): its products
    # in fp32 there, which holds bf16 values and their products exactly, as the GPU does
    DOT_IN_FP32 = tl.constexpr(interpreted())

    def _configs(pairs: tuple[tuple[int, ...], ...], name: str = "rows_per") -> list[triton.Config]:
        """Triton configs from (`name`'s value, warps[, pipeline stages]); the first alone
        under the interpreter, which cannot time them."""
        pairs = pairs[:1] if interpreted() else pairs
        return [
            triton.Config({name: value}, num_warps=warps, num_stages=[*stages, 3][0])
            for value, warps, *stages in pairs
        ]

    @triton.jit
    def _columns(k, n, quarter, block_q: tl.constexpr):
        """The columns of quarter k of a row, and which of them exist."""
        j = tl.arange(0, block_q)[None, :]
        cols = k * quarter + j
        return cols, (j < quarter) & (cols < n)

    @triton.jit
    def _pair_offsets(first_row, t, quarter, block_q: tl.constexpr, rows_per: tl.constexpr):
        """For a tile of rows from first_row (even): the index of each (pair of rows, column of a
        quarter), which is both the Philox call's counter and the mask byte's offset, and which
        of them exist."""
        pair = (first_row // 2 + tl.arange(0, rows_per // 2)).to(tl.int64)[:, None]
        j = tl.arange(0, block_q)[None, :]
        return pair * quarter + j, (2 * pair < t) & (j < quarter)

    @triton.jit
    def _bits(r, drop: tl.constexpr, k: tl.constexpr):
        """Quarter k's two keep decisions from a 32-bit draw, as bits k and 4 + k: its low 15
        bits decide for the first row of the pair, bits 16-30 for the second."""
        first = ((r & 0x7FFF) >= drop).to(tl.int32)
        second = (((r >> 16) & 0x7FFF) >= drop).to(tl.int32)
        return (first << k) | (second << (4 + k))

    @triton.jit
    def _unpack(bits, k: tl.constexpr, block_q: tl.constexpr, rows_per: tl.constexpr):
        """Quarter k's keep decisions for a tile, [rows_per, block_q], from its [pairs, block_q]
        mask bytes."""
        first, second = (bits >> k) & 1, (bits >> (4 + k)) & 1
        rows = tl.permute(tl.join(first, second), (0, 2, 1))  # [pair, row of the pair, column]
        return tl.reshape(rows, (rows_per, block_q)) != 0

    @triton.jit
    def _forward_load(
        h_ptr,
        res_ptr,
        bias_ptr,
        rows,
        row_ok,
        k,
        n,
        quarter,
        keep,
        scale,
        block_q: tl.constexpr,
        dropout: tl.constexpr,
    ):
        """z = residual + dropout(h + bias) for quarter k of a tile, 0 where it does not exist."""
        cols, col_ok = _columns(k, n, quarter, block_q)
        ok = row_ok & col_ok
        at = rows * n + cols
        u = tl.load(h_ptr + at, mask=ok, other=0.0).to(tl.float32)
        u += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if dropout:
            u = tl.where(keep, u * scale, 0.0)
        z = u + tl.load(res_ptr + at, mask=ok, other=0.0).to(tl.float32)
        return tl.where(ok, z, 0.0), ok

    @triton.jit
    def _forward_store(
        y_ptr,
        zhat_ptr,
        w_ptr,
        b_ptr,
        rows,
        row_ok,
        k,
        n,
        quarter,
        centered,
        rstd,
        block_q: tl.constexpr,
    ):
        cols, col_ok = _columns(k, n, quarter, block_q)
        zhat = centered * rstd
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        at = rows * n + cols
        ok = row_ok & col_ok
        tl.store(y_ptr + at, (zhat * w + b).to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(zhat_ptr + at, zhat.to(zhat_ptr.dtype.element_ty), mask=ok)

    @triton.autotune(configs=_configs(FORWARD_CONFIGS), key=["n"])
    @triton.jit
    def _forward_kernel(
        h_ptr,
        bias_ptr,
        res_ptr,
        w_ptr,
        b_ptr,
        seed_ptr,
        y_ptr,
        zhat_ptr,
        rstd_ptr,
        mask_ptr,
        t,
        n: tl.constexpr,
        quarter: tl.constexpr,
        drop: tl.constexpr,
        scale: tl.constexpr,
        eps: tl.constexpr,
        block_q: tl.constexpr,
        rows_per: tl.constexpr,
        dropout: tl.constexpr,
    ):
        row = tl.program_id(0) * rows_per + tl.arange(0, rows_per)
        rows = row.to(tl.int64)[:, None]
        row_ok = rows < t
        if dropout:  # one Philox call for a pair of rows at column j of the four quarters
            at, ok = _pair_offsets(tl.program_id(0) * rows_per, t, quarter, block_q, rows_per)
            r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), at)
            bits = _bits(r0, drop, 0) | _bits(r1, drop, 1) | _bits(r2, drop, 2) | _bits(r3, drop, 3)
            tl.store(mask_ptr + at, bits.to(tl.uint8), mask=ok)  # for the backward: 1 bit each
            k0 = _unpack(bits, 0, block_q, rows_per)  # the decisions the backward will read
            k1 = _unpack(bits, 1, block_q, rows_per)
            k2 = _unpack(bits, 2, block_q, rows_per)
            k3 = _unpack(bits, 3, block_q, rows_per)
        else:
            k0, k1, k2, k3 = True, True, True, True
        z0, ok0 = _forward_load(
            h_ptr, res_ptr, bias_ptr, rows, row_ok, 0, n, quarter, k0, scale, block_q, dropout
        )
        z1, ok1 = _forward_load(
            h_ptr, res_ptr, bias_ptr, rows, row_ok, 1, n, quarter, k1, scale, block_q, dropout
        )
        z2, ok2 = _forward_load(
            h_ptr, res_ptr, bias_ptr, rows, row_ok, 2, n, quarter, k2, scale, block_q, dropout
        )
        z3, ok3 = _forward_load(
            h_ptr, res_ptr, bias_ptr, rows, row_ok, 3, n, quarter, k3, scale, block_q, dropout
        )
        # the quarters are added lane by lane first: one reduction across threads per row
        mean = tl.sum(z0 + z1 + z2 + z3, 1)[:, None] / n
        c0 = tl.where(ok0, z0 - mean, 0.0)
        c1 = tl.where(ok1, z1 - mean, 0.0)
        c2 = tl.where(ok2, z2 - mean, 0.0)
        c3 = tl.where(ok3, z3 - mean, 0.0)
        var = tl.sum(c0 * c0 + c1 * c1 + c2 * c2 + c3 * c3, 1)
        rstd = 1.0 / tl.sqrt(var / n + eps)
        tl.store(rstd_ptr + row, rstd, mask=row < t)
        rstd = rstd[:, None]
        _forward_store(
            y_ptr, zhat_ptr, w_ptr, b_ptr, rows, row_ok, 0, n, quarter, c0, rstd, block_q
        )
        _forward_store(
            y_ptr, zhat_ptr, w_ptr, b_ptr, rows, row_ok, 1, n, quarter, c1, rstd, block_q
        )
        _forward_store(
            y_ptr, zhat_ptr, w_ptr, b_ptr, rows, row_ok, 2, n, quarter, c2, rstd, block_q
        )
        _forward_store(
            y_ptr, zhat_ptr, w_ptr, b_ptr, rows, row_ok, 3, n, quarter, c3, rstd, block_q
        )

    @triton.jit
    def _backward_load(dy_ptr, zhat_ptr, w_ptr, rows, row_ok, k, n, quarter, block_q: tl.constexpr):
        """dy, the normalized values and dy * weight for quarter k of a tile (0 outside)."""
        cols, col_ok = _columns(k, n, quarter, block_q)
        ok = row_ok & col_ok
        at = rows * n + cols
        dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(tl.float32)
        zhat = tl.load(zhat_ptr + at, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        return dy, zhat, dy * w, ok

    @triton.jit
    def _backward_store(
        dres_ptr,
        dh_ptr,
        rows,
        k,
        n,
        quarter,
        g,
        zhat,
        ok,
        mean_g,
        mean_gz,
        rstd,
        keep,
        scale,
        block_q: tl.constexpr,
        dropout: tl.constexpr,
    ):
        """Writes the residual's and h's gradients for quarter k; returns h's (for the bias)."""
        cols, _ = _columns(k, n, quarter, block_q)
        dz = tl.where(ok, rstd * (g - mean_g - zhat * mean_gz), 0.0)
        dh = dz
        if dropout:
            dh = tl.where(keep, dz * scale, 0.0)
        at = rows * n + cols
        tl.store(dres_ptr + at, dz.to(dres_ptr.dtype.element_ty), mask=ok)
        tl.store(dh_ptr + at, dh.to(dh_ptr.dtype.element_ty), mask=ok)
        return dh

    @triton.jit
    def _backward_sums(partial_ptr, program, k, n, quarter, dw, db, dbias, block_q: tl.constexpr):
        cols, col_ok = _columns(k, n, quarter, block_q)
        at = program * 3 * n + cols
        tl.store(partial_ptr + at, tl.sum(dw, 0)[None, :], mask=col_ok)
        tl.store(partial_ptr + n + at, tl.sum(db, 0)[None, :], mask=col_ok)
        tl.store(partial_ptr + 2 * n + at, tl.sum(dbias, 0)[None, :], mask=col_ok)

    @triton.autotune(configs=_configs(BACKWARD_CONFIGS), key=["n"])
    @triton.jit
    def _backward_kernel(
        dy_ptr,
        zhat_ptr,
        rstd_ptr,
        w_ptr,
        mask_ptr,
        dres_ptr,
        dh_ptr,
        partial_ptr,
        t,
        n: tl.constexpr,
        quarter: tl.constexpr,
        scale: tl.constexpr,
        block_q: tl.constexpr,
        rows_per: tl.constexpr,
        dropout: tl.constexpr,
    ):
        program = tl.program_id(0)
        programs = tl.num_programs(0)
        w0 = tl.zeros((rows_per, block_q), tl.float32)
        w1 = tl.zeros((rows_per, block_q), tl.float32)
        w2 = tl.zeros((rows_per, block_q), tl.float32)
        w3 = tl.zeros((rows_per, block_q), tl.float32)
        b0 = tl.zeros((rows_per, block_q), tl.float32)
        b1 = tl.zeros((rows_per, block_q), tl.float32)
        b2 = tl.zeros((rows_per, block_q), tl.float32)
        b3 = tl.zeros((rows_per, block_q), tl.float32)
        h0 = tl.zeros((rows_per, block_q), tl.float32)
        h1 = tl.zeros((rows_per, block_q), tl.float32)
        h2 = tl.zeros((rows_per, block_q), tl.float32)
        h3 = tl.zeros((rows_per, block_q), tl.float32)
        for start in range(program * rows_per, t, programs * rows_per):
            rows = start + tl.arange(0, rows_per)[:, None]
            row_ok = rows < t
            rows = rows.to(tl.int64)
            if dropout:  # the forward's decisions, from its mask bytes
                at, ok = _pair_offsets(start, t, quarter, block_q, rows_per)
                bits = tl.load(mask_ptr + at, mask=ok, other=0).to(tl.int32)
                k0 = _unpack(bits, 0, block_q, rows_per)
                k1 = _unpack(bits, 1, block_q, rows_per)
                k2 = _unpack(bits, 2, block_q, rows_per)
                k3 = _unpack(bits, 3, block_q, rows_per)
            else:
                k0, k1, k2, k3 = True, True, True, True
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            dy0, z0, g0, ok0 = _backward_load(
                dy_ptr, zhat_ptr, w_ptr, rows, row_ok, 0, n, quarter, block_q
            )
            dy1, z1, g1, ok1 = _backward_load(
                dy_ptr, zhat_ptr, w_ptr, rows, row_ok, 1, n, quarter, block_q
            )
            dy2, z2, g2, ok2 = _backward_load(
                dy_ptr, zhat_ptr, w_ptr, rows, row_ok, 2, n, quarter, block_q
            )
            dy3, z3, g3, ok3 = _backward_load(
                dy_ptr, zhat_ptr, w_ptr, rows, row_ok, 3, n, quarter, block_q
            )
            mean_g = tl.sum(g0 + g1 + g2 + g3, 1)[:, None] / n
            mean_gz = tl.sum(g0 * z0 + g1 * z1 + g2 * z2 + g3 * z3, 1)[:, None] / n
            h0 += _backward_store(
                dres_ptr,
                dh_ptr,
                rows,
                0,
                n,
                quarter,
                g0,
                z0,
                ok0,
                mean_g,
                mean_gz,
                rstd,
                k0,
                scale,
                block_q,
                dropout,
            )
            h1 += _backward_store(
                dres_ptr,
                dh_ptr,
                rows,
                1,
                n,
                quarter,
                g1,
                z1,
                ok1,
                mean_g,
                mean_gz,
                rstd,
                k1,
                scale,
                block_q,
                dropout,
            )
            h2 += _backward_store(
                dres_ptr,
                dh_ptr,
                rows,
                2,
                n,
                quarter,
                g2,
                z2,
                ok2,
                mean_g,
                mean_gz,
                rstd,
                k2,
                scale,
                block_q,
                dropout,
            )
            h3 += _backward_store(
                dres_ptr,
                dh_ptr,
                rows,
                3,
                n,
                quarter,
                g3,
                z3,
                ok3,
                mean_g,
                mean_gz,
                rstd,
                k3,
                scale,
                block_q,
                dropout,
            )
            w0 += dy0 * z0
            w1 += dy1 * z1
            w2 += dy2 * z2
            w3 += dy3 * z3
            b0 += dy0
            b1 += dy1
            b2 += dy2
            b3 += dy3
        _backward_sums(partial_ptr, program, 0, n, quarter, w0, b0, h0, block_q)
        _backward_sums(partial_ptr, program, 1, n, quarter, w1, b1, h1, block_q)
        _backward_sums(partial_ptr, program, 2, n, quarter, w2, b2, h2, block_q)
        _backward_sums(partial_ptr, program, 3, n, quarter, w3, b3, h3, block_q)

    @triton.jit
    def _erf_parts(s):
        """erf(s) = sign(s) (1 - q e) with e = exp(-s^2) (Abramowitz and Stegun 7.1.26, absolute
        error under 1.5e-7; in fp32 under 5e-7, from rounding 1 - q e near 0): returns q and
        e, so a caller that needs exp(-s^2) too has it."""
        if APPROX_DIVISION:  # div.approx.f32: 2 ulp, a reciprocal and a multiply
            t = tl.math.fdiv(1.0, 1.0 + 0.3275911 * tl.abs(s), approx=True)
        else:
            t = 1.0 / (1.0 + 0.3275911 * tl.abs(s))
        q = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
            + t * 1.061405429))))  # fmt: skip
        return q, tl.exp(-s * s)

    @triton.jit
    def _phi(u):
        """The normal distribution's CDF at u, and exp(-u^2 / 2)."""
        s = u * 0.7071067811865476
        q, e = _erf_parts(s)
        erf = 1.0 - q * e
        return 0.5 + 0.5 * tl.where(s < 0, -erf, erf), e

    @triton.jit
    def _gelu_slope(u):
        """GELU's derivative at u: d/du u Phi(u) = Phi(u) + u phi(u)."""
        cdf, e = _phi(u)
        return cdf + u * e * 0.3989422804014327

    @triton.jit
    def _gelu_offsets(start, column, t, f: tl.constexpr, rows_per: tl.constexpr,
                      columns: tl.constexpr):  # fmt: skip
        """A tile's element offsets in a [t, f] tensor, its columns, which of them exist."""
        rows = (start + tl.arange(0, rows_per)).to(tl.int64)[:, None]
        cols = column * columns + tl.arange(0, columns)[None, :]
        return rows * f + cols, cols, (rows < t) & (cols < f)

    @triton.autotune(configs=_configs(GELU_FORWARD_CONFIGS), key=["f"])
    @triton.jit
    def _gelu_forward_kernel(h_ptr, bias_ptr, y_ptr, t, f: tl.constexpr, columns: tl.constexpr,
                             rows_per: tl.constexpr):  # fmt: skip
        at, cols, ok = _gelu_offsets(
            tl.program_id(0) * rows_per, tl.program_id(1), t, f, rows_per, columns
        )
        u = tl.load(h_ptr + at, mask=ok, other=0.0).to(tl.float32)
        u += tl.load(bias_ptr + cols, mask=cols < f, other=0.0).to(tl.float32)
        cdf, _ = _phi(u)
        tl.store(y_ptr + at, (u * cdf).to(y_ptr.dtype.element_ty), mask=ok)

    @triton.autotune(configs=_configs(GELU_BACKWARD_CONFIGS), key=["f"])
    @triton.jit
    def _gelu_backward_kernel(dy_ptr, h_ptr, bias_ptr, du_ptr, partial_ptr, t,
                              f: tl.constexpr, columns: tl.constexpr,
                              rows_per: tl.constexpr):  # fmt: skip
        """du = dy x GELU'(h + bias), and per program the column sums of du (the bias's
        gradient) over the tiles it loops over."""
        program, column = tl.program_id(0), tl.program_id(1)
        total = tl.zeros((rows_per, columns), tl.float32)
        for start in range(program * rows_per, t, tl.num_programs(0) * rows_per):
            at, cols, ok = _gelu_offsets(start, column, t, f, rows_per, columns)
            u = tl.load(h_ptr + at, mask=ok, other=0.0).to(tl.float32)
            u += tl.load(bias_ptr + cols, mask=cols < f, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(tl.float32)
            du = dy * _gelu_slope(u)
            tl.store(du_ptr + at, du.to(du_ptr.dtype.element_ty), mask=ok)
            total += du
        cols = column * columns + tl.arange(0, columns)
        tl.store(partial_ptr + program * f + cols, tl.sum(total, 0), mask=cols < f)

    @triton.jit
    def _ffn_offsets(m, n, a_stride, b_stride_k, b_stride_n, block_m: tl.constexpr,
                     block_n: tl.constexpr, block_k: tl.constexpr,
                     group_m: tl.constexpr):  # fmt: skip
        """For this program's tile of a [m, k] @ b [k, n] (a's rows a_stride apart, b's
        strides given): its block of rows, its rows and columns, and the offsets of a's
        [block_m, block_k] and b's [block_k, block_n] first slices. The programs take the tiles
        a group of group_m blocks of rows at a time, down each column of tiles, so the programs
        running together share b's columns in L2 (Triton's tutorial's order). Rows and columns
        past the ends read rows and columns that exist (modulo m and n; their results are never
        stored), so the loop over k, a multiple of block_k, needs no masks. (The kernels load
        in their own bodies: torch reads a helper's loads through pointers it is given as
        writes, and inductor would copy those tensors before each call.)"""
        pid = tl.program_id(0)
        tiles_n = tl.cdiv(n, block_n)
        in_group = group_m * tiles_n
        first = (pid // in_group) * group_m
        size = tl.minimum(tl.cdiv(m, block_m) - first, group_m)
        block = first + (pid % in_group) % size
        rows = block * block_m + tl.arange(0, block_m)
        cols = ((pid % in_group) // size) * block_n + tl.arange(0, block_n)
        ks = tl.arange(0, block_k)
        a_at = (rows % m).to(tl.int64)[:, None] * a_stride + ks[None, :]
        b_at = ks[:, None] * b_stride_k + (cols % n)[None, :] * b_stride_n
        return block, rows, cols, a_at, b_at

    @triton.jit
    def _ffn_dot(a, b, acc, precision: tl.constexpr):
        """acc + a @ b in fp32; precision: fp32 inputs' ("ieee", as torch's matmuls by
        default)."""
        if DOT_IN_FP32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=precision)

    @triton.jit
    def _ffn_tile(rows, cols, m, n):
        """A tile's element offsets in a [m, n] tensor and which of them exist."""
        at = rows.to(tl.int64)[:, None] * n + cols[None, :]
        return at, (rows[:, None] < m) & (cols[None, :] < n)

    @triton.autotune(configs=_configs(FFN_FORWARD_CONFIGS, "block_n"), key=["n", "k"])
    @triton.jit
    def _ffn_forward_kernel(x_ptr, w_ptr, bias_ptr, h_ptr, y_ptr, m, n, k,
                            block_m: tl.constexpr, block_k: tl.constexpr,
                            group_m: tl.constexpr, precision: tl.constexpr,
                            block_n: tl.constexpr):  # fmt: skip
        """h = x @ w^T (x [m, k], ffn_in's weight w [n, k]) and y = gelu(h + bias), [m, n]
        each, from one fp32 product."""
        _, rows, cols, a_at, b_at = _ffn_offsets(m, n, k, 1, k, block_m, block_n, block_k, group_m)
        acc = tl.zeros((block_m, block_n), tl.float32)
        for i in range(0, k, block_k):  # offsets from the index: no pointers carried through
            acc = _ffn_dot(tl.load(x_ptr + a_at + i), tl.load(w_ptr + b_at + i), acc, precision)
        at, ok = _ffn_tile(rows, cols, m, n)
        tl.store(h_ptr + at, acc.to(h_ptr.dtype.element_ty), mask=ok)
        u = acc + tl.load(bias_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
        cdf, _ = _phi(u)
        tl.store(y_ptr + at, (u * cdf).to(y_ptr.dtype.element_ty), mask=ok)

    @triton.autotune(configs=_configs(FFN_BACKWARD_CONFIGS, "block_n"), key=["n", "k"])
    @triton.jit
    def _ffn_backward_kernel(dz_ptr, w_ptr, h_ptr, bias_ptr, du_ptr, partial_ptr, m, n, k,
                             block_m: tl.constexpr, block_k: tl.constexpr,
                             group_m: tl.constexpr, precision: tl.constexpr,
                             block_n: tl.constexpr):  # fmt: skip
        """du = (dz @ w) x GELU'(h + bias) (dz [m, k], ffn_out's weight w [k, n]; h as the
        forward wrote it), and the column sums of du over the tile's rows in fp32 (the bias's
        gradient), one row of partial sums per block of rows."""
        block, rows, cols, a_at, b_at = _ffn_offsets(
            m, n, k, n, 1, block_m, block_n, block_k, group_m
        )
        acc = tl.zeros((block_m, block_n), tl.float32)
        for i in range(0, k, block_k):
            acc = _ffn_dot(tl.load(dz_ptr + a_at + i), tl.load(w_ptr + b_at + i * n), acc,
                           precision)  # fmt: skip
        at, ok = _ffn_tile(rows, cols, m, n)
        u = tl.load(h_ptr + at, mask=ok, other=0.0).to(tl.float32)
        u += tl.load(bias_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
        du = tl.where(ok, acc * _gelu_slope(u), 0.0)
        tl.store(du_ptr + at, du.to(du_ptr.dtype.element_ty), mask=ok)
        tl.store(partial_ptr + block * n + cols, tl.sum(du, 0), mask=cols < n)

    @triton.jit
    def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, scale_ptr, inf_ptr, n, lr, decay,
                      beta1, rest1, beta2, rest2, log_beta1, log_beta2, eps,
                      has_scale: tl.constexpr, has_inf: tl.constexpr,
                      block: tl.constexpr):  # fmt: skip
        """rest1, rest2: 1 - beta1, 1 - beta2 (each rounded from fp64: 1 - 0.999 in fp32 would
        be 1.3e-5 off); decay: lr x weight_decay. The bias corrections 1 - beta^step in fp64
        (for 0.999 at step 1 fp32 keeps four digits of them)."""
        at = tl.program_id(0).to(tl.int64) * block + tl.arange(0, block)
        if has_inf:  # a bad step: no element is read or written
            n = tl.where(tl.load(inf_ptr) == 0, n, 0)
        ok = at < n
        step = tl.load(step_ptr).to(tl.float64)
        correction1 = 1.0 - tl.exp(step * tl.cast(log_beta1, tl.float64))
        correction2 = 1.0 - tl.exp(step * tl.cast(log_beta2, tl.float64))
        step_size = (tl.cast(lr, tl.float64) / correction1).to(tl.float32)
        root2 = tl.sqrt(correction2).to(tl.float32)
        g = tl.load(g_ptr + at, mask=ok, other=0.0)
        if has_scale:
            g = g / tl.load(scale_ptr)
        p = tl.load(p_ptr + at, mask=ok, other=0.0)
        m = tl.load(m_ptr + at, mask=ok, other=0.0)
        v = tl.load(v_ptr + at, mask=ok, other=0.0)
        p = p - decay * p
        m = beta1 * m + rest1 * g
        v = beta2 * v + rest2 * g * g
        p = p - step_size * m / (tl.sqrt(v) / root2 + eps)
        tl.store(p_ptr + at, p, mask=ok)
        tl.store(m_ptr + at, m, mask=ok)
        tl.store(v_ptr + at, v, mask=ok)

    @triton.jit
    def _dot(a, b, precision: tl.constexpr):
        """a @ b with fp32 accumulation; precision: fp32's ("ieee" or "tf32")."""
        if DOT_IN_FP32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=precision)

    @triton.jit
    def _keep_offsets(program, first_row, first_key, length, rows: tl.constexpr,
                      keys: tl.constexpr, block_n: tl.constexpr):  # fmt: skip
        """For a [rows, keys] block of a (sequence, head)'s probabilities from query row
        first_row and key first_key (a multiple of 8): the index of each (row, eight keys),
        [rows, keys / 8], which is both the Philox call's counter and the mask byte's offset,
        (program x block_n + row) x block_n / 8 + key / 8; and which of them exist (row and
        keys in the sequence)."""
        row = first_row + tl.arange(0, rows)[:, None]
        call = first_key // 8 + tl.arange(0, keys // 8)[None, :]
        at = (program.to(tl.int64) * block_n + row.to(tl.int64)) * (block_n // 8) + call
        return at, (row < length) & (call * 8 < length)

    @triton.jit
    def _two_bits(r, drop: tl.constexpr):
        """Two keep decisions from a 32-bit draw: bit 0 from its low 15 bits, bit 1 from bits
        16-30."""
        low = ((r & 0x7FFF) >= drop).to(tl.int32)
        return low | ((((r >> 16) & 0x7FFF) >= drop).to(tl.int32) << 1)

    @triton.jit
    def _keep_bits(seed, at, drop: tl.constexpr):
        """One Philox call (128 bits) per offset: eight keep decisions, 15 bits each, as the
        bits of a byte (bits 2w and 2w + 1 from word w)."""
        r0, r1, r2, r3 = tl.randint4x(seed, at)
        low = _two_bits(r0, drop) | (_two_bits(r1, drop) << 2)
        return low | (_two_bits(r2, drop) << 4) | (_two_bits(r3, drop) << 6)

    @triton.jit
    def _keep_mask(bits, rows: tl.constexpr, keys: tl.constexpr):
        """[rows, keys / 8] bytes of keep decisions as a [rows, keys] mask: key 8c + j is bit j
        of byte c."""
        bits = bits.to(tl.int8)  # a quarter of int32's bytes through the shuffles below
        k0 = tl.join(bits & 1, bits & 2)  # [rows, keys / 8, 2]
        k1 = tl.join(bits & 4, bits & 8)
        k2 = tl.join(bits & 16, bits & 32)
        k3 = tl.join(bits & 64, bits & -128)
        keep = tl.join(tl.join(k0, k1), tl.join(k2, k3))  # [rows, keys / 8, 2, 2, 2]: bit 4a+2b+h
        return tl.reshape(keep, (rows, keys)) != 0

    @triton.jit
    def _attention_tile(ptr, token_stride, first, rows, ok, head: tl.constexpr):
        """rows [n] of a sequence from token `first` of a [T, heads, head] view whose head
        starts at ptr: [n, head], 0 where not ok."""
        at = (first + rows).to(tl.int64)[:, None] * token_stride + tl.arange(0, head)[None, :]
        return tl.load(ptr + at, mask=ok[:, None], other=0.0)

    @triton.jit
    def _attention_rows(ptr, first, rows, ok, h, heads, head: tl.constexpr):
        """Offsets of rows [n] of head h in a contiguous [T, heads, head] or, with head 1, in
        a [T, heads] tensor, and their mask."""
        at = (first + rows).to(tl.int64)[:, None] * (heads * head) + h * head
        return ptr + at + tl.arange(0, head)[None, :], ok[:, None]

    @triton.jit
    def _attention_queries(q_ptr, do_ptr, lse_ptr, q_stride, first, rows, ok, h, heads,
                           head: tl.constexpr):  # fmt: skip
        """A block of query rows' q, output gradient and log-sum-exp (0 where not ok)."""
        q = _attention_tile(q_ptr + h * head, q_stride, first, rows, ok, head)
        at, ok2 = _attention_rows(do_ptr, first, rows, ok, h, heads, head)
        do = tl.load(at, mask=ok2, other=0.0)
        at, one = _attention_rows(lse_ptr, first, rows, ok, h, heads, 1)
        return q, do, tl.sum(tl.load(at, mask=one, other=0.0), 1)  # [rows, 1] -> [rows]

    @triton.autotune(configs=_configs(ATTENTION_FORWARD_CONFIGS, "block_m"),
                     key=["head", "block_n", "dropout"])  # fmt: skip
    @triton.jit
    def _attention_forward_kernel(q_ptr, k_ptr, v_ptr, cu_ptr, seed_ptr, o_ptr, lse_ptr, mask_ptr,
                                  q_stride, k_stride, v_stride, heads, scale, drop: tl.constexpr,
                                  keep_scale, head: tl.constexpr, block_n: tl.constexpr,
                                  dropout: tl.constexpr, precision: tl.constexpr,
                                  block_m: tl.constexpr):  # fmt: skip
        """One program per (sequence, head, block of block_m query rows) against all the
        sequence's keys at once (at most block_n of them: softmax with no running maximum).
        lse: the log (base 2) of each row's softmax denominator, for the backward."""
        seq, h, m = tl.program_id(0), tl.program_id(1), tl.program_id(2) * block_m
        first = tl.load(cu_ptr + seq)
        length = tl.load(cu_ptr + seq + 1) - first
        if m < length:
            keys = tl.arange(0, block_n)
            key_ok = keys < length
            rows = m + tl.arange(0, block_m)
            row_ok = rows < length
            q = _attention_tile(q_ptr + h * head, q_stride, first, rows, row_ok, head)
            k = _attention_tile(k_ptr + h * head, k_stride, first, keys, key_ok, head)
            s = _dot(q, tl.trans(k), precision) * scale  # log2 units
            s = tl.where(key_ok[None, :], s, float("-inf"))
            top = tl.max(s, 1)
            p = tl.exp2(s - top[:, None])
            total = tl.sum(p, 1)
            # the softmax's division and dropout's scale on o's rows, not on every probability
            row_scale = 1.0 / total
            if dropout:
                at, ok = _keep_offsets(seq * heads + h, m, 0, length, block_m, block_n, block_n)
                bits = _keep_bits(tl.load(seed_ptr), at, drop)
                tl.store(mask_ptr + at, bits.to(tl.uint8), mask=ok)  # for the backward
                p = tl.where(_keep_mask(bits, block_m, block_n), p, 0.0)
                row_scale = row_scale * keep_scale
            v = _attention_tile(v_ptr + h * head, v_stride, first, keys, key_ok, head)
            o = _dot(p.to(v.dtype), v, precision) * row_scale[:, None]
            at, ok = _attention_rows(o_ptr, first, rows, row_ok, h, heads, head)
            tl.store(at, o.to(o_ptr.dtype.element_ty), mask=ok)
            at, ok = _attention_rows(lse_ptr, first, rows, row_ok, h, heads, 1)
            tl.store(at, (top + tl.log2(total))[:, None], mask=ok)

    @triton.jit
    def _attention_scores_grad(q, k, v, do, lse, delta, mask_ptr, program, m, n, length, scale,
                               drop: tl.constexpr, keep_scale, block_m: tl.constexpr,
                               block_k: tl.constexpr, block_n: tl.constexpr,
                               dropout: tl.constexpr, precision: tl.constexpr):  # fmt: skip
        """For query rows m.. and keys n.. of a (sequence, head): the probabilities dropout
        kept ([block_m, block_k], fp32, not yet scaled by keep_scale) and the gradient of the
        scores (before their scale, in q's dtype)."""
        s = _dot(q, tl.trans(k), precision) * scale
        key_ok = (n + tl.arange(0, block_k)) < length
        p = tl.where(key_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), precision)
        if dropout:
            at, ok = _keep_offsets(program, m, n, length, block_m, block_k, block_n)
            keep = _keep_mask(tl.load(mask_ptr + at, mask=ok, other=0), block_m, block_k)
            kept = tl.where(keep, p, 0.0)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        else:
            kept = p
        return kept, (p * (dp - delta[:, None])).to(q.dtype)

    @triton.autotune(configs=_configs(ATTENTION_QUERY_CONFIGS, "block_m"),
                     key=["head", "block_n", "dropout"])  # fmt: skip
    @triton.jit
    def _attention_dq_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, cu_ptr, mask_ptr,
                             dq_ptr, delta_ptr, q_stride, k_stride, v_stride, heads, scale,
                             softmax_scale, drop: tl.constexpr, keep_scale, head: tl.constexpr,
                             block_n: tl.constexpr, dropout: tl.constexpr,
                             precision: tl.constexpr, block_m: tl.constexpr):  # fmt: skip
        """The backward's first half: one program per (sequence, head, block of query rows)
        against the sequence's keys in blocks of block_m. Writes dq and, for the second half,
        delta = sum over keys of p x dp, which is each row's sum of do x o."""
        seq, h, m = tl.program_id(0), tl.program_id(1), tl.program_id(2) * block_m
        first = tl.load(cu_ptr + seq)
        length = tl.load(cu_ptr + seq + 1) - first
        if m < length:
            rows = m + tl.arange(0, block_m)
            row_ok = rows < length
            q, do, lse = _attention_queries(q_ptr, do_ptr, lse_ptr, q_stride, first, rows,
                                            row_ok, h, heads, head)  # fmt: skip
            at, ok = _attention_rows(o_ptr, first, rows, row_ok, h, heads, head)
            delta = tl.sum(do.to(tl.float32) * tl.load(at, mask=ok, other=0.0).to(tl.float32), 1)
            at, one = _attention_rows(delta_ptr, first, rows, row_ok, h, heads, 1)
            tl.store(at, delta[:, None], mask=one)
            dq = tl.zeros((block_m, head), tl.float32)
            for n in tl.static_range(0, block_n, block_m):
                if n < length:
                    keys = n + tl.arange(0, block_m)
                    key_ok = keys < length
                    k = _attention_tile(k_ptr + h * head, k_stride, first, keys, key_ok, head)
                    v = _attention_tile(v_ptr + h * head, v_stride, first, keys, key_ok, head)
                    _, ds = _attention_scores_grad(
                        q, k, v, do, lse, delta, mask_ptr, seq * heads + h, m, n, length, scale,
                        drop, keep_scale, block_m, block_m, block_n, dropout, precision,
                    )  # fmt: skip
                    dq += _dot(ds, k, precision)
            at, ok = _attention_rows(dq_ptr, first, rows, row_ok, h, heads, head)
            tl.store(at, (dq * softmax_scale).to(dq_ptr.dtype.element_ty), mask=ok)

    @triton.autotune(configs=_configs(ATTENTION_KEY_CONFIGS, "block_k"),
                     key=["head", "block_n", "dropout"])  # fmt: skip
    @triton.jit
    def _attention_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, cu_ptr,
                               mask_ptr, dk_ptr, dv_ptr, q_stride, k_stride, v_stride, heads,
                               scale, softmax_scale, drop: tl.constexpr, keep_scale,
                               head: tl.constexpr, block_n: tl.constexpr, dropout: tl.constexpr,
                               precision: tl.constexpr, block_k: tl.constexpr):  # fmt: skip
        """The backward's second half: one program per (sequence, head, block of block_k keys)
        against the sequence's query rows in blocks of block_k; dk and dv summed in registers
        and written once (no atomics)."""
        seq, h, n = tl.program_id(0), tl.program_id(1), tl.program_id(2) * block_k
        first = tl.load(cu_ptr + seq)
        length = tl.load(cu_ptr + seq + 1) - first
        if n < length:
            keys = n + tl.arange(0, block_k)
            key_ok = keys < length
            k = _attention_tile(k_ptr + h * head, k_stride, first, keys, key_ok, head)
            v = _attention_tile(v_ptr + h * head, v_stride, first, keys, key_ok, head)
            dk = tl.zeros((block_k, head), tl.float32)
            dv = tl.zeros((block_k, head), tl.float32)
            for m in tl.static_range(0, block_n, block_k):
                if m < length:
                    rows = m + tl.arange(0, block_k)
                    row_ok = rows < length
                    q, do, lse = _attention_queries(q_ptr, do_ptr, lse_ptr, q_stride, first,
                                                    rows, row_ok, h, heads, head)  # fmt: skip
                    at, one = _attention_rows(delta_ptr, first, rows, row_ok, h, heads, 1)
                    delta = tl.sum(tl.load(at, mask=one, other=0.0), 1)
                    kept, ds = _attention_scores_grad(
                        q, k, v, do, lse, delta, mask_ptr, seq * heads + h, m, n, length, scale,
                        drop, keep_scale, block_k, block_k, block_n, dropout, precision,
                    )  # fmt: skip
                    dv += _dot(tl.trans(kept.to(do.dtype)), do, precision)
                    dk += _dot(tl.trans(ds), q, precision)
            at, ok = _attention_rows(dk_ptr, first, keys, key_ok, h, heads, head)
            tl.store(at, (dk * softmax_scale).to(dk_ptr.dtype.element_ty), mask=ok)
            at, ok = _attention_rows(dv_ptr, first, keys, key_ok, h, heads, head)
            if dropout:  # the kept probabilities' scale, once a gradient
                dv = dv * keep_scale
            tl.store(at, dv.to(dv_ptr.dtype.element_ty), mask=ok)

    def _gelu_columns(f: int) -> int:
        return min(GELU_COLUMNS, triton.next_power_of_2(f))

    @torch.library.triton_op("bertforge::bias_gelu_forward", mutates_args=())
    def _gelu_forward(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        t, f = h.shape
        columns = _gelu_columns(f)
        y = torch.empty_like(h)

        def grid(meta: dict[str, int]) -> tuple[int, int]:
            return (triton.cdiv(t, meta["rows_per"]), triton.cdiv(f, columns))

        torch.library.wrap_triton(_gelu_forward_kernel)[grid](h, bias, y, t, f, columns)
        return y

    @torch.library.triton_op("bertforge::bias_gelu_backward", mutates_args=())
    def _gelu_backward(
        dy: torch.Tensor, h: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t, f = h.shape
        columns = _gelu_columns(f)
        blocks = triton.cdiv(f, columns)
        du = torch.empty_like(h)
        # programs over rows: at most one a tile of the fewest rows, about PROGRAMS_PER_SM a
        # streaming multiprocessor with the column blocks counted in
        programs = _programs(dy, triton.cdiv(t, 2), blocks)
        partial = torch.empty(programs, f, dtype=torch.float32, device=h.device)
        torch.library.wrap_triton(_gelu_backward_kernel)[(programs, blocks)](
            dy, h, bias, du, partial, t, f, columns
        )
        return du, partial.sum(0)

    def _gelu_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        h, bias = inputs
        ctx.save_for_backward(h, bias)

    def _gelu_gradients(ctx, dy):  # type: ignore[no-untyped-def]
        h, bias = ctx.saved_tensors
        du, dbias = _gelu_backward(dy.contiguous(), h, bias)
        return du, dbias.to(bias.dtype)

    _gelu_forward.register_autograd(_gelu_gradients, setup_context=_gelu_setup)

    def _ffn_grid(m: int, n: int):  # type: ignore[no-untyped-def]
        def grid(meta: dict[str, int]) -> tuple[int]:
            return (triton.cdiv(m, FFN_BLOCK_M) * triton.cdiv(n, meta["block_n"]),)

        return grid

    def _ffn_blocks(x: torch.Tensor) -> dict[str, object]:
        """The feed-forward kernels' fixed tile sizes and their product's precision."""
        precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32: ignored for bf16
        return dict(
            block_m=FFN_BLOCK_M, block_k=FFN_BLOCK_K, group_m=FFN_GROUP_M, precision=precision
        )

    @torch.library.triton_op("bertforge::feed_forward_forward", mutates_args=())
    def _ffn_forward(
        x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, k = x.shape
        n = w_in.shape[0]
        h, y = (torch.empty(m, n, dtype=x.dtype, device=x.device) for _ in range(2))
        torch.library.wrap_triton(_ffn_forward_kernel)[_ffn_grid(m, n)](
            x, w_in, b_in, h, y, m, n, k, **_ffn_blocks(x)
        )
        return torch.mm(y, w_out.t()), h, y

    @torch.library.triton_op("bertforge::feed_forward_backward", mutates_args=())
    def _ffn_backward(
        dz: torch.Tensor,
        x: torch.Tensor,
        w_in: torch.Tensor,
        b_in: torch.Tensor,
        w_out: torch.Tensor,
        h: torch.Tensor,
        y: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        m, k = dz.shape
        n = h.shape[1]
        du = torch.empty_like(h)
        partial = torch.empty(triton.cdiv(m, FFN_BLOCK_M), n, dtype=torch.float32, device=dz.device)
        torch.library.wrap_triton(_ffn_backward_kernel)[_ffn_grid(m, n)](
            dz, w_out, h, b_in, du, partial, m, n, k, **_ffn_blocks(dz)
        )
        # x's, w_in's, b_in's and w_out's gradients
        return torch.mm(du, w_in), torch.mm(du.t(), x), partial.sum(0), torch.mm(dz.t(), y)

    def _ffn_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        x, w_in, b_in, w_out = inputs
        _, h, y = output
        ctx.save_for_backward(x, w_in, b_in, w_out, h, y)
        ctx.set_materialize_grads(False)  # h's and y's (unused): None, not zeros

    def _ffn_gradients(ctx, dz, _h, _y):  # type: ignore[no-untyped-def]
        x, w_in, b_in, w_out, h, y = ctx.saved_tensors
        dx, dw_in, db_in, dw_out = _ffn_backward(dz.contiguous(), x, w_in, b_in, w_out, h, y)
        return dx, dw_in, db_in.to(b_in.dtype), dw_out

    _ffn_forward.register_autograd(_ffn_gradients, setup_context=_ffn_setup)

    def _shape(x: torch.Tensor) -> tuple[int, int, int]:
        """The hidden size, a quarter's length and its power-of-2 block for a [T, N] tensor."""
        n = x.shape[-1]
        quarter = triton.cdiv(n, 4)
        return n, quarter, triton.next_power_of_2(quarter)

    def _programs(x: torch.Tensor, tiles: int, blocks: int = 1) -> int:
        """A persistent kernel's programs along the rows: at most one a tile, about
        PROGRAMS_PER_SM a streaming multiprocessor counting `blocks` along the columns (4 in
        all under the interpreter)."""
        if x.is_cuda:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            return torch.sym_min(tiles, max(1, sms * PROGRAMS_PER_SM // blocks))
        return torch.sym_min(tiles, 4)

    @torch.library.triton_op("bertforge::fused_norm_forward", mutates_args=())
    def _fused_forward(
        h: torch.Tensor,
        bias: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        ln_bias: torch.Tensor,
        seed: torch.Tensor,
        p: float,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        t = h.shape[0]
        n, quarter, block_q = _shape(h)
        y, zhat = torch.empty_like(h), torch.empty_like(h)
        rstd = torch.empty(t, dtype=torch.float32, device=h.device)
        dropout = ops.drop_levels(p) > 0
        # the keep decisions, a byte for each pair of rows and column of a quarter (none
        # without dropout)
        pairs = triton.cdiv(t, 2) if dropout else 0
        mask = torch.empty(pairs, quarter, dtype=torch.uint8, device=h.device)

        def grid(meta: dict[str, int]) -> tuple[int]:
            return (triton.cdiv(t, meta["rows_per"]),)

        torch.library.wrap_triton(_forward_kernel)[grid](
            h, bias, residual, weight, ln_bias, seed, y, zhat, rstd, mask, t, n, quarter,
            ops.drop_levels(p), ops.keep_scale(p), eps, block_q=block_q, dropout=dropout,
        )  # fmt: skip
        return y, zhat, rstd, mask

    @torch.library.triton_op("bertforge::fused_norm_backward", mutates_args=())
    def _fused_backward(
        dy: torch.Tensor,
        zhat: torch.Tensor,
        rstd: torch.Tensor,
        weight: torch.Tensor,
        mask: torch.Tensor,
        p: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = dy.shape[0]
        n, quarter, block_q = _shape(dy)
        dres, dh = torch.empty_like(dy), torch.empty_like(dy)
        programs = _programs(dy, triton.cdiv(t, 2))  # at most one a tile of the fewest rows
        partial = torch.empty(programs, 3, n, dtype=torch.float32, device=dy.device)
        torch.library.wrap_triton(_backward_kernel)[(programs,)](
            dy, zhat, rstd, weight, mask, dres, dh, partial, t, n, quarter, ops.keep_scale(p),
            block_q=block_q, dropout=ops.drop_levels(p) > 0,
        )  # fmt: skip
        # the gradients of LayerNorm's weight and bias and of h's bias, [3, N]
        return dres, dh, partial.sum(0)

    def _setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        _, bias, residual, weight, ln_bias, _, p, _ = inputs
        _, zhat, rstd, mask = output
        ctx.save_for_backward(zhat, rstd, weight, mask)
        ctx.p = p
        ctx.dtypes = (bias.dtype, residual.dtype, weight.dtype, ln_bias.dtype)

    def _gradients(ctx, dy, _zhat, _rstd, _mask):  # type: ignore[no-untyped-def]
        zhat, rstd, weight, mask = ctx.saved_tensors
        dres, dh, (dw, dlb, dbias) = _fused_backward(
            dy.contiguous(), zhat, rstd, weight, mask, ctx.p
        )
        bias_t, res_t, w_t, lb_t = ctx.dtypes
        return dh, dbias.to(bias_t), dres.to(res_t), dw.to(w_t), dlb.to(lb_t), None, None, None

    _fused_forward.register_autograd(_gradients, setup_context=_setup)

    def _attention_args(q: torch.Tensor, max_len: int, p: float) -> dict[str, object]:
        """The attention kernels' scalar arguments."""
        head = q.shape[-1]
        return dict(
            scale=math.log2(math.e) / math.sqrt(head),  # the scores in log2 units, for exp2
            drop=ops.drop_levels(p),
            keep_scale=ops.keep_scale(p),
            head=head,
            block_n=max(16, triton.next_power_of_2(max_len)),
            dropout=ops.drop_levels(p) > 0,
            precision="ieee" if q.dtype == torch.float32 else "tf32",  # fp32: no tf32 rounding
        )

    def _attention_grid(cu_seqlens: torch.Tensor, heads: int, block_n: int, block: str):  # type: ignore[no-untyped-def]
        """(sequences, heads, blocks of a sequence's block_n rows or keys) for a config."""

        def grid(meta: dict[str, int]) -> tuple[int, int, int]:
            return (cu_seqlens.shape[0] - 1, heads, triton.cdiv(block_n, meta[block]))

        return grid

    @torch.library.triton_op("bertforge::attention_forward", mutates_args=())
    def _attention_forward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        seed: torch.Tensor,
        max_len: int,
        p: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, heads, head = q.shape
        o = torch.empty(t, heads, head, dtype=q.dtype, device=q.device)
        lse = torch.empty(t, heads, dtype=torch.float32, device=q.device)
        args = _attention_args(q, max_len, p)
        # the keep decisions, a byte for each (sequence, head, row, eight keys); none without
        # dropout
        block_n = args["block_n"]
        rows = (cu_seqlens.shape[0] - 1) * heads * block_n if args["dropout"] else 0
        mask = torch.empty(rows, block_n // 8, dtype=torch.uint8, device=q.device)
        torch.library.wrap_triton(_attention_forward_kernel)[
            _attention_grid(cu_seqlens, heads, block_n, "block_m")
        ](q, k, v, cu_seqlens, seed, o, lse, mask, q.stride(0), k.stride(0), v.stride(0), heads,
          **args)  # fmt: skip
        return o, lse, mask

    @torch.library.triton_op("bertforge::attention_backward", mutates_args=())
    def _attention_backward(
        do: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        o: torch.Tensor,
        lse: torch.Tensor,
        cu_seqlens: torch.Tensor,
        mask: torch.Tensor,
        max_len: int,
        p: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, heads, head = q.shape
        dq, dk, dv = (
            torch.empty(t, heads, head, dtype=x.dtype, device=x.device) for x in (q, k, v)
        )
        delta = torch.empty_like(lse)  # each row's sum of do x o, from the first kernel
        args = _attention_args(q, max_len, p) | {"softmax_scale": 1 / math.sqrt(head)}
        strides = (q.stride(0), k.stride(0), v.stride(0), heads)
        torch.library.wrap_triton(_attention_dq_kernel)[
            _attention_grid(cu_seqlens, heads, args["block_n"], "block_m")
        ](q, k, v, o, do, lse, cu_seqlens, mask, dq, delta, *strides, **args)
        torch.library.wrap_triton(_attention_dkdv_kernel)[
            _attention_grid(cu_seqlens, heads, args["block_n"], "block_k")
        ](q, k, v, do, lse, delta, cu_seqlens, mask, dk, dv, *strides, **args)
        return dq, dk, dv

    def _attention_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        q, k, v, cu_seqlens, _, max_len, p = inputs
        o, lse, mask = output
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, mask)
        ctx.max_len, ctx.p = max_len, p

    def _attention_gradients(ctx, do, _lse, _mask):  # type: ignore[no-untyped-def]
        q, k, v, o, lse, cu_seqlens, mask = ctx.saved_tensors
        dq, dk, dv = _attention_backward(
            do.contiguous(), q, k, v, o, lse, cu_seqlens, mask, ctx.max_len, ctx.p
        )
        return dq, dk, dv, None, None, None, None

    _attention_forward.register_autograd(_attention_gradients, setup_context=_attention_setup)


def adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """torch's fused AdamW update (`torch._fused_adamw_`, its formulas) of one flat fp32 buffer
    in place, one program per ADAMW_BLOCK elements over the whole buffer: torch's multi-tensor
    launcher runs at most 320 blocks of 64k elements a launch. `step`: the step count (a
    1-element tensor, already counting this step); `grad_scale`: the gradients are divided by
    it as they are read (left as they were in memory, where torch's kernel writes them back
    divided); `found_inf`: nothing moves where it is nonzero. The elements in fp32 (torch's
    kernel computes in fp64 with its fp64 scalars): within a few ulp of it."""
    n = param.numel()
    if not all(t.is_contiguous() and t.numel() == n for t in (grad, exp_avg, exp_avg_sq)):
        raise ValueError("adamw_: param, grad and moments must be contiguous, of one size")
    beta1, beta2 = betas
    none = step  # a stand-in pointer where a scale or flag is not given (never read)
    grid = (triton.cdiv(n, ADAMW_BLOCK),)
    _adamw_kernel[grid](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        step,
        none if grad_scale is None else grad_scale,
        none if found_inf is None else found_inf,
        n,
        lr,
        lr * weight_decay,
        beta1,
        1 - beta1,
        beta2,
        1 - beta2,
        math.log(beta1),
        math.log(beta2),
        eps,
        grad_scale is not None,
        found_inf is not None,
        ADAMW_BLOCK,
        num_warps=ADAMW_WARPS,
    )


def _dropout_seed(p: float, device: torch.device, caller: str) -> torch.Tensor:
    """The seed a kernel's dropout draws from, [1] int64 on `device`: from torch's generator,
    so seeding and checkpointed RNG state cover the draws (0, and no draw, for p = 0); p
    outside [0, 1) as rounded by `ops.drop_levels` refused, naming `caller`."""
    if not 0 <= p < 1 or ops.drop_levels(p) == ops.LEVELS:
        raise ValueError(f"{caller}: dropout probability {p} is not in [0, 1)")
    if p > 0:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return torch.zeros(1, dtype=torch.int64, device=device)


def fused_norm(
    h: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    p: float,
    eps: float,
) -> torch.Tensor:
    """layer_norm(residual + dropout(h + bias, p), weight, ln_bias, eps) over the last dim, in
    h's dtype (see the module docstring), with one kernel each way. h and residual: [..., N],
    the same shape; bias, weight, ln_bias: [N]. p = 0 for no dropout (evaluation)."""
    seed = _dropout_seed(p, h.device, "fused_norm")
    n = h.shape[-1]
    y, _, _, _ = _fused_forward(
        h.reshape(-1, n).contiguous(),
        bias,
        residual.reshape(-1, n).contiguous(),
        weight,
        ln_bias,
        seed,
        float(p),
        float(eps),
    )
    return y.view(h.shape)


def bias_gelu(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(h + bias) (the erf form, BERT's), in h's dtype, with one kernel each way; the
    backward also sums the bias's gradient. h: [..., F], bias: [F]. erf is Abramowitz and
    Stegun's 7.1.26 (absolute error under 5e-7 in fp32, against libdevice's few ulp; far below
    bf16's 4e-3; branch-free, one exp shared with the backward's density) where inductor
    calls libdevice's: on sm_90, inductor's bias + GELU kernels take 41.8 and 58.4
    instructions an element (bench/kernel_census.py), more than their bytes allow."""
    f = h.shape[-1]
    return _gelu_forward(h.reshape(-1, f).contiguous(), bias).view(h.shape)


def feed_forward_fits(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> bool:
    """Whether `feed_forward` takes x [..., K] with ffn_in's weight [N, K]: K a multiple of
    FFN_BLOCK_K (every BERT size is; the same for ffn_out's rows, w_out [K, N]), where the
    kernels run."""
    return usable(x) and w_in.shape[1] % FFN_BLOCK_K == 0 and w_out.shape[0] % FFN_BLOCK_K == 0


def feed_forward(
    x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor
) -> torch.Tensor:
    """gelu(x @ w_in^T + b_in) @ w_out^T (the erf form; BERT's feed-forward without its
    output bias), with GELU in the matmuls' epilogues: one Triton kernel takes ffn_in's
    product and writes both the product and GELU of it with the bias; in the backward, one
    takes the product of the output's gradient with w_out and writes the gradient at GELU's
    input (GELU' of the saved product), with the bias's partial sums. The other matmuls are
    torch's (cuBLAS). Against the matmuls with `bias_gelu` between them, the kernels do not
    read the product back for GELU, nor write and read back the gradient of GELU's output:
    three of the five passes over a [tokens, N] tensor that GELU costs each layer
    (bench/RESULTS.md, session 33). x: [..., K], w_in: [N, K], b_in: [N], w_out: [K', N]
    (see `feed_forward_fits`). Under autocast the matmuls take its dtype, as F.linear does;
    the bias stays as it is (read in fp32)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w_in, w_out = x.to(dtype), w_in.to(dtype), w_out.to(dtype)
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # the kernels take row-major operands
    z, _, _ = _ffn_forward(rows, w_in.contiguous(), b_in, w_out.contiguous())
    return z.view(*x.shape[:-1], z.shape[-1])


def attention_fits(q: torch.Tensor, max_len: int) -> bool:
    """Whether `attention` takes q [T, heads, head] of a packed batch whose sequences are at
    most max_len long: the head size one of ATTENTION_HEADS, every sequence within one tile
    (ATTENTION_MAX_LEN), a float dtype."""
    return (
        q.shape[-1] in ATTENTION_HEADS
        and max_len <= ATTENTION_MAX_LEN
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def _heads_view(x: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head] with its heads side by side in memory (a view of the qkv projection's
    output is); a copy otherwise."""
    head = x.shape[-1]
    return x if x.stride(-1) == 1 and x.stride(-2) == head else x.contiguous()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    p: float,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(head)) with dropout p, times v, within each sequence of a packed
    batch: q, k, v [T, heads, head] (views of one qkv projection are read in place),
    cu_seqlens [B+1] int32 where each sequence starts, max_len a bound on their lengths (at
    most ATTENTION_MAX_LEN: `attention_fits`). Returns [T, heads, head] in q's dtype.

    Why bertforge's own: at BERT's lengths all of a sequence's keys fit one tile, so the
    forward's softmax needs no running maximum, and the backward is two kernels that each
    write their gradients once (dq by blocks of query rows, which also writes each row's sum
    of do x o; dk and dv by blocks of keys): no atomics, no fp32 accumulation buffer. On the
    H200 flash varlen took 5.6 ms of BERT-base's packed step (seq 128), where its bytes need
    about 1.5 ms (bench/RESULTS.md, session 29). Dropout decides from 15 bits of a Philox
    draw, eight decisions a call (`ops.drop_levels`: p rounded to a multiple of 1/32768); the
    forward keeps them as bits, a byte per row and eight keys, which both backward kernels
    read instead of drawing them again (counted for sm_90: the backward's instructions a
    sixth fewer, the whole's 7%, bench/RESULTS.md). Scores
    and softmax in fp32, the probabilities rounded to q's dtype for their product with v, as
    flash attention does."""
    if not attention_fits(q, max_len):
        raise ValueError(f"attention: q {tuple(q.shape)} {q.dtype} with sequences up to "
                         f"{max_len} long does not fit (attention_fits)")  # fmt: skip
    seed = _dropout_seed(p, q.device, "attention")
    o, _, _ = _attention_forward(
        _heads_view(q), _heads_view(k), _heads_view(v), cu_seqlens, seed, int(max_len), float(p)
    )
    return o
