"""`kernels.bias_gelu` against float64 torch: values and gradients, the erf it computes, the
model's layer, the graphs torch.compile's autograd traces, and the sm_90 compile. Needs
Triton; how it runs on a CPU: tests/kernels/test_fused_norm.py's docstring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from bertforge import kernels  # noqa: E402
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

config = configs_in_turn(
    (kernels._gelu_forward_kernel, kernels.GELU_FORWARD_CONFIGS),
    (kernels._gelu_backward_kernel, kernels.GELU_BACKWARD_CONFIGS),
)


@numeric
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 96), (9, 2112)])  # rows off the tiles; 3 column blocks
def test_matches_float64_gelu_and_its_gradients(shape, dtype, config):
    g = torch.Generator().manual_seed(0)
    t, f = shape
    h = (torch.randn(t, f, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    bias = (torch.randn(f, generator=g) * 0.5).to(DEVICE).requires_grad_()
    dy = torch.randn(t, f, generator=g).to(DEVICE, dtype)
    y = kernels.bias_gelu(h, bias)
    y.backward(dy)
    h64, b64 = (x.detach().double().requires_grad_() for x in (h, bias))
    y64 = F.gelu(h64 + b64)
    y64.backward(dy.double())
    assert y.dtype == dtype and h.grad.dtype == dtype and bias.grad.dtype == torch.float32
    if dtype == torch.float32:  # the erf's 1.5e-7 times |u| / 2, and fp32 rounding
        torch.testing.assert_close(y.double(), y64, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)
    else:  # rounded once to bf16 (the interpreter truncates: one ulp)
        ulps = 2**-7 if kernels.interpreted() else 2**-8
        assert ((y.double() - y64).abs() <= y64.abs() * ulps + 1e-6).all()
        assert ((h.grad.double() - h64.grad).abs() <= h64.grad.abs() * ulps + 1e-6).all()
    # the bias's gradient: fp32 sums of the fp32 du, before rounding
    torch.testing.assert_close(bias.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)


@numeric
def test_erf_is_within_its_bound_over_the_whole_range():
    """GELU at 4,096 points over [-12, 12] in fp32 against float64: erf's error stays under
    5e-7 everywhere, tails included (A&S 7.1.26's 1.5e-7, and fp32's rounding of 1 - q e near
    0; measured 4.2e-7 there), so the output is within 2.5e-7 |u| and fp32's rounding."""
    u = torch.linspace(-12, 12, 4096, dtype=torch.float64)
    y = kernels.bias_gelu(u.float().to(DEVICE)[None], torch.zeros(4096, device=DEVICE))[0]
    exact = F.gelu(u.float().double())
    bound = 2.5e-7 * u.abs() + 1.2e-7 * exact.abs() + 1e-30
    assert ((y.cpu().double() - exact).abs() <= bound).all()


@numeric
def test_layer_fused_gelu_matches_the_plain_layer(monkeypatch):
    layer_with_and_without("fused_gelu", "bias_gelu", monkeypatch)


@traced
def test_compile_traces_both_kernels():
    def make() -> list[torch.Tensor]:
        return [
            torch.randn(64, 3072, dtype=torch.bfloat16, requires_grad=True),
            torch.randn(3072, requires_grad=True),
            torch.randn(64, 3072, dtype=torch.bfloat16),
        ]

    graphs = launches(kernels.bias_gelu, make)
    assert [[kernel_name(n) for n in g] for g in graphs] == [
        ["_gelu_forward_kernel"],
        ["_gelu_backward_kernel"],
    ]


@compiled
def test_kernels_compile_for_an_h100():
    constants = {"f": 3072, "columns": kernels.GELU_COLUMNS}
    compile_for_sm90(
        kernels._gelu_forward_kernel,
        {"h_ptr": "*bf16", "bias_ptr": "*fp32", "y_ptr": "*bf16", "t": "i32"},
        constants,
    )
    compile_for_sm90(
        kernels._gelu_backward_kernel,
        {"dy_ptr": "*bf16", "h_ptr": "*bf16", "bias_ptr": "*fp32", "du_ptr": "*bf16",
         "partial_ptr": "*fp32", "t": "i32"},
        constants,
    )  # fmt: skip
