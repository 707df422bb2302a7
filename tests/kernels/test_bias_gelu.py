"""`kernels.bias_gelu` against float64 torch: values and gradients, the erf it computes, the
model's layer, the graphs torch.compile's autograd traces, and the sm_90 compile. Needs
Triton; how it runs on a CPU: tests/kernels/test_fused_norm.py's docstring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from bertforge import kernels  # noqa: E402
from bertforge.model import BertConfig, Layer  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
numeric = pytest.mark.skipif(
    not (CUDA or kernels.interpreted()), reason="needs CUDA or TRITON_INTERPRET=1"
)


@pytest.fixture(params=range(len(kernels.GELU_FORWARD_CONFIGS)))
def config(request, monkeypatch):
    """Each autotuned configuration of the two kernels (rows of a tile, warps)."""
    i = request.param
    for fn, pairs in (
        (kernels._gelu_forward_kernel, kernels.GELU_FORWARD_CONFIGS),
        (kernels._gelu_backward_kernel, kernels.GELU_BACKWARD_CONFIGS),
    ):
        rows, warps = pairs[i]
        monkeypatch.setattr(fn, "configs", [triton.Config({"rows_per": rows}, num_warps=warps)])
    return i


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
def test_layer_fused_gelu_matches_the_plain_layer():
    c = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    layer = Layer(c).to(DEVICE).eval()
    x = torch.randn(2, 5, 32, device=DEVICE)
    dy = torch.randn(2, 5, 32, device=DEVICE)
    outs = []
    for fused in (False, True):
        layer.fused_gelu = fused
        layer.zero_grad()
        y = layer(x, None)
        y.backward(dy)
        outs.append((y.detach(), {k: v.grad.clone() for k, v in layer.named_parameters()}))
    (y0, g0), (y1, g1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.skipif(kernels.interpreted(), reason="the interpreter's kernels cannot be traced")
def test_compile_traces_both_kernels():
    from torch._functorch.aot_autograd import aot_function
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs = []

    def keep(gm, _):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm

    f = aot_function(kernels.bias_gelu, fw_compiler=keep, bw_compiler=keep)
    with FakeTensorMode():
        h = torch.randn(64, 3072, dtype=torch.bfloat16, requires_grad=True)
        bias = torch.randn(3072, requires_grad=True)
        f(h, bias).backward(torch.randn(64, 3072, dtype=torch.bfloat16))
    names = [
        [
            kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
            for n in gm.graph.nodes
            if "triton_kernel_wrapper" in str(n.target)
        ]
        for gm in graphs
    ]
    assert names == [["_gelu_forward_kernel"], ["_gelu_backward_kernel"]]


@pytest.mark.skipif(kernels.interpreted(), reason="compiled kernels, not interpreted ones")
def test_kernels_compile_for_an_h100():
    from triton.backends.compiler import GPUTarget

    constants = {"f": 3072, "columns": kernels.GELU_COLUMNS}
    forward = {"h_ptr": "*bf16", "bias_ptr": "*fp32", "y_ptr": "*bf16", "t": "i32"}
    backward = {"dy_ptr": "*bf16", "h_ptr": "*bf16", "bias_ptr": "*fp32", "du_ptr": "*bf16",
                "partial_ptr": "*fp32", "t": "i32"}  # fmt: skip
    for tuner, signature in (
        (kernels._gelu_forward_kernel, forward),
        (kernels._gelu_backward_kernel, backward),
    ):
        for config in tuner.configs:
            fixed = {**constants, **config.kwargs}
            full = {**signature, **{name: "constexpr" for name in fixed}}
            assert set(full) == set(tuner.fn.arg_names)
            source = triton.compiler.ASTSource(fn=tuner.fn, signature=full, constexprs=fixed)
            compiled = triton.compile(
                source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps}
            )
            assert compiled.asm["cubin"], (tuner.fn.arg_names, config)
