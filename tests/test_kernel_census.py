"""bench/kernel_census.py's bookkeeping: what it reads from the kernels inductor generates and
how it turns bytes and instructions into a floor. (Generating and compiling the kernels needs
Triton, which the test environment does not have; the GPU round's bandwidth stage measures
what this estimates.)"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import bench_script

# A persistent reduction as inductor writes it (trimmed): its triton_meta signature, where a
# parameter it specialized (load_seed_offset) is a constexpr that the wrapper still passes.
SOURCE = """
@triton_heuristics.persistent_reduction(
    size_hints={'x': 32768, 'r0_': 1024},
    triton_meta={'signature': {'in_ptr0': '*i64', 'in_ptr1': '*bf16', 'out_ptr1': '*i1', \
'load_seed_offset': 'constexpr', 'xnumel': 'i32', 'r0_numel': 'i32', 'XBLOCK': 'constexpr'}, \
'device': DeviceProperties(type='cpu', index=None), 'constants': {}},
    inductor_meta={'grid_type': 'Grid1D', 'kernel_name': 'triton_per_fused_native_dropout_6', \
'kernel_num_gb': 0.161226752, 'backend_hash': 'census'},
)
@triton.jit
def triton_per_fused_native_dropout_6(in_ptr0, in_ptr1, out_ptr1, load_seed_offset, xnumel, \
r0_numel, XBLOCK : tl.constexpr):
    r0_numel = 768
"""


@pytest.fixture(scope="module")
def census():
    with bench_script("kernel_census") as module:
        yield module


def test_a_call_is_read_against_the_kernels_signature(census) -> None:
    k = census.Kernel("triton_per_fused_native_dropout_6", SOURCE)
    assert k.kind == "per"
    assert k.gb == pytest.approx(0.161226752)
    ids, x, mask = (
        torch.zeros(2, dtype=torch.long),
        torch.zeros(8),
        torch.zeros(8, dtype=torch.bool),
    )
    # the wrapper passes every parameter but XBLOCK, the specialized seed offset included
    census.Capture(k).run(ids, x, mask, 1, 29976, 768, stream=0)
    assert k.calls == [{"xnumel": 29976, "r0_numel": 768}]
    assert k.elements(k.calls[0]) == 29976 * 768
    assert census.Kernel("x", SOURCE.replace("'kernel_num_gb'", "'other'")).gb is None


# bertforge's own backward kernel as inductor captures it (trimmed): runtime parameters, then
# the symbol its precomputed grid is made of
FUSED_SOURCE = """
@triton_heuristics.user_autotune(
    configs=[{'rows_per': 2, 'num_warps': 4, 'num_stages': 3}],
    inductor_meta={'grid_type': 'PrecomputedGrid', 'kernel_name': '_backward_kernel_0'},
    triton_meta={'signature': {'dy_ptr': '*bf16', 'zhat_ptr': '*bf16', 'rstd_ptr': '*fp32', \
'w_ptr': '*fp32', 'mask_ptr': '*u8', 'dres_ptr': '*bf16', 'dh_ptr': '*bf16', \
'partial_ptr': '*fp32', 't': 'i32', 'n': 'constexpr', 'quarter': 'constexpr', \
'scale': 'constexpr', 'block_q': 'constexpr', 'rows_per': 'constexpr', \
'dropout': 'constexpr'}, 'device': DeviceProperties(type='cpu', index=None), 'constants': \
{'n': 768, 'quarter': 192, 'scale': 1.1111186463666882, 'block_q': 256, \
'dropout': True}},
    custom_kernel=True,
)
@triton.jit
def _backward_kernel(dy_ptr, zhat_ptr, rstd_ptr, w_ptr, mask_ptr, dres_ptr, dh_ptr, partial_ptr, \
t, n: tl.constexpr, quarter: tl.constexpr, scale: tl.constexpr, \
block_q: tl.constexpr, rows_per: tl.constexpr, dropout: tl.constexpr):
    pass
