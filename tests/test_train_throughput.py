"""bench/train_throughput.py's `--sides`: bertforge's sides named one by one (the GPU round's
headline compares the plain step with every option together), each name checked before
anything runs. (The bench itself runs in tests/test_gpu_summary.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bertforge.model import Layer
from tests.conftest import BENCH, bench_script


@pytest.fixture(scope="module")
def bench():
    with bench_script("train_throughput") as module:
        yield module


def sides(bench, *argv: str):
    """named_sides, then check_sides on them, as main does."""
    ap = bench.arguments()
    args = ap.parse_args(list(argv))
    named, loaders = bench.named_sides(ap, args)
    bench.check_sides(ap, args, list(named))
    return named, loaders


def test_named_sides_are_compiled_as_named_and_padded_first(bench) -> None:
    got, loaders = sides(
        bench, "--compile", "--sides", "packed,packed+flat+splitqkv+thread,padded+eager"
    )
    assert got == {"padded+eager": False, "packed": True, "packed+flat+splitqkv+thread": True}
    assert loaders == ["", "+thread"]
    got, loaders = sides(bench, "--sides", "packed+splitqkv")  # not compiled without --compile
    assert (got, loaders) == ({"packed+splitqkv": False}, [""])


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--sides", "packd"], "'packd'; a side is padded or packed and then any of +whole"),
        (["--sides", "packed+flat+flat"], "'packed+flat+flat'; a side is padded or packed"),
        (["--sides", "packed+foo"], "'packed+foo': +foo is not one of +whole"),
        (["--sides", "packed,packed"], "name each side once"),
        (["--sides", "packed+graphs"], "graphs, +whole and the dropout choice are for compiled"),
        (["--sides", "packed+fusednorm", "--device", "cpu"], "run on CUDA with Triton only"),
        (["--sides", "packed+fusednorm+fusedffn", "--device", "cpu"],
         "packed+fusednorm+fusedffn: the fused kernels"),
        (["--fused-ffn", "both", "--device", "cpu"], "padded+fusedffn: the fused kernels"),
        (["--sides", "packed", "--split-qkv", "yes", "--loader", "thread", "--layouts", "packed"],
         "names every side in full; leave --layouts, --split-qkv, --loader out"),
    ],
)  # fmt: skip
def test_a_side_that_cannot_be_is_refused_naming_it(bench, argv, says, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        if "--sides" in argv:
            sides(bench, *argv)
        else:  # the variant flag's sides, as main makes them
            monkeypatch.setattr(sys, "argv", ["train_throughput.py", *argv])
            bench.main()
    assert e.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--sides", "packed+fusedattn", "--device", "cpu"], "run on CUDA with Triton only"),
        (["--sides", "packed,padded+fusedattn", "--device", "cuda"],
         "padded+fusedattn: the attention kernel (--fused-attention, +fusedattn) takes packed "
         "sides of up to 128 tokens"),
        (["--sides", "packed+fusedattn", "--device", "cuda", "--seq-len", "512"],
         "packed+fusedattn: the attention kernel"),
        (["--fused-attention", "both", "--device", "cuda"],  # every layout by default
         "padded+fusedattn: the attention kernel"),
    ],
)  # fmt: skip
def test_the_attention_kernel_is_refused_where_it_would_not_run(
    bench, argv, says, capsys, monkeypatch
) -> None:
    """On CUDA with Triton (stood in for here), only for packed sides of up to 128 tokens: a
    side that silently kept flash attention would be reported as the kernel's."""
    if "cuda" in argv:
        monkeypatch.setattr(bench.kernels, "available", lambda: True)
    with pytest.raises(SystemExit) as e:
        if "--sides" in argv:
            sides(bench, *argv)
        else:  # the variant flag's sides, as main makes them
            monkeypatch.setattr(sys, "argv", ["train_throughput.py", *argv])
            bench.main()
    assert e.value.code == 2
    assert says in capsys.readouterr().err


