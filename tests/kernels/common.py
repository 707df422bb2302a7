"""What the tests of bertforge's Triton kernels share: where the numbers run, each autotuned
configuration in turn, the model's layer with and without a kernel, the graphs AOT autograd
traces, and compiling for sm_90. Imported after `pytest.importorskip("triton")`; skips the
importing module where the kernels cannot run (`kernels.missing()`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bertforge import kernels
from bertforge.model import BertConfig, Layer, Packed
from tests.conftest import ROOT, bench_module

if not kernels.available():  # Triton installed, but it or torch too old (torch 2.8 to 2.10)
    pytest.skip(f"the kernels do not run here: {kernels.missing()}", allow_module_level=True)


def run_bench(script: str, *argv: str) -> dict[str, Any]:
    """bench/SCRIPT.py run with argv as a command, in the repository: the JSON of its last
    line."""
    done = subprocess.run(
        [sys.executable, f"bench/{script}.py", *argv],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


# the benchmarks' helpers: compiling for sm_90, cuobjdump, the stand-in driver
BENCH = bench_module("common")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# the kernels' numbers: on CUDA, or on a CPU under Triton's interpreter
numeric = pytest.mark.skipif(
    not (CUDA or kernels.interpreted()), reason="needs CUDA or TRITON_INTERPRET=1"
)
traced = pytest.mark.skipif(
    kernels.interpreted(), reason="the interpreter's kernels cannot be traced"
)
compiled = pytest.mark.skipif(
    kernels.interpreted(), reason="compiled kernels, not interpreted ones"
)

# kernels._adamw_kernel's arguments for compiling it without a launch (BENCH.sm90_compile),
# and its constants with the loss scale and the found-inf flag and without them
ADAMW_SIGNATURE = {
    **dict.fromkeys(["p_ptr", "g_ptr", "m_ptr", "v_ptr", "step_ptr", "scale_ptr"], "*fp32"),
    "inf_ptr": "*fp32",
    "n": "i64",
    **dict.fromkeys(["lr", "decay", "beta1", "rest1", "beta2", "rest2", "eps"], "fp32"),
    **dict.fromkeys(["log_beta1", "log_beta2"], "fp32"),
}
ADAMW_CONSTANTS = [
    {"has_scale": flag, "has_inf": flag, "block": kernels.ADAMW_BLOCK} for flag in (True, False)
]


def configs_in_turn(*tuners: tuple[Any, Any]) -> Any:
    """A fixture that runs a test once per autotuned configuration: the i-th run pins each
    (autotuned kernel, its (rows, warps[, stages]) tuples[, the rows' parameter, rows_per if
    not given]) to its i-th tuple, so a forward and a backward taking different tiles are
    checked together."""

    @pytest.fixture(params=range(len(tuners[0][1])))
    def config(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
        for tuner, pairs, *name in tuners:
            pinned = kernels._configs((pairs[request.param],), *name)
            monkeypatch.setattr(tuner, "configs", pinned)
        return request.param

    return config


def layer_with_and_without(
    flag: str,
    entry: str,
    monkeypatch: pytest.MonkeyPatch,
    also: tuple[str, ...] = (),
    packed: bool = False,
    rows: bool = False,
    hidden: int = 32,
) -> None:
    """The model's layer with `flag` (fused_norm, fused_gelu, fused_attention) on and off,
    dropout off: the same output and weight gradients, padded [B, S, H] input (`packed`: the
    same sequences packed, [T, H]); and with it on, the layer did call `kernels.<entry>` (two
    layers that both took the plain path would agree too). `also`: other layer flags
    (split_qkv, ...) on together with `flag`. `rows`: the output at three rows of each
    sequence only, [B, 3, H] (the pruned last layer, `Layer.rows_qkv`). hidden: the layer's
    size (intermediate twice that, 2 heads)."""
    calls = []
    real = getattr(kernels, entry)

    def counted(*args: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(kernels, entry, counted)
    c = BertConfig(
        vocab_size=64, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=2 * hidden,
    )  # fmt: skip
    torch.manual_seed(0)
    layer = Layer(c).to(DEVICE).eval()
    x = torch.randn(2, 5, hidden, device=DEVICE)
    dy = torch.randn(2, 5, hidden, device=DEVICE)
    layout = None
    if packed:  # two sequences of 5 and 3 tokens, padded to 5: packed, 8 tokens
        x, dy = x.view(10, hidden)[:8], dy.view(10, hidden)[:8]
        cu = torch.tensor([0, 5, 8], dtype=torch.int32, device=DEVICE)
        positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2], device=DEVICE)
        layout = Packed(cu, positions, 5)
    else:  # the second sequence's last two tokens are padding
        layout = torch.arange(5, device=DEVICE) < torch.tensor([[5], [3]], device=DEVICE)
        layout = layout.view(2, 1, 1, 5)
    picked = None
    if rows:  # positions 0, 2, 2 and 0, 1, 2 of the two sequences (which start at 0 and 5)
        picked = torch.tensor([[0, 2, 2], [5, 6, 7]], device=DEVICE)
        dy = torch.randn(2, 3, hidden, device=DEVICE)
    outs = []
    for fused in (False, True):
        for name in (flag, *also):
            setattr(layer, name, fused)
        layer.zero_grad()
        y = layer(x, layout, picked)
        y.backward(dy)
        outs.append((y.detach(), {k: v.grad.clone() for k, v in layer.named_parameters()}))
        assert bool(calls) == fused, (flag, fused, len(calls))
    (y0, g0), (y1, g1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-5, msg=k)


def launches(fn: Callable[..., torch.Tensor], make: Callable[[], list[torch.Tensor]]) -> list:
    """The Triton launches in the forward and backward graphs AOT autograd traces from `fn`,
    as torch.compile hands them to inductor (split by inductor's min-cut partition): `make()`
    gives fn's inputs and then the output's gradient, made on fake tensors."""
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs = []

    def keep(gm, _):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm

    f = aot_function(fn, fw_compiler=keep, bw_compiler=keep,
                     partition_fn=min_cut_rematerialization_partition)  # fmt: skip
    with FakeTensorMode():
        *inputs, dy = make()
        f(*inputs).backward(dy)
    return [
        [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)] for gm in graphs
    ]


def kernel_name(launch: Any) -> str:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    return kernel_side_table.get_kernel(launch.kwargs["kernel_idx"]).fn.__name__


def compile_for_sm90(
    tuner: Any,
    signature: dict[str, str],
    constants: dict[str, Any],
    aligned: bool = False,
    divisible: tuple[str, ...] = (),
) -> list:
    """Every configuration of an autotuned kernel through Triton's whole CUDA pipeline for
    sm_90 (ptxas included; no GPU needed): the compiled kernels. aligned: every pointer and
    every *_stride argument a multiple of 16, as Triton specializes a launch whose values are
    (torch's allocations and BERT's strides are), so loads can be vectorized; and so are the
    integer arguments named in `divisible` (BERT's sizes)."""
    done = []
    for c in tuner.configs:
        options = (c.num_warps, aligned, c.num_stages, divisible)
        done.append(compile_one_for_sm90(tuner.fn, signature, {**constants, **c.kwargs}, *options))
    return done


def stack_bytes(kernel: Any) -> int:
    """The per-thread stack a compiled kernel's cubin declares (cuobjdump -res-usage):
    registers spilled, where it is not 0."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        usage = BENCH.cuobjdump(kernel.asm["cubin"], "-res-usage", Path(tmp))
    stacks = re.findall(r"STACK:(\d+)", usage)
    assert stacks, usage
    return sum(int(n) for n in stacks)


H100_SHARED_BYTES = 227 * 1024  # per block, opted in (sm_90's largest)


def compile_one_for_sm90(
    fn: Any,
    signature: dict[str, str],
    constants: dict[str, Any],
    num_warps: int,
    aligned: bool = False,
    num_stages: int = 3,
    divisible: tuple[str, ...] = (),
) -> Any:
    """A JIT kernel through Triton's CUDA pipeline for sm_90 (bench/common.py's
    `sm90_compile`), its constexprs `constants`."""
    full = {**signature, **{name: "constexpr" for name in constants}}
    assert set(full) == set(fn.arg_names)
    done = BENCH.sm90_compile(fn, full, constants, num_warps, aligned, num_stages, divisible)
    assert done.asm["cubin"], (fn.arg_names, constants)
    # what Triton checks only at launch, on the GPU (OutOfResources): the shared memory a
    # block may have on an H100
    assert done.metadata.shared <= H100_SHARED_BYTES, (fn.__name__, constants, num_stages)
    return done


@contextlib.contextmanager
def sm90_driver() -> Iterator[None]:
    """bench/common.py's ToolchainOnly as Triton's active driver: what torch needs to read from
    a kernel's TTIR which tensors it writes (without it, torch takes every tensor argument as
    written)."""
    from triton.runtime import driver

    saved = driver._active
    driver._active = BENCH.ToolchainOnly()
    try:
        yield
    finally:
        driver._active = saved
