"""`kernels.fused_norm` against float64 torch: values, every gradient, the dropout draws, the
model's layer, and the graphs torch.compile's autograd traces from it.

Needs Triton. On CUDA every test runs on the GPU. On a CPU the numeric tests run under
Triton's interpreter (TRITON_INTERPRET=1) and the tracing test without it (the interpreter
cannot be traced); tests/test_kernels.py runs this file both ways in the Triton environment
that `make test` builds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from bertforge import kernels, ops  # noqa: E402
from tests.kernels.common import (  # noqa: E402
    DEVICE,
    compile_for_sm90,
    compiled,
    configs_in_turn,
    kernel_name,
    launches,
    layer_with_and_without,
    numeric,
    traced,
)

# each configuration in turn, rows of a tile 2 or 4 each way, mixed: the kernels must agree
# whatever tiles each one takes
config = configs_in_turn(
    (kernels._forward_kernel, kernels.FORWARD_CONFIGS),
    (kernels._backward_kernel, kernels.BACKWARD_CONFIGS),
)


def inputs(t: int, n: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """h, bias, residual, weight, ln_bias (leaves with gradients) and an output gradient."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dt)

    # a residual stream with a mean far from 0, as BERT's often has: LayerNorm then subtracts
    # a large mean, which a rounded sum would show
    leaves = [
        rand(t, n, dt=dtype),
        rand(n, scale=0.5),
        (torch.randn(t, n, generator=g) * 2 + 3).to(DEVICE, dtype),
        1 + rand(n, scale=0.2),
        rand(n, scale=0.2),
    ]
    return [x.requires_grad_() for x in leaves] + [rand(t, n, dt=dtype)]


def reference(
    leaves: list[torch.Tensor], dy: torch.Tensor, keep: torch.Tensor, p: float, eps: float
):
    """The block in float64 with the given keep mask: output and the five gradients."""
    h, bias, res, w, lb = (x.detach().double().requires_grad_() for x in leaves)
    u = torch.where(keep, (h + bias) * ops.keep_scale(p), 0) if p else h + bias
    y = F.layer_norm(res + u, (h.shape[-1],), w, lb, eps)
    y.backward(dy.double())
    return y.detach(), [x.grad for x in (h, bias, res, w, lb)]


def run(leaves: list[torch.Tensor], dy: torch.Tensor, p: float, eps: float):
    y = kernels.fused_norm(*leaves, p, eps)
    y.backward(dy)
    grads = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    return y.detach(), grads


@numeric
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("n", [96, 30, 13])  # quarters of 24, of 8 (blocks of 8), of 4 (last: 1)
def test_matches_float64_layer_norm_with_the_same_mask(n, p, dtype, config):
    t, eps = 37, 1e-12  # rows not a multiple of the tile's; BERT's epsilon
    *leaves, dy = inputs(t, n, dtype)
    y, grads = run(leaves, dy, p, eps)
    # the backward draws the mask again: where h's gradient is 0 it dropped the element (dy is
    # random, so dz is never 0). The forward must have dropped the same ones for y to match.
    keep = grads[0] != 0
    if p == 0:
        assert keep.all()
    else:
        assert 0.6 < keep.float().mean() < 0.99
    y_ref, ref = reference(leaves, dy, keep, p, eps)
    assert y.dtype == dtype and y.shape == dy.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    else:  # computed in fp32, rounded once to bf16 (the interpreter truncates: one ulp)
        ulps = 2**-7 if kernels.interpreted() else 2**-8
        assert ((y.double() - y_ref).abs() <= y_ref.abs() * ulps + 1e-6).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    names = ["h", "bias", "residual", "weight", "ln_bias"]
    for name, leaf, got, want in zip(names, leaves, grads, ref, strict=True):
        assert got.dtype == leaf.dtype, name
        scale = want.abs().max().item()
        err = (got.double() - want).abs().max().item()
        assert err <= tol * scale, f"{name}: {err} > {tol} x {scale}"


