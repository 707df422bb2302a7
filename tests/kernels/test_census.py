"""bench/kernel_census.py end to end (it needs Triton, so it runs here): one compiled BERT-tiny
step's kernels counted, with bertforge's Triton kernels and q/k/v split (--split-qkv), whose
backward then concatenates no gradients (one copy a layer without it: inductor's `cat`); the
attention kernels (--fused-attention) generated into the compiled step as on a GPU, listed
as not counted."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from bertforge import kernels
from tests.kernels.common import run_bench

pytestmark = pytest.mark.skipif(
    kernels.interpreted(), reason="counts compiled kernels, not interpreted ones"
)


def census(*flags: str) -> dict:
    return run_bench("kernel_census", "--model-size", "tiny", "--seq-len", "32", "--batch-size",
                     "8", *flags)  # fmt: skip


def test_the_census_counts_a_step_with_the_fused_kernels_and_q_k_v_split() -> None:
    got = census("--fused-norm", "--fused-gelu", "--split-qkv", "--fused-attention")
    assert (got["model_size"], got["split_qkv"], got["fused_norm"]) == ("tiny", True, True)
    assert got["uncounted"] == [
        "_attention_forward_kernel",
        "_attention_dq_kernel",
        "_attention_dkdv_kernel",
    ]
    names = [k["name"] for k in got["kernels"]]
    own = {"_forward_kernel", "_backward_kernel", "_gelu_forward_kernel", "_gelu_backward_kernel"}
    assert own <= set(names)
    assert not [name for name in names if "cat" in name.split("_")], names
    assert 0 < got["memory_ms"] <= got["floor_ms"]
    # the total is rounded to 3 decimals, each kernel's GB to 4
    rounding = 5e-4 + 5e-5 * len(got["kernels"])
    assert got["gb"] == pytest.approx(sum(k["gb"] for k in got["kernels"]), abs=rounding)
