"""`kernels.feed_forward` (the feed-forward's matmuls with GELU in their epilogues) against
float64 torch: values and the four gradients, under autocast, the model's layer, the graphs
torch.compile's autograd traces, and the sm_90 compile. Needs Triton; how it runs on a CPU:
tests/kernels/test_fused_norm.py's docstring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from bertforge import kernels  # noqa: E402
from tests.conftest import bench_module  # noqa: E402
from tests.kernels.common import (  # noqa: E402
    CUDA,
    DEVICE,
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

config = configs_in_turn(
    (kernels._ffn_forward_kernel, kernels.FFN_FORWARD_CONFIGS, "block_n"),
    (kernels._ffn_backward_kernel, kernels.FFN_BACKWARD_CONFIGS, "block_n"),
)


def inputs(shape: tuple[int, ...], k: int, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """x [*shape, k], w_in [n, k], b_in [n] (fp32), w_out [k, n] and the output's gradient, at
    the scales of a trained layer (GELU's inputs over its curved part)."""
    g = torch.Generator().manual_seed(0)
    made = [
        torch.randn(*shape, k, generator=g),
        torch.randn(n, k, generator=g) * 2 / k**0.5,
        torch.randn(n, generator=g),
        torch.randn(k, n, generator=g) / n**0.5,
        torch.randn(*shape, k, generator=g),
    ]
    return [t.to(DEVICE, dtype if i != 2 else torch.float32) for i, t in enumerate(made)]


def plain(x, w_in, b_in, w_out):  # type: ignore[no-untyped-def]
    return F.linear(F.gelu(F.linear(x, w_in, b_in.to(x.dtype))), w_out)


def run(fn, tensors):  # type: ignore[no-untyped-def]
    """fn's output and its inputs' gradients, for the given output gradient."""
    *args, dz = (t.detach().requires_grad_(i < 4) for i, t in enumerate(tensors))
    z = fn(*args)
    z.backward(dz)
    return [z.detach(), *(a.grad for a in args)]


def as_close_as(got, base, want, factor: float) -> None:  # type: ignore[no-untyped-def]
    """Each of `run`'s five results (got) no further from float64's (want) than the plain
    path's (base), within `factor` and 1e-3 of the largest value."""
    for name, a, b, c in zip(("z", "dx", "dw_in", "db_in", "dw_out"), got, base, want, strict=True):
        ours, theirs = (a.double() - c).abs().max(), (b.double() - c).abs().max()
        assert ours <= factor * theirs + 1e-3 * c.abs().max(), (name, ours, theirs)


# rows off the row blocks and columns off every column block (each config's tile wraps), one
# and two steps of the product's loop, a [B, S, K] input
SHAPES = [((300,), 64, 160), ((3, 37), 128, 96)]


@numeric
@pytest.mark.parametrize("shape, k, n", SHAPES)
def test_fp32_matches_float64_values_and_gradients(shape, k, n, config):
    """In fp32 a configuration's ring of tiles takes twice bf16's shared memory: on a GPU
    one that does not fit is skipped here, as the autotuner skips it in training."""
    columns, _, stages = kernels.FFN_FORWARD_CONFIGS[config]
    ring = stages * (kernels.FFN_BLOCK_M + columns) * kernels.FFN_BLOCK_K * 4
    if CUDA and ring > torch.cuda.get_device_properties(0).shared_memory_per_block_optin:
        pytest.skip(f"{ring:,} bytes of shared memory in fp32: more than this GPU has")
    tensors = inputs(shape, k, n, torch.float32)
    got = run(kernels.feed_forward, tensors)
    want = run(plain, [t.double() for t in tensors])
    assert [t.dtype for t in got] == [torch.float32] * 5
    for name, a, b in zip(("z", "dx", "dw_in", "db_in", "dw_out"), got, want, strict=True):
        assert a.shape == b.shape, name
        # the erf's 5e-7 and fp32's sums over at most k or m terms
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5 * b.abs().max(), msg=name)


@numeric
@pytest.mark.parametrize("shape, k, n", SHAPES)
def test_bf16_is_as_close_to_float64_as_the_plain_bf16_path(shape, k, n, config):
    """In bf16 each of the five results is no further from float64 than the plain path's
    (F.linear, F.gelu, F.linear in bf16), within a factor for the rounding: the interpreter
    truncates to bf16 where the GPU rounds to nearest. The bias's gradient is summed in fp32
    before rounding, so it is closer than the plain path's."""
    tensors = inputs(shape, k, n, torch.bfloat16)
    got = run(kernels.feed_forward, tensors)
    base = run(plain, tensors)
    want = run(plain, [t.double() for t in tensors])
    assert [t.dtype for t in got] == [torch.bfloat16] * 3 + [torch.float32, torch.bfloat16]
    as_close_as(got, base, want, 3 if kernels.interpreted() else 1.5)