@numeric
def test_draws_follow_torch_seed_and_differ_per_quarter(config):
    t, n, p = 32, 64, 0.25  # 8 to 16 tiles
    *leaves, dy = inputs(t, n, torch.float32, seed=1)

    def mask(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return run(leaves, dy, p, 1e-12)[1][0] != 0

    a, b, c = mask(5), mask(5), mask(6)
    assert torch.equal(a, b)  # torch's generator seeds the draws: reproducible
    assert not torch.equal(a, c)
    rate = 1 - a.float().mean().item()
    assert abs(rate - p) < 4 * (p * (1 - p) / a.numel()) ** 0.5
    # one Philox call decides element j of each quarter: its four outputs must differ
    q = n // 4
    quarters = [a[:, k * q : (k + 1) * q] for k in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(quarters[i], quarters[j])
    # and the rows differ (the call index includes the row)
    assert not torch.equal(a[0], a[1])


@numeric
def test_without_dropout_equals_layer_norm_and_takes_no_random_numbers():
    *leaves, _ = inputs(16, 48, torch.float32, seed=2)
    torch.manual_seed(0)
    y = kernels.fused_norm(*leaves, 0.0, 1e-5)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))  # the generator did not move
    h, bias, res, w, lb = leaves
    torch.testing.assert_close(y, F.layer_norm(res + h + bias, (48,), w, lb, 1e-5))


def test_rejects_a_drop_probability_of_one():
    *leaves, _ = inputs(4, 8, torch.float32)
    with pytest.raises(ValueError, match=r"dropout probability 1.0 is not in \[0, 1\)"):
        kernels.fused_norm(*leaves, 1.0, 1e-12)


@numeric
def test_layer_fused_matches_the_plain_layer(monkeypatch):
    """The model's layer with fused_norm: the same outputs and weight gradients as without,
    dropout off (its draws differ by design)."""
    layer_with_and_without("fused_norm", "fused_norm", monkeypatch)


@numeric
def test_layer_with_every_option_matches_the_plain_layer(monkeypatch):
    """Both fused kernels and q/k/v split (--split-qkv) together: the plain layer's numbers."""
    layer_with_and_without("fused_norm", "fused_norm", monkeypatch, ("fused_gelu", "split_qkv"))


@numeric
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_the_pruned_last_layer_with_both_kernels_matches_the_plain_one(monkeypatch, packed):
    """The last layer at the heads' rows only (prune_last_layer, the default) hands both
    kernels [B, Q, H] rows: the plain layer's numbers there."""
    also = ("fused_gelu", "split_qkv")
    layer_with_and_without("fused_norm", "fused_norm", monkeypatch, also, packed, rows=True)


@traced
def test_compile_traces_both_kernels_and_the_backward_reads_the_forwards_mask():
    """What torch.compile's autograd makes of the op (AOT autograd over fake tensors, as
    inductor sees it): the forward kernel in the forward graph, drawing from a seed drawn
    there; the backward kernel in the backward graph, reading the mask the forward wrote and
    autograd saved."""
    (fw,), (bw,) = launches(
        lambda *a: kernels.fused_norm(*a, 0.1, 1e-12), lambda: inputs(64, 96, torch.bfloat16)
    )
    assert (kernel_name(fw), kernel_name(bw)) == ("_forward_kernel", "_backward_kernel")
    assert "randint" in str(fw.kwargs["kwargs"]["seed_ptr"].target)
    assert bw.kwargs["kwargs"]["mask_ptr"].op == "placeholder"  # saved by the forward
    assert "seed_ptr" not in bw.kwargs["kwargs"]


@compiled
@pytest.mark.parametrize(("dtype", "p"), [("bf16", 0.1), ("fp32", 0.0)])
def test_kernels_compile_for_an_h100(dtype, p):
    """Both kernels, every configuration, through Triton's CUDA pipeline for sm_90: what the
    interpreter never checks (it once passed a tile shape the compiler refused)."""
    shared = {"n": 768, "quarter": 192, "scale": ops.keep_scale(p), "block_q": 256,
              "dropout": p > 0}  # fmt: skip
    half = f"*{dtype}"
    compile_for_sm90(
        kernels._forward_kernel,
        {"h_ptr": half, "bias_ptr": "*fp32", "res_ptr": half, "w_ptr": "*fp32",
         "b_ptr": "*fp32", "seed_ptr": "*i64", "y_ptr": half, "zhat_ptr": half,
         "rstd_ptr": "*fp32", "mask_ptr": "*u8", "t": "i32"},
        {**shared, "drop": ops.drop_levels(p), "eps": 1e-12},
    )  # fmt: skip
    compile_for_sm90(
        kernels._backward_kernel,
        {"dy_ptr": half, "zhat_ptr": half, "rstd_ptr": "*fp32", "w_ptr": "*fp32",
         "mask_ptr": "*u8", "dres_ptr": half, "dh_ptr": half, "partial_ptr": "*fp32",
         "t": "i32"},
        shared,
    )  # fmt: skip