def test_named_sides_are_measured(bench) -> None:
    """Each named side runs; MFU (here of a made-up 0.01 TFLOP/s peak) counts the model's
    FLOPs, mfu_executed those the side's step does: fewer with the last layer pruned (the
    default), by `BertConfig.pruned_flops_per_token`, the same with every row computed
    ('+fulllast'). The bench rounds MFU to 4 decimals: of a 1 TFLOP/s peak, a slow single
    step (a clean clone's run, both cores busy) gave 0.0004 and 0.0005, too coarse for the
    ratio below; of 0.01 TFLOP/s the figures are 100 times larger."""
    named = "packed,packed+flat+splitqkv,packed+fulllast"
    done = subprocess.run(
        [sys.executable, str(BENCH / "train_throughput.py"), "--model-size", "tiny", "--seq-len",
         "32", "--batch-size", "4", "--steps", "1", "--block", "1", "--warmup", "1", "--device",
         "cpu", "--precision", "fp32", "--skip-peer", "--peak-tflops", "0.01", "--sides", named],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["sides"] == named
    assert list(got["layouts"]) == named.split(",")
    assert all(side["tokens_per_s"] > 0 for side in got["layouts"].values())
    full = got["layouts"]["packed+fulllast"]
    assert full["mfu"] == full["mfu_executed"] > 0
    pruned = got["layouts"]["packed"]
    # tiny (2 layers, hidden 128) at seq 32, 5 masked slots: the last layer at 6 of about 30
    # rows a sequence skips about a seventh of the model's FLOPs (the MLM head over 30,522
    # words is most of them)
    assert 0.8 < pruned["mfu_executed"] / pruned["mfu"] < 0.92


def test_a_side_that_fails_is_left_out_and_the_others_measured(bench, monkeypatch, capsys):
    """One side that cannot run (here its q/k/v projection raises, as a compile, CUDA-graph
    or memory failure would) is named with its error; the other sides' figures stand, and
    each round prints the figures so far (what a run cut short leaves in its log)."""
    project = Layer.project_qkv

    def broken_when_split(layer, x):
        if layer.split_qkv:
            raise RuntimeError("no kernel image is available\nsecond line")
        return project(layer, x)

    monkeypatch.setattr(Layer, "project_qkv", broken_when_split)
    argv = ["train_throughput.py", "--model-size", "tiny", "--seq-len", "32", "--batch-size",
            "4", "--steps", "2", "--block", "1", "--warmup", "1", "--device", "cpu",
            "--precision", "fp32", "--sides", "padded,padded+splitqkv"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    out = capsys.readouterr().out.splitlines()
    got = json.loads(out[-1])
    assert list(got["layouts"]) == ["padded"] and got["peer_tokens_per_s"] > 0
    assert got["failed"] == {"padded+splitqkv": "RuntimeError: no kernel image is available"}
    assert "side padded+splitqkv failed, left out: RuntimeError: no kernel image" in out[0]
    assert [line.split(":")[0] for line in out if line.startswith("round ")] == [
        "round 1", "round 2"
    ]  # fmt: skip
    # peak memory on a CPU: at least the weights, gradients and AdamW's two moments (16 bytes
    # a parameter in fp32) of BERT-tiny with the bench's 30,522 words, for either side
    floor = 16 * 4.4e6 / 2**30
    assert got["layouts"]["padded"]["peak_memory_gib"] == got["peak_memory_gib"]["ours"] > floor
    assert got["peak_memory_gib"]["peer"] > floor


def test_profiled_kernels_are_sorted_by_kind(bench) -> None:
    """bertforge's own kernels land with what they replace: attention's with flash's, the
    elementwise ones with inductor's fused kernels, the update with the optimizer's."""
    kinds = {
        "_attention_forward_kernel": "attention",
        "_attention_dkdv_kernel": "attention",
        "pytorch_flash::flash_bwd_kernel<...>": "attention",
        "_forward_kernel": "compiled fused",
        "_gelu_backward_kernel": "compiled fused",
        "triton_poi_fused_add_0": "compiled fused",
        "_adamw_kernel": "optimizer",
        "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN": "matmul",
        "Memcpy HtoD (Pinned -> Device)": "copy/cast",
        "void at::native::vectorized_elementwise_kernel<4, ...>": "other",
    }
    assert {name: bench.kernel_kind(name) for name in kinds} == kinds


def test_every_layer_option_has_a_side_suffix(bench) -> None:
    from bertforge.model import LAYER_OPTIONS

    assert set(bench.LAYER_SUFFIXES) == set(LAYER_OPTIONS)
    assert set(bench.LAYER_SUFFIXES.values()) <= set(bench.SUFFIXES)


def test_a_steps_peak_is_the_most_it_holds_at_once(bench) -> None:
    """step_peak_bytes: from the allocations and frees the profiler records, the most bytes
    held at once beyond what was allocated before the step (a tensor from before, freed in
    it, is not subtracted)."""
    import torch

    mib = 1 << 20
    before = torch.empty(8 * mib, dtype=torch.uint8)

    def step(measure: bool) -> None:
        nonlocal before
        a = torch.empty(4 * mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a, b
        before = None
        c = torch.empty(5 * mib, dtype=torch.uint8)
        del c

    assert bench.step_peak_bytes(step) == 6 * mib


def test_the_profilers_probe_lines_are_kept_off_stderr(bench, capfd) -> None:
    """without_probe_lines: what C++ writes to file descriptor 2 inside the block comes back
    on it afterwards, in order, less the "USDT:" lines; stderr is restored after an error."""
    import os

    with bench.without_probe_lines():
        os.write(2, b"USDT:2026-12-06 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a warning\n")
        os.write(2, b"USDT:2026-12-06 SyncActivityProfilerHandler.cpp:59] profiler_stop\n")
        os.write(2, b"and another")
    assert capfd.readouterr().err == "a warning\nand another"
    with pytest.raises(KeyError), bench.without_probe_lines():
        os.write(2, b"before the error\n")
        raise KeyError
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "before the error\nafter\n"


def test_resident_bytes_count_shared_memory_once(bench) -> None:
    """Weights, gradients and optimizer state: torch's AdamW keeps each tensor apart;
    FlatAdamW lays weights, gradients and moments out in four buffers, which the parameters,
    their gradients and their state view (counted once)."""
    import torch

    from bertforge.optim import FlatAdamW

    def trained(make):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 7))
        opt = make(model.parameters())
        model(torch.randn(3, 300)).sum().backward()
        opt.step()
        return model, opt

    n = 300 * 200 + 200 + 200 * 7 + 7
    model, opt = trained(lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    # weights, gradients, two moments in fp32, and a one-element step count per tensor
    assert bench.resident_bytes(model, opt) == 4 * 4 * n + 4 * 4
    model.zero_grad(set_to_none=True)
    assert bench.resident_bytes(model, opt) == 3 * 4 * n + 4 * 4
    model, opt = trained(lambda ps: FlatAdamW(ps, lr=1e-3))
    (flat,) = opt.flat
    buffers = [flat.data, flat.grad, flat.exp_avg, flat.exp_avg_sq]
    assert flat.data.numel() > n  # each tensor starts at a multiple of 64 elements
    assert bench.resident_bytes(model, opt) == sum(4 * b.numel() for b in buffers) + 4 * 4