"""


def test_bertforges_own_kernels_are_counted_by_their_tensors(census) -> None:
    k = census.Kernel("_backward_kernel", FUSED_SOURCE)
    assert k.own and k.gb is None  # inductor counts nothing for a user-defined kernel
    x = torch.zeros(1)
    census.Capture(k).run(x, x, x, x, x, x, x, x, 29976, 29976, stream=0)
    assert k.calls == [{"t": 29976}]
    assert k.elements(k.calls[0]) == 29976 * 768
    # dy, zhat, dres, dh in bf16; rstd fp32; the mask's bit an element; 528 programs' partial
    # sums (132 SMs x 4), x 3 fp32
    expected = 29976 * 768 * 8 + 29976 * 4 + 29976 * 768 / 8 + 528 * 3 * 768 * 4
    assert k.total_gb() == pytest.approx(expected / 1e9)


def test_the_floor_is_the_slower_of_bytes_and_instructions(census) -> None:
    # 4.8 GB at 4,800 GB/s: 1 ms; 16.7e9 instructions at 33.4 T/s: 0.5 ms
    est = census.floor_ms(4.8, 16.7e9, 4800.0, 33.4)
    assert est["memory_ms"] == pytest.approx(1.0)
    assert est["instructions_ms"] == pytest.approx(0.5)
    assert (est["floor_ms"], est["bound"]) == (pytest.approx(1.0), "memory")
    est = census.floor_ms(4.8, 66.8e9, 4800.0, 33.4)
    assert (est["floor_ms"], est["bound"]) == (pytest.approx(2.0), "instructions")
    est = census.floor_ms(4.8, None, 4800.0, 33.4)  # a looped reduction: bytes only
    assert (est["instructions_ms"], est["floor_ms"], est["bound"]) == (None, 1.0, "memory")


def test_inductor_is_left_as_it_was(census) -> None:
    import torch._inductor.config as inductor
    from torch._inductor.async_compile import AsyncCompile

    before = (inductor.cpu_backend, inductor.benchmark_kernel, AsyncCompile.triton)
    with pytest.raises(RuntimeError), census.captured_kernels():
        assert inductor.cpu_backend == "triton"
        raise RuntimeError("a failed step")
    assert (inductor.cpu_backend, inductor.benchmark_kernel, AsyncCompile.triton) == before


# bertforge's feed-forward backward matmul (kernels.feed_forward) as inductor captures it
# (trimmed): its sizes are runtime arguments, its column block an autotuned config
FFN_SOURCE = """
@triton_heuristics.user_autotune(
    configs=[{'block_n': 128, 'num_warps': 8, 'num_stages': 4}],
    inductor_meta={'grid_type': 'PrecomputedGrid', 'kernel_name': '_ffn_backward_kernel_0'},
    triton_meta={'signature': {'dz_ptr': '*bf16', 'w_ptr': '*bf16', 'h_ptr': '*bf16', \
'bias_ptr': '*fp32', 'du_ptr': '*bf16', 'partial_ptr': '*fp32', 'm': 'i32', 'n': 'i32', \
'k': 'i32', 'block_m': 'constexpr', 'block_k': 'constexpr', 'group_m': 'constexpr', \
'precision': 'constexpr', 'block_n': 'constexpr'}, 'device': DeviceProperties(type='cpu', \
index=None), 'constants': {'block_m': 128, 'block_k': 64, 'group_m': 8, 'precision': 'tf32'}},
    custom_kernel=True,
)
@triton.jit
def _ffn_backward_kernel(dz_ptr, w_ptr, h_ptr, bias_ptr, du_ptr, partial_ptr, m, n, k, \
block_m: tl.constexpr, block_k: tl.constexpr, group_m: tl.constexpr, precision: tl.constexpr, \
block_n: tl.constexpr):
    pass
"""


def test_the_feed_forward_matmul_is_counted_by_its_epilogues_bytes(census) -> None:
    """What its epilogue reads beyond a plain matmul's operands and output (h, GELU's input),
    and the bias's partial sums, a row per 128 rows (its instructions are not counted:
    tests/kernels/test_census.py)."""
    k = census.Kernel("_ffn_backward_kernel", FFN_SOURCE)
    assert k.own and k.own.matmul and k.gb is None
    x = torch.zeros(1)
    census.Capture(k).run(x, x, x, x, x, x, 29976, 3072, 768, 5616, stream=0)
    assert k.calls == [{"m": 29976, "n": 3072}]
    assert k.elements(k.calls[0]) == 29976 * 3072
    expected = 29976 * 3072 * 2 + -(-29976 // 128) * 3072 * 4
    assert k.total_gb() == pytest.approx(expected / 1e9)
