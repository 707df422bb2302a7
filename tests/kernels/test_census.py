"""bench/kernel_census.py end to end (it needs Triton, so it runs here): one compiled BERT-tiny
step's kernels counted, with bertforge's Triton kernels and q/k/v split (--split-qkv), whose
backward then concatenates no gradients (one copy a layer without it: inductor's `cat`); the
attention kernels (--fused-attention) generated into the compiled step as on a GPU, listed
as not counted; the same step with the feed-forward's GELU in the matmuls' epilogues
(--fused-ffn) for the bias + GELU kernels."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from bertforge import kernels
from tests.kernels.common import ADAMW_CONSTANTS, ADAMW_SIGNATURE, BENCH, run_bench

pytestmark = pytest.mark.skipif(
    kernels.interpreted(), reason="counts compiled kernels, not interpreted ones"
)


# BERT-tiny at seq 128, batch 64: each kernel's GB, rounded to 4 decimals, is not 0
SIZES = ("--model-size", "tiny", "--seq-len", "128", "--batch-size", "64")
FLAGS = ("--fused-norm", "--split-qkv", "--fused-attention")


def census(*flags: str) -> dict:
    return run_bench("kernel_census", *SIZES, *FLAGS, *flags)


@pytest.fixture(scope="module")
def with_gelu() -> dict:
    """The census of a step with bertforge's kernels, the bias + GELU ones included."""
    return census("--fused-gelu")


def test_the_census_counts_a_step_with_the_fused_kernels_and_q_k_v_split(with_gelu) -> None:
    got = with_gelu
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


def test_the_census_counts_the_feed_forward_matmuls_epilogues(with_gelu) -> None:
    """--fused-ffn: the matmuls with GELU in their epilogues counted by the bytes they move
    beyond a plain matmul's (GELU's output written, its input read back in the backward),
    their instructions not (the product's time is the matmuls'): two fifths of the bytes of
    the bias + GELU kernels, which move five passes over the same tensors where these move
    two, and nothing else in the step changes."""
    got = census("--fused-ffn")
    assert got["fused_ffn"] and not with_gelu["fused_ffn"]

    def own(run: dict, prefix: str) -> list[dict]:  # the layers' and the pruned last layer's
        return [k for k in run["kernels"] if k["name"].startswith(prefix)]

    ffn, gelu = own(got, "_ffn_"), own(with_gelu, "_gelu_")
    assert {k["name"] for k in ffn} == {"_ffn_forward_kernel", "_ffn_backward_kernel"}
    assert all(k["instructions_per_element"] is None and k["gb"] > 0 for k in ffn)
    assert not own(got, "_gelu_") and not own(with_gelu, "_ffn_")
    ffn_gb, gelu_gb = (sum(k["gb"] for k in kernels) for kernels in (ffn, gelu))
    # two passes in five; the partial sums differ (a row per 128 rows here, per program there)
    assert ffn_gb / gelu_gb == pytest.approx(2 / 5, abs=0.03)
    # and every other kernel the same: the step's bytes differ by exactly those
    rounding = 5e-4 + 5e-5 * (len(got["kernels"]) + len(with_gelu["kernels"]))
    assert got["gb"] == pytest.approx(with_gelu["gb"] - gelu_gb + ffn_gb, abs=rounding)


def test_a_packed_step_with_every_kernel_compiles_for_new_batch_sizes() -> None:
    """The packed step (the last layer pruned) with bertforge's kernels in every layer
    (--fused-norm, --fused-ffn, --split-qkv, --fused-attention) through inductor as on a GPU,
    for three batch sizes: the second and third compile it with dynamic sizes (the trainer's
    uneven micro-batches and evaluation batches do), where the kernels' grids and the
    backward's partial sums are sizes computed in the graph (session 32: such a size failed to
    lower under torch 2.11). The kernels are captured, not run."""
    from bertforge.model import BertConfig, BertForPretraining
    from tests.conftest import bench_script

    with bench_script("kernel_census") as census, pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "usable", lambda x: True)
        census.attention_as_on_cuda(True)
        model = BertForPretraining(BertConfig.preset("tiny", census.VOCAB))
        model.set_layer_options(fused_norm=True, fused_ffn=True, split_qkv=True,
                                fused_attention=True)  # fmt: skip
        with census.captured_kernels(True) as captured:
            census.compiled_steps(model, census.synthetic_rows(64, (8, 6, 5)), True)
        names = {k.name for k in captured if k.calls}
        assert {"_ffn_forward_kernel", "_ffn_backward_kernel", "_forward_kernel",
                "_attention_forward_kernel"} <= names  # fmt: skip
        # the layers' token counts of the three batches, each called with its own
        tokens = {
            call["m"] for k in captured if k.name == "_ffn_forward_kernel" for call in k.calls
        }
        assert len(tokens) >= 3, tokens


def test_cuobjdump_reads_a_cubin_once_per_flag(tmp_path, monkeypatch) -> None:
    """What cuobjdump prints is kept by the cubin's hash (its start-up is most of a census's
    time): the same cubin and flag again is read from the cache, another flag or cubin is not."""
    monkeypatch.setattr(BENCH, "SASS_CACHE", tmp_path / "cache")
    cubins = [
        BENCH.sm90_compile(
            kernels._adamw_kernel, ADAMW_SIGNATURE, constants, kernels.ADAMW_WARPS
        ).asm["cubin"]
        for constants in ADAMW_CONSTANTS
    ]
    sass = BENCH.cuobjdump(cubins[0], "-sass", tmp_path)
    usage = BENCH.cuobjdump(cubins[0], "-res-usage", tmp_path)
    assert "_adamw_kernel" in sass and "FFMA" in sass and "REG:" in usage
    runs = []
    real_run = BENCH.subprocess.run

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        runs.append(args)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(BENCH.subprocess, "run", counted)
    assert BENCH.cuobjdump(cubins[0], "-sass", tmp_path) == sass
    assert BENCH.cuobjdump(cubins[0], "-res-usage", tmp_path) == usage
    assert not runs
    other = BENCH.cuobjdump(cubins[1], "-sass", tmp_path)
    assert len(runs) == 1 and other != sass and "_adamw_kernel" in other
    assert not list((tmp_path / "cache").rglob(".*.tmp"))
