"""bench/kernel_bandwidth.py reads the file inductor's bandwidth profile writes: written here by
torch's own writer (`end_graph`), so a change of its format fails this test, not a GPU round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch._inductor.runtime import triton_heuristics

from tests.conftest import ROOT, bench_module

SCRIPT = ROOT / "bench" / "kernel_bandwidth.py"
COMMON = bench_module("common")  # bench/common.py: the GPUs' bandwidths


def write_graph(path: Path, calls: list[tuple[float, float, str]]) -> None:
    """One graph's section as inductor writes it: (ms, GB, kernel) per call."""
    triton_heuristics.start_graph()
    triton_heuristics.collected_calls.extend((ms, gb, gb / ms * 1e3, k) for ms, gb, k in calls)
    triton_heuristics.end_graph(str(path))
    triton_heuristics.start_graph()


def test_reads_inductors_profile_and_ranks_time_lost(tmp_path: Path) -> None:
    kb = bench_module("kernel_bandwidth")
    path = tmp_path / "bw.txt"
    layer_norm, gelu, rand = (
        "triton_per_fused_native_layer_norm_0",
        "triton_poi_fused_gelu_1",
        "triton_poi_fused_rand_2",
    )
    # forward: the GELU kernel called twice (as a layer's kernels are), at the limit; the
    # LayerNorm kernel takes less time than GELU's two calls but loses more against the limit
    write_graph(path, [(0.4, 0.5, layer_norm), (0.25, 1.0, gelu), (0.25, 1.0, gelu)])
    write_graph(path, [(2.0, 1.0, rand)])  # backward: slow for its bytes
    write_graph(path, [(9.0, 1.0, rand)])  # the next step's forward: not summed
    graphs = kb.read_profile(path)
    assert [len(g) for g in graphs] == [3, 1, 1]
    assert graphs[0][1] == (gelu, 0.25, 1.0)
    s = kb.summarize(graphs[:2], limit_gbps=4000.0, top=10)
    assert (s["graphs"], s["kernels"], s["calls"]) == (2, 3, 4)
    assert s["ms"] == pytest.approx(2.9) and s["gb"] == pytest.approx(3.5)
    assert s["ms_at_limit"] == pytest.approx(0.875)
    top = s["top"]
    assert [r["kernel"] for r in top] == [rand, layer_norm, gelu]
    assert top[0]["ms_lost"] == pytest.approx(1.75)
    assert (top[2]["calls"], top[2]["ms_lost"]) == (2, pytest.approx(0.0))


def test_a_file_without_kernels_says_how_to_make_one(tmp_path: Path) -> None:
    kb = bench_module("kernel_bandwidth")
    path = tmp_path / "bw.txt"
    path.write_text("SUMMARY\n")
    with pytest.raises(SystemExit, match=r"no 'TRITON.*profile_bandwidth=True"):
        kb.read_profile(path)
    with pytest.raises(SystemExit, match=r"no such file.*profile_bandwidth=True"):
        kb.read_profile(tmp_path / "missing.txt")


@pytest.mark.parametrize(
    "name, gbps",
    [
        ("NVIDIA H100 80GB HBM3", 3350.0),  # the SXM card, as torch names it
        ("NVIDIA H100 PCIe", 2000.0),
        ("NVIDIA H100 NVL", 3900.0),
        ("NVIDIA H200", 4800.0),
        ("NVIDIA A100-SXM4-80GB", 2039.0),
        ("NVIDIA A100-SXM4-40GB", 1555.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_a_gpus_bandwidth_by_its_name(name: str, gbps: float | None) -> None:
    assert COMMON.peak_gbps(name) == gbps


def test_without_a_gpu_the_floor_is_an_h200s_unless_given(tmp_path: Path) -> None:
    """The bytes' floor: at --peak-gbps, else this machine's GPU's (none here: an H200's)."""
    path = tmp_path / "bw.txt"
    write_graph(path, [(0.5, 1.0, "triton_poi_fused_gelu_1")])
    write_graph(path, [(0.5, 1.0, "triton_poi_fused_gelu_2")])
    given = ["--peak-gbps", "2000", "--attainable", "1"]
    for extra, gbps, limit in (
        ([], COMMON.DEFAULT_GBPS, 0.85 * COMMON.DEFAULT_GBPS),
        (given, 2000, 2000),
    ):
        done = subprocess.run([sys.executable, str(SCRIPT), str(path), *extra],
                              capture_output=True, text=True, check=True)  # fmt: skip
        s = json.loads(done.stdout.splitlines()[-1])
        assert (s["peak_gbps"], s["limit_gbps"]) == (gbps, pytest.approx(limit))
        assert s["ms_at_limit"] == pytest.approx(2.0 / limit * 1e3, abs=0.01)  # 2 GB
