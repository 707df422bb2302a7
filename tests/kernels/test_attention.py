"""`kernels.attention` (packed batches, sequences of at most 128 tokens) against float64 torch:
values and the three gradients with the kernel's own dropout mask, the draws, views of one
qkv projection, the model's packed layer, the graphs torch.compile's autograd traces, and the
sm_90 compile without spilled registers. Needs Triton; how it runs on a CPU:
tests/kernels/test_fused_norm.py's docstring."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

triton = pytest.importorskip("triton")

from bertforge import kernels, ops  # noqa: E402
from tests.kernels.common import (  # noqa: E402
    DEVICE,
    bench_module,
    compile_for_sm90,
    compiled,
    configs_in_turn,
    kernel_name,
    launches,
    layer_with_and_without,
    numeric,
    run_bench,
    sm90_driver,
    stack_bytes,
    traced,
)

# each configuration in turn, the three kernels cutting the 128 x 128 scores differently
config = configs_in_turn(
    (kernels._attention_forward_kernel, kernels.ATTENTION_FORWARD_CONFIGS, "block_m"),
    (kernels._attention_dq_kernel, kernels.ATTENTION_QUERY_CONFIGS, "block_m"),
    (kernels._attention_dkdv_kernel, kernels.ATTENTION_KEY_CONFIGS, "block_k"),
)
# a full-length sequence (two or four blocks of every kernel), lengths off the blocks, one token
LENGTHS = [70, 128, 1, 33, 96]


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def keep_mask(lengths: list[int], heads: int, p: float, seed: int) -> list[torch.Tensor]:
    """The kernel's keep decisions per sequence, [heads, L, L], read back through the kernel
    itself under the same torch seed: with q = k = 0 every probability is 1 / L, and v the
    identity (head size 128 >= L) makes row i of the output row i of the kept, scaled
    probabilities. The decisions depend on the sequence, head, row, key and seed only."""
    t, cu = sum(lengths), cu_seqlens(lengths)
    eye = torch.zeros(t, heads, 128)
    for b, n in enumerate(lengths):
        eye[cu[b] : cu[b] + n, :, :n] = torch.eye(n)[:, None, :]
    zeros = torch.zeros(t, heads, 128, device=DEVICE)
    torch.manual_seed(seed)
    o = kernels.attention(zeros, zeros, eye.to(DEVICE), cu.to(DEVICE), max(lengths), p).cpu()
    masks = []
    for b, n in enumerate(lengths):
        rows = o[cu[b] : cu[b] + n, :, :n].transpose(0, 1)
        kept = rows * n / ops.keep_scale(p)
        assert torch.allclose(kept, kept.round(), atol=1e-4), "not a 0/1 mask"
        masks.append(kept.round().double())
    return masks


def reference(q, k, v, lengths, masks, p):  # type: ignore[no-untyped-def]
    """Attention per sequence in float64 with the given keep masks (None: no dropout)."""
    cu, out = cu_seqlens(lengths), []
    for b, n in enumerate(lengths):
        qs, ks, vs = (x[cu[b] : cu[b] + n].transpose(0, 1) for x in (q, k, v))
        probs = torch.softmax(qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
        if masks is not None:
            probs = probs * masks[b] * ops.keep_scale(p)
        out.append((probs @ vs).transpose(0, 1))
    return torch.cat(out)


@numeric
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_attention_with_the_same_mask(p, dtype, config):
    heads, head = 2, 32
    g = torch.Generator().manual_seed(0)
    t = sum(LENGTHS)
    q, k, v = (torch.randn(t, heads, head, generator=g).to(DEVICE, dtype) for _ in range(3))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    do = torch.randn(t, heads, head, generator=g).to(DEVICE, dtype)
    torch.manual_seed(7)
    o = kernels.attention(q, k, v, cu_seqlens(LENGTHS).to(DEVICE), 128, p)
    o.backward(do)
    masks = keep_mask(LENGTHS, heads, p, seed=7) if p > 0 else None
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    o64 = reference(q64, k64, v64, LENGTHS, masks, p)
    o64.backward(do.cpu().double())
    assert o.dtype == q.grad.dtype == k.grad.dtype == v.grad.dtype == dtype
    # fp32: products in fp32; bf16: the probabilities and the scores' gradient rounded to bf16
    # before their products, as flash attention does (a few ulp of the largest values)
    tol = 2e-6 if dtype == torch.float32 else 3e-2
    for got, want in ((o, o64), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        scale = want.abs().max()
        torch.testing.assert_close(got.cpu().double() / scale, want / scale, rtol=0, atol=tol)


@numeric
def test_draws_follow_torch_seed_and_differ_per_sequence_and_head():
    lengths = [128, 128, 64]
    a = keep_mask(lengths, 2, 0.1, seed=1)
    b = keep_mask(lengths, 2, 0.1, seed=1)
    c = keep_mask(lengths, 2, 0.1, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert not torch.equal(a[0][0], a[0][1])  # the two heads
    assert not torch.equal(a[0], a[1])  # two sequences of one length
    # 2 x (128^2 + 128^2 + 64^2) decisions, each kept with probability 1 - 3277 / 32768:
    # the rate within 5 standard deviations (0.0011)
    kept = sum(float(m.sum()) for m in a) / sum(m.numel() for m in a)
    assert abs(kept - (1 - ops.drop_levels(0.1) / ops.LEVELS)) < 0.0055
    # and no pattern along the keys: every group of eight keys a call decides keeps the rate
    columns = torch.cat([m.reshape(-1, m.shape[-1]) for m in a[:2]]).mean(0)
    assert columns.min() > 0.85 and columns.max() < 0.95, columns


@numeric
def test_views_of_one_projection_are_read_in_place():
    """q, k, v as the model hands them, views of one [T, 3, heads, head] projection with a
    token stride of 3 x hidden: the same numbers as contiguous copies, no copy made."""
    g = torch.Generator().manual_seed(0)
    t, heads, head = sum(LENGTHS), 2, 16
    qkv = torch.randn(t, 3, heads, head, generator=g).to(DEVICE).requires_grad_()
    do = torch.randn(t, heads, head, generator=g).to(DEVICE)
    cu = cu_seqlens(LENGTHS).to(DEVICE)
    q, k, v = qkv.unbind(1)
    assert kernels._heads_view(q) is q
    o = kernels.attention(q, k, v, cu, 128, 0.0)
    o.backward(do)
    parts = [x.detach().clone().contiguous().requires_grad_() for x in qkv.unbind(1)]
    o2 = kernels.attention(*parts, cu, 128, 0.0)
    o2.backward(do)
    torch.testing.assert_close(o, o2, rtol=0, atol=0)
    torch.testing.assert_close(qkv.grad, torch.stack([x.grad for x in parts], 1), rtol=0, atol=0)


@numeric
def test_without_dropout_takes_no_random_numbers():
    x = torch.randn(5, 2, 16, device=DEVICE)
    torch.manual_seed(3)
    kernels.attention(x, x, x, cu_seqlens([2, 3]).to(DEVICE), 3, 0.0)
    after = torch.randint(0, 2**30, (1,))
    torch.manual_seed(3)
    assert torch.equal(after, torch.randint(0, 2**30, (1,)))


def test_refuses_what_it_does_not_fit():
    x = torch.zeros(4, 2, 16)
    cu = cu_seqlens([4])
    with pytest.raises(ValueError, match=r"dropout probability 1\.0"):
        kernels.attention(x, x, x, cu, 4, 1.0)
    with pytest.raises(ValueError, match="up to 129 long does not fit"):
        kernels.attention(x, x, x, cu, 129, 0.1)
    odd = torch.zeros(4, 2, 24)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.attention(odd, odd, odd, cu, 4, 0.1)
    assert kernels.attention_fits(x, 128) and not kernels.attention_fits(odd, 128)


@numeric
def test_layer_with_fused_attention_matches_the_plain_packed_layer(monkeypatch):
    layer_with_and_without("fused_attention", "attention", monkeypatch, packed=True)


@numeric
def test_layer_with_every_option_matches_the_plain_packed_layer(monkeypatch):
    also = ("fused_norm", "fused_gelu", "split_qkv")
    layer_with_and_without("fused_attention", "attention", monkeypatch, also, packed=True)


@traced
def test_compile_traces_the_forward_and_both_backward_kernels():
    """AOT autograd over fake tensors, as inductor sees it: the forward kernel in the forward
    graph, drawing from a seed drawn there; dq's kernel, then dk and dv's, in the backward,
    reading the forward's lse and dropout mask, which autograd saved (no draw of their own)."""

    def make() -> list[torch.Tensor]:
        t = sum(LENGTHS)
        x = [torch.randn(t, 4, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        return [*x, cu_seqlens(LENGTHS), torch.randn(t, 4, 64, dtype=torch.bfloat16)]

    with sm90_driver():  # what the kernels write, read from their TTIR as on a GPU
        (fw,), (dq, dkdv) = launches(
            lambda q, k, v, cu: kernels.attention(q, k, v, cu, 128, 0.1), make
        )
    names = [kernel_name(x) for x in (fw, dq, dkdv)]
    assert names == ["_attention_forward_kernel", "_attention_dq_kernel", "_attention_dkdv_kernel"]
    assert "randint" in str(fw.kwargs["kwargs"]["seed_ptr"].target)

    def source(node):  # type: ignore[no-untyped-def]
        while node.op == "call_function" and "detach" in str(node.target):
            node = node.args[0]
        return node

    for launch in (dq, dkdv):
        args = launch.kwargs["kwargs"]
        assert "seed_ptr" not in args
        assert source(args["mask_ptr"]).op == "placeholder"  # saved by the forward
        assert source(args["lse_ptr"]).op == "placeholder"
    assert dkdv.kwargs["kwargs"]["delta_ptr"].args[0] is dq  # delta as dq's kernel wrote it


@compiled
@pytest.mark.parametrize(("dtype", "p"), [("bf16", 0.1), ("bf16", 0.0), ("fp32", 0.1)])
def test_kernels_compile_for_an_h100_without_spilling(dtype, p):
    """The three kernels, every configuration, through Triton's CUDA pipeline for sm_90 at
    BERT's head size and 128 keys, aligned as the model's tensors are; in bf16 (the training
    dtype) none spills registers to the stack: with the keys, values and both key gradients
    of a whole sequence in one program every configuration did (bench/RESULTS.md, session
    29)."""
    half, f32 = f"*{dtype}", "*fp32"
    scalars = {"q_stride": "i32", "k_stride": "i32", "v_stride": "i32", "heads": "i32",
               "scale": "fp32", "keep_scale": "fp32", "cu_ptr": "*i32", "lse_ptr": f32,
               "mask_ptr": "*u8"}  # fmt: skip
    constants = {"drop": ops.drop_levels(p), "head": 64, "block_n": 128, "dropout": p > 0,
                 "precision": "ieee" if dtype == "fp32" else "tf32"}  # fmt: skip
    tensors = {
        kernels._attention_forward_kernel: ("q", "k", "v", "o"),
        kernels._attention_dq_kernel: ("q", "k", "v", "o", "do", "dq"),
        kernels._attention_dkdv_kernel: ("q", "k", "v", "do", "dk", "dv"),
    }
    for tuner, names in tensors.items():
        signature = {**scalars, **{f"{n}_ptr": half for n in names}}
        if tuner is kernels._attention_forward_kernel:
            signature["seed_ptr"] = "*i64"
        else:
            signature |= {"delta_ptr": f32, "softmax_scale": "fp32"}
        for done in compile_for_sm90(tuner, signature, constants, aligned=True):
            if dtype == "bf16":
                assert stack_bytes(done) == 0, (tuner.fn.__name__, done.metadata.num_warps)


@numeric
def test_the_attention_bench_runs_and_its_sides_agree():
    """bench/attention_kernel.py (the GPU round's `attention` stage) at BERT-tiny's shapes: both
    sides timed, the same numbers without dropout."""
    argv = ["--model-size", "tiny", "--batch-size", "4", "--seq-len", "32", "--rounds", "1"]
    got = run_bench("attention_kernel", *argv, "--steps", "1", "--device", DEVICE)
    assert got["max_abs_diff_without_dropout"] < 1e-2  # bf16 on CUDA, fp32 here
    assert got["ours_fwd_bwd_ms"] > 0 and got["theirs_fwd_bwd_ms"] > 0 and got["tokens"] > 4
    line = bench_module("gpu_summary").attention_line(got, "attention")  # what it reads of it
    assert line.startswith("attention: one layer's attention")


@compiled
def test_the_attention_count_compiles_every_kernel_for_sm90():
    """bench/attention_kernel.py --count (no GPU): each kernel's instructions for sm_90, with
    dropout more than without (the draws, the bits), and the bytes."""
    argv = ["--count", "--model-size", "mini", "--batch-size", "16", "--dropout"]
    got = {p: run_bench("attention_kernel", *argv, p) for p in ("0.1", "0")}
    assert set(got["0.1"]["kernels"]) == {"forward", "dq", "dk_dv"}
    for name, kernel in got["0.1"]["kernels"].items():
        assert (
            kernel["instructions_a_program"] > got["0"]["kernels"][name]["instructions_a_program"]
        )
    assert got["0.1"]["gb_a_step"] > got["0"]["gb_a_step"] > 0
