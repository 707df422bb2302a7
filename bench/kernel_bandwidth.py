"""How close inductor's own (Triton) kernels of a compiled train step come to the GPU's memory
bandwidth, from inductor's bandwidth profile.

    python bench/train_throughput.py --compile --model-size base --batch-size 256 \
        --layouts packed --skip-peer --steps 1 --block 1 --warmup 1 \
        --inductor profile_bandwidth=True --inductor "profile_bandwidth_output='bw.txt'"
    python bench/kernel_bandwidth.py bw.txt   # --peak-gbps: this machine's GPU's by default

With `profile_bandwidth` inductor times every kernel it generated once, on its first call, and
writes per graph (forward, backward) one line per call: time, bytes the kernel must move
(inductor's count of its inputs and outputs) and the bandwidth that gives. Later calls of the
same kernel repeat the first call's figures without running the kernel again, so the train
step's numbers in that run are not a measurement (its losses are garbage after the first step);
only this file is. `bench/gpu_round.sh bandwidth` runs both commands.

Prints, over the graphs of the first step: the kernels' total time and bytes, the time those
bytes would take at `--attainable` of the peak (what a kernel at the bandwidth limit takes),
and the kernels that lose the most time against that, with calls, time, bytes and bandwidth.
The matmuls, attention and the optimizer are not Triton kernels and are not in the file. Last,
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# inductor's runtime_utils.create_bandwidth_info_str, with the share and name its
# end_graph appends: "0.123ms    \t0.456 GB \t 3700.00GB/s \t 1.23% \t triton_poi_fused_..."
LINE = re.compile(
    r"^\s*(?P<ms>[\d.]+)ms\s+(?P<gb>[\d.]+) GB\s+(?P<gbps>[\d.]+)GB/s\s+[\d.]+%\s+(?P<name>\S+)"
)
SECTION = "TRITON KERNELS BANDWIDTH INFO"


def read_profile(path: Path) -> list[list[tuple[str, float, float]]]:
    """The file's graphs in order, each a list of (kernel, ms, GB) per call."""
    hint = "was it written by a compiled CUDA run with --inductor profile_bandwidth=True?"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; {hint} (a CPU run writes none)")
    graphs: list[list[tuple[str, float, float]]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith(SECTION):
            graphs.append([])
        elif m := LINE.match(line):
            if not graphs:
                raise SystemExit(f"{path}:{number}: a kernel line before any {SECTION!r} header")
            graphs[-1].append((m["name"], float(m["ms"]), float(m["gb"])))
    if not graphs:
        raise SystemExit(f"{path}: no {SECTION!r} section; {hint}")
    return graphs


def summarize(
    graphs: list[list[tuple[str, float, float]]], limit_gbps: float, top: int
) -> dict[str, object]:
    """Totals over `graphs` and the `top` kernels by time lost against `limit_gbps`."""
    kernels: dict[str, list[float]] = {}  # name -> [calls, ms, GB]
    for calls in graphs:
        for name, ms, gb in calls:
            k = kernels.setdefault(name, [0, 0.0, 0.0])
            k[0] += 1
            k[1] += ms
            k[2] += gb
    total_ms = sum(k[1] for k in kernels.values())
    total_gb = sum(k[2] for k in kernels.values())
    bound_ms = total_gb / limit_gbps * 1e3
    # each kernel's time beyond what its bytes take at the limit
    lost = {name: ms - gb / limit_gbps * 1e3 for name, (_, ms, gb) in kernels.items()}
    rows = sorted(kernels.items(), key=lambda kv: -lost[kv[0]])
    return {
        "graphs": len(graphs),
        "kernels": len(kernels),
        "calls": sum(int(k[0]) for k in kernels.values()),
        "ms": round(total_ms, 3),
        "gb": round(total_gb, 3),
        "gbps": round(total_gb / total_ms * 1e3, 1) if total_ms else None,
        "ms_at_limit": round(bound_ms, 3),
        "limit_gbps": limit_gbps,
        "top": [
            {
                "kernel": name,
                "calls": int(calls),
                "ms": round(ms, 3),
                "gb": round(gb, 3),
                "gbps": round(gb / ms * 1e3, 1) if ms else None,
                "ms_lost": round(lost[name], 3),
            }
            for name, (calls, ms, gb) in rows[:top]
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", type=Path, help="inductor's profile_bandwidth_output file")
    ap.add_argument(
        "--peak-gbps",
        type=float,
        default=None,
        help="the GPU's memory bandwidth, GB/s (default: this machine's GPU's where it is in "
        "bench/common.py's PEAK_GBPS, else an H200's, 4800)",
    )
    ap.add_argument(
        "--attainable",
        type=float,
        default=0.85,
        help="share of the peak a kernel at the bandwidth limit reaches (default 0.85)",
    )
    ap.add_argument("--graphs", type=int, default=2, help="graphs to sum: the first step's two")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if args.peak_gbps is None:  # the GPU inductor's profile was written on, as a rule
        from common import DEFAULT_GBPS, cuda_gbps  # bench/common.py, beside this file

        args.peak_gbps = cuda_gbps() or DEFAULT_GBPS
    graphs = read_profile(args.profile)[: args.graphs]
    s = summarize(graphs, args.peak_gbps * args.attainable, args.top)
    print(
        f"{s['graphs']} graphs, {s['kernels']} kernels, {s['calls']} calls: {s['ms']} ms, "
        f"{s['gb']} GB, {s['gbps']} GB/s; at {s['limit_gbps']:.0f} GB/s "
        f"({args.attainable:.0%} of {args.peak_gbps:.0f}) the same bytes take {s['ms_at_limit']} ms"
    )
    print(f"{'calls':>5} {'ms':>8} {'GB':>7} {'GB/s':>7} {'ms lost':>8}  kernel")
    for r in s["top"]:  # type: ignore[union-attr]
        print(
            f"{r['calls']:5d} {r['ms']:8.3f} {r['gb']:7.3f} {r['gbps'] or 0:7.0f} "
            f"{r['ms_lost']:8.3f}  {r['kernel'][:90]}"
        )
    print(json.dumps({**s, "peak_gbps": args.peak_gbps}))


if __name__ == "__main__":
    main()
