"""What inductor reads from bertforge's kernels' TTIR about the tensors each one writes.

Inductor copies every tensor a user-defined kernel may write before the call, so a kernel it
misreads as writing its inputs costs a copy of them each step (a helper that loaded through
the pointers it was given once made the bias + GELU kernels look as if they wrote h and the
bias). The analysis needs Triton's CUDA target, not a GPU: a stand-in driver gives it."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from bertforge import kernels, ops  # noqa: E402
from tests.kernels.common import sm90_driver  # noqa: E402

pytestmark = pytest.mark.skipif(
    kernels.interpreted(), reason="the TTIR of compiled kernels, not interpreted ones"
)


def written(kernel, **kwargs) -> set[str]:  # type: ignore[no-untyped-def]
    import torch._higher_order_ops.triton_kernel_wrap as wrap

    with sm90_driver():
        if hasattr(wrap, "identify_accessed_tensors"):  # torch 2.13
            accesses = wrap.identify_accessed_tensors(kernel, kwargs, {})
            return {dep.name for dep in accesses.read_writes.writes}
        return set(wrap.identify_mutated_tensors(kernel, kwargs, {}))  # torch 2.11


def tensor(dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(2, dtype=dtype)


def test_each_kernel_writes_only_its_outputs():
    f32, u8, seed = torch.float32, torch.uint8, torch.empty(1, dtype=torch.int64)
    norm = {"n": 768, "quarter": 192, "scale": ops.keep_scale(0.1), "block_q": 256,
            "dropout": True}  # fmt: skip
    assert written(
        kernels._forward_kernel, h_ptr=tensor(), bias_ptr=tensor(f32), res_ptr=tensor(),
        w_ptr=tensor(f32), b_ptr=tensor(f32), seed_ptr=seed, y_ptr=tensor(), zhat_ptr=tensor(),
        rstd_ptr=tensor(f32), mask_ptr=tensor(u8), t=64, drop=ops.drop_levels(0.1), eps=1e-12,
        **norm,
    ) == {"y_ptr", "zhat_ptr", "rstd_ptr", "mask_ptr"}  # fmt: skip
    assert written(
        kernels._backward_kernel, dy_ptr=tensor(), zhat_ptr=tensor(), rstd_ptr=tensor(f32),
        w_ptr=tensor(f32), mask_ptr=tensor(u8), dres_ptr=tensor(), dh_ptr=tensor(),
        partial_ptr=tensor(f32), t=64, **norm,
    ) == {"dres_ptr", "dh_ptr", "partial_ptr"}  # fmt: skip
    gelu = {"t": 64, "f": 3072, "columns": kernels.GELU_COLUMNS}
    assert written(
        kernels._gelu_forward_kernel, h_ptr=tensor(), bias_ptr=tensor(f32), y_ptr=tensor(), **gelu
    ) == {"y_ptr"}
    assert written(
        kernels._gelu_backward_kernel, dy_ptr=tensor(), h_ptr=tensor(), bias_ptr=tensor(f32),
        du_ptr=tensor(), partial_ptr=tensor(f32), **gelu,
    ) == {"du_ptr", "partial_ptr"}  # fmt: skip


def test_the_attention_kernels_write_only_their_outputs():
    """Not q, k and v: inductor would copy the whole qkv projection before each call."""
    f32 = torch.float32
    scalars = {"q_stride": 192, "k_stride": 192, "v_stride": 192, "heads": 1, "scale": 0.18,
               "drop": ops.drop_levels(0.1), "keep_scale": ops.keep_scale(0.1), "head": 64,
               "block_n": 128, "dropout": True, "precision": "tf32",
               "cu_ptr": tensor(torch.int32), "seed_ptr": torch.empty(1, dtype=torch.int64),
               "q_ptr": tensor(), "k_ptr": tensor(), "v_ptr": tensor(),
               "lse_ptr": tensor(f32)}  # fmt: skip
    forward = written(
        kernels._attention_forward_kernel, o_ptr=tensor(), mask_ptr=tensor(torch.uint8),
        **scalars,
    )  # fmt: skip
    assert forward == {"o_ptr", "lse_ptr", "mask_ptr"}
    del scalars["seed_ptr"]
    backward = {**scalars, "do_ptr": tensor(), "delta_ptr": tensor(f32), "softmax_scale": 0.125,
                "mask_ptr": tensor(torch.uint8)}  # fmt: skip
    dq = written(kernels._attention_dq_kernel, o_ptr=tensor(), dq_ptr=tensor(), **backward)
    assert dq == {"dq_ptr", "delta_ptr"}
    dkdv = written(kernels._attention_dkdv_kernel, dk_ptr=tensor(), dv_ptr=tensor(), **backward)
    assert dkdv == {"dk_ptr", "dv_ptr"}


def test_the_feed_forward_kernels_write_only_their_outputs():
    """Not x, the weights or h: inductor would copy them before each call."""
    f32 = torch.float32
    sizes = {"m": 64, "n": 3072, "k": 768, "block_m": kernels.FFN_BLOCK_M,
             "block_k": kernels.FFN_BLOCK_K, "group_m": kernels.FFN_GROUP_M,
             "precision": "tf32", "block_n": 128}  # fmt: skip
    forward = written(
        kernels._ffn_forward_kernel.fn, x_ptr=tensor(), w_ptr=tensor(), bias_ptr=tensor(f32),
        h_ptr=tensor(), y_ptr=tensor(), **sizes,
    )  # fmt: skip
    assert forward == {"h_ptr", "y_ptr"}
    backward = written(
        kernels._ffn_backward_kernel.fn, dz_ptr=tensor(), w_ptr=tensor(), h_ptr=tensor(),
        bias_ptr=tensor(f32), du_ptr=tensor(), partial_ptr=tensor(f32), **sizes,
    )  # fmt: skip
    assert backward == {"du_ptr", "partial_ptr"}
