"""One layer's feed-forward alone, forward and backward: bertforge's matmuls with GELU in
their epilogues (`kernels.feed_forward`, the trainer's --fused-ffn) against cuBLAS's matmuls
with bertforge's bias + GELU kernels between them (`kernels.bias_gelu`, --fused-gelu) and
against the plain layer compiled (cuBLAS, and inductor's fusion of bias + GELU: the trainer's
default), interleaved in one process.

    python bench/feed_forward.py --model-size base --tokens 29976

Whether --fused-ffn can win turns on one thing a CPU cannot tell: its Triton matmuls against
cuBLAS's. So besides each side's forward and forward + backward, it times the forward's
product alone: the Triton kernel (which also writes GELU of it) against torch.mm with the
bias (cuBLAS), in TFLOP/s. The bytes the sides must move beyond the matmuls' operands
(GELU's passes over the [tokens, intermediate] tensors: 5 with --fused-gelu, 2 here) are
printed at the device's bandwidth (`--peak-gbps`, by default the datasheet's for a known GPU,
bench/common.py's PEAK_GBPS). 29,976 tokens is BERT-base's packed batch of 256 at seq 128
(bench/kernel_census.py). On a CPU it runs under Triton's interpreter (TRITON_INTERPRET=1),
fp32, for a check of the script, not a measurement. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import kernel_device, ms_per_call  # bench/common.py, beside this file

from bertforge import kernels
from bertforge.model import BertConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-size", default="base")
    ap.add_argument("--tokens", type=int, default=29976, help="rows: a packed batch's tokens")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="calls per side per round")
    ap.add_argument("--no-compile", action="store_true", help="the plain side eager")
    ap.add_argument(
        "--peak-gbps", type=float, default=None, help="memory bandwidth, GB/s (default: a "
        "known GPU's, from its name)",
    )  # fmt: skip
    args = ap.parse_args()
    device, dtype = kernel_device(ap, args, "feed_forward")
    c = BertConfig.preset(args.model_size, 64)
    k, n, t = c.hidden_size, c.intermediate_size, args.tokens
    g = torch.Generator().manual_seed(0)

    def made(*shape: int, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(*shape, generator=g) * scale
        return x.to(device, dtype).requires_grad_()

    x = made(t, k)
    w_in, b_in = made(n, k, scale=0.02), made(n, scale=0.02).float().detach().requires_grad_()
    w_out, b_out = made(k, n, scale=0.02), made(k, scale=0.02)
    dz = torch.randn(t, k, generator=g).to(device, dtype)
    leaves = (x, w_in, b_in, w_out, b_out)

    def plain_layer(x, w_in, b_in, w_out, b_out):  # type: ignore[no-untyped-def]
        return F.linear(F.gelu(F.linear(x, w_in, b_in.to(x.dtype))), w_out, b_out)

    plain = plain_layer if args.no_compile or device.type != "cuda" else torch.compile(plain_layer)

    def bias_gelu() -> torch.Tensor:
        return F.linear(kernels.bias_gelu(F.linear(x, w_in), b_in), w_out, b_out)

    def fused() -> torch.Tensor:
        return kernels.feed_forward(x, w_in, b_in, w_out) + b_out

    with torch.no_grad():  # the same numbers (a wrong kernel is no benchmark)
        want = plain_layer(*leaves).float()
        diff = max(float((side().float() - want).abs().max()) for side in (bias_gelu, fused))

    def timed(fn: Callable[[], torch.Tensor], backward: bool) -> float:
        """ms per call over args.steps calls."""
        return ms_per_call(fn, args.steps, device, dz if backward else None, leaves)

    # the forward's first product alone: the Triton kernel (h and GELU of it written) against
    # cuBLAS's (h with the bias)
    h, y = (torch.empty(t, n, device=device, dtype=dtype) for _ in range(2))
    xd, wd = x.detach(), w_in.detach()

    def product_triton() -> torch.Tensor:
        kernels._ffn_forward_kernel[kernels._ffn_grid(t, n)](
            xd, wd, b_in, h, y, t, n, k, **kernels._ffn_blocks(xd)
        )
        return h

    def product_cublas() -> torch.Tensor:
        return torch.addmm(b_in.to(dtype), xd, wd.t(), out=h)

    sides = {"plain": lambda: plain(*leaves), "fusedgelu": bias_gelu, "fusedffn": fused}
    products = {"triton": product_triton, "cublas": product_cublas}
    for side in sides.values():  # warm-up: compiles, autotunes
        timed(side, True)
    for side in products.values():
        timed(side, False)
    times: dict[str, list[float]] = {f"{s}_{w}": [] for s in sides for w in ("fwd", "fwd_bwd")}
    times |= {f"product_{s}": [] for s in products}
    for r in range(args.rounds):
        for name, side in sides.items():
            times[f"{name}_fwd"].append(timed(side, False))
            times[f"{name}_fwd_bwd"].append(timed(side, True))
        for name, side in products.items():
            times[f"product_{name}"].append(timed(side, False))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} ms" for k, v in times.items()))
    ms = {key: statistics.median(v) for key, v in times.items()}
    matmul = 2 * t * k * n  # FLOPs of one of the feed-forward's products
    unit = t * n * torch.finfo(dtype).bits // 8  # one pass over a [tokens, intermediate] tensor
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_gbps": args.peak_gbps,
        "model_size": args.model_size,
        "tokens": t,
        "dtype": str(dtype).removeprefix("torch."),
        "plain_compiled": plain is not plain_layer,
        "max_abs_diff": diff,
        **{f"{key}_ms": round(v, 4) for key, v in ms.items()},
        "ratio_fwd_bwd_vs_fusedgelu": round(ms["fusedgelu_fwd_bwd"] / ms["fusedffn_fwd_bwd"], 3),
        "ratio_fwd_bwd_vs_plain": round(ms["plain_fwd_bwd"] / ms["fusedffn_fwd_bwd"], 3),
        # six products forward and backward: two forward, four backward
        **{f"{s}_fwd_bwd_tflops": round(6 * matmul / ms[f"{s}_fwd_bwd"] / 1e9, 1) for s in sides},
        **{f"product_{s}_tflops": round(matmul / ms[f"product_{s}"] / 1e9, 1) for s in products},
        "gelu_gb": {"fusedgelu": round(5 * unit / 1e9, 3), "fusedffn": round(2 * unit / 1e9, 3)},
    }
    if args.peak_gbps:
        result["gelu_saved_floor_ms"] = round(3 * unit / args.peak_gbps / 1e6, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