@numeric
def test_autocast_takes_the_matmuls_to_its_dtype():
    """fp32 weights and input under bf16 autocast: the product in bf16 as F.linear's would be,
    the gradients back in the parameters' fp32, as close to float64 as autocast's plain
    path."""
    tensors = inputs((50,), 64, 128, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = run(kernels.feed_forward, tensors)
        base = run(plain, tensors)
    want = run(plain, [t.double() for t in tensors])
    assert [t.dtype for t in got] == [torch.bfloat16] + [torch.float32] * 4
    as_close_as(got, base, want, 3)


@numeric
def test_fits_takes_hidden_sizes_a_multiple_of_the_loop_step():
    x = torch.zeros(4, 64, device=DEVICE)
    assert kernels.feed_forward_fits(x, torch.zeros(96, 64), torch.zeros(64, 96))
    assert not kernels.feed_forward_fits(x[:, :32], torch.zeros(96, 32), torch.zeros(32, 96))
    assert not kernels.feed_forward_fits(x, torch.zeros(96, 64), torch.zeros(32, 96))


@numeric
@pytest.mark.parametrize(
    "also, packed, rows",
    [((), False, False), (("fused_norm",), False, False),
     (("fused_norm", "split_qkv"), True, False), ((), True, True)],
)  # fmt: skip
def test_layer_fused_ffn_matches_the_plain_layer(monkeypatch, also, packed, rows):
    """Padded and packed, with fused_norm (which then takes the product as it is) and
    without (the output bias added after), and at the pruned last layer's rows."""
    layer_with_and_without("fused_ffn", "feed_forward", monkeypatch, also, packed, rows, hidden=64)


@traced
def test_compile_traces_both_kernels():
    def make() -> list[torch.Tensor]:
        return [
            torch.randn(64, 768, dtype=torch.bfloat16, requires_grad=True),
            torch.randn(3072, 768, dtype=torch.bfloat16, requires_grad=True),
            torch.randn(3072, requires_grad=True),
            torch.randn(768, 3072, dtype=torch.bfloat16, requires_grad=True),
            torch.randn(64, 768, dtype=torch.bfloat16),
        ]

    with sm90_driver():  # what the kernels write, read from their TTIR as on a GPU
        graphs = launches(kernels.feed_forward, make)
    assert [[kernel_name(n) for n in g] for g in graphs] == [
        ["_ffn_forward_kernel"],
        ["_ffn_backward_kernel"],
    ]


@compiled
def test_kernels_compile_for_an_h100_to_pipelined_wgmma_without_spills():
    """Every configuration at BERT's sizes, aligned as a launch is: Hopper's warpgroup matmul
    (HGMMA in the SASS), a shared-memory ring of `stages` tiles (cp.async's pipeline), and no
    registers spilled to the stack (the epilogue's GELU beside a 128 x 256 accumulator
    spilled in a first build, so those tiles are left out)."""
    import tempfile
    from pathlib import Path

    from tests.kernels.common import BENCH

    constants = {
        "block_m": kernels.FFN_BLOCK_M, "block_k": kernels.FFN_BLOCK_K,
        "group_m": kernels.FFN_GROUP_M, "precision": "tf32",
    }  # fmt: skip
    sizes = {"m": "i32", "n": "i32", "k": "i32"}
    for tuner, signature in (
        (kernels._ffn_forward_kernel,
         {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*fp32", "h_ptr": "*bf16",
          "y_ptr": "*bf16", **sizes}),
        (kernels._ffn_backward_kernel,
         {"dz_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16", "bias_ptr": "*fp32",
          "du_ptr": "*bf16", "partial_ptr": "*fp32", **sizes}),
    ):  # fmt: skip
        done = compile_for_sm90(tuner, signature, constants, aligned=True, divisible=("n", "k"))
        for c, kernel in zip(tuner.configs, done, strict=True):
            tile = (kernels.FFN_BLOCK_M + c.kwargs["block_n"]) * kernels.FFN_BLOCK_K * 2
            assert kernel.metadata.shared >= c.num_stages * tile, (c, kernel.metadata.shared)
            assert stack_bytes(kernel) == 0, c
            with tempfile.TemporaryDirectory() as tmp:
                sass = BENCH.cuobjdump(kernel.asm["cubin"], "-sass", Path(tmp))
            assert "HGMMA" in sass, c


@numeric
def test_the_feed_forward_bench_runs_and_its_sides_agree():
    """bench/feed_forward.py (the GPU round's `ffn` stage) at BERT-mini's sizes: every side
    timed, the same numbers, and what bench/gpu_summary.py reads of it."""
    argv = ["--model-size", "mini", "--tokens", "200", "--rounds", "1", "--steps", "1"]
    got = run_bench("feed_forward", *argv, "--device", DEVICE)
    assert got["max_abs_diff"] < 5e-2 if CUDA else 1e-5  # bf16 on CUDA, fp32 here
    for side in ("plain", "fusedgelu", "fusedffn"):
        assert got[f"{side}_fwd_ms"] > 0 and got[f"{side}_fwd_bwd_ms"] > 0
    assert got["product_triton_ms"] > 0 and got["product_cublas_ms"] > 0
    # GELU's passes over a [200, 1024] tensor: five with --fused-gelu, two with --fused-ffn
    unit = 200 * 1024 * (2 if CUDA else 4) / 1e9
    assert got["gelu_gb"] == {"fusedgelu": round(5 * unit, 3), "fusedffn": round(2 * unit, 3)}
    line = bench_module("gpu_summary").feed_forward_line(got, "ffn")
    assert line.startswith("ffn: one layer's feed-forward, mini (200 tokens)")
