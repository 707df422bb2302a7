"""The optimizer update of one training step: bertforge's (`train.update`: the global norm,
then fused AdamW clipping through its grad_scale and skipping a bad step through found_inf)
against the usual clip_grad_norm_ followed by the same fused step, interleaved in one process.

    python bench/optimizer_update.py --model-size base --device cpu

Prints one line per round and, last, one JSON object: milliseconds per update of each and
the ratio. Both update the same model's weights from the same gradients. Also timed: the same
update with `--flat-optimizer`'s FlatAdamW (norm and AdamW over one buffer per parameter group
instead of one tensor per parameter: "flat", with bertforge's Triton kernel where it runs, and
there "flat_torch", with torch's fused kernel over the same buffers); and the bytes an update
must move (per parameter: the gradient read for the norm, then parameter, gradient and both
moments read and parameter and moments written, 32 bytes in fp32) over its time, against the
device's memory bandwidth.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from train_throughput import host_sized

from bertforge import kernels
from bertforge.model import BertConfig, BertForPretraining
from bertforge.optim import FlatAdamW, param_groups
from bertforge.train import SUMS, Ledger, update


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    return "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-size", default="base")
    ap.add_argument("--vocab-size", type=int, default=30522)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--host",
        action="store_true",
        help="the model size's tensors (as many, as many layers) at hidden 8 and vocab 64: an "
        "update's time is then what the host spends on it (Python, launches), not the device",
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="updates per side per round")
    args = ap.parse_args()
    device = torch.device(args.device)
    config = BertConfig.preset(args.model_size, args.vocab_size)
    if args.host:  # a small vocabulary too: no embedding table outweighs the other tensors
        config = host_sized(dataclasses.replace(config, vocab_size=64))
    model = BertForPretraining(config).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, eps=1e-6, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    ledger = Ledger(device_skip=True, skipped=0)
    sums = torch.zeros(len(SUMS), device=device)

    def ours() -> None:
        update(model, opt, scaler, sums, 1.0, ledger)

    def flat_side(triton: bool) -> Callable[[], None]:
        """FlatAdamW's update of a copy of the model, with bertforge's Triton kernel or torch's
        fused one over the buffers."""
        flat_model = copy.deepcopy(model)
        flat_opt = FlatAdamW(param_groups(flat_model, 0.01), lr=1e-4, eps=1e-6)
        flat_opt.triton = triton
        for p, q in zip(model.parameters(), flat_model.parameters(), strict=True):
            q.grad.copy_(p.grad)
        return lambda: update(flat_model, flat_opt, scaler, sums, 1.0, ledger)

    sides = {"bertforge": ours}

    def usual() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.found_inf = torch.zeros((), device=device)  # type: ignore[attr-defined]
        opt.step()
        del opt.found_inf  # type: ignore[attr-defined]

    def timed(step) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps * 1e3

    sides["usual"] = usual
    sides["flat"] = flat_side(triton=True)
    if kernels.usable(sums):  # the Triton kernel runs here: torch's over the buffers as well
        sides["flat_torch"] = flat_side(triton=False)
    for step in sides.values():  # warm-up: optimizer state, kernels
        timed(step)
    results: dict[str, list[float]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for side, step in sides.items():
            results[side].append(timed(step))
        print(f"round {r}: " + ", ".join(f"{s} {v[-1]:.2f} ms" for s, v in results.items()))
    best = {k: min(v) for k, v in results.items()}
    gb = 32 * sum(p.numel() for p in model.parameters()) / 1e9
    print(f"an update moves {gb:.2f} GB: "
          + ", ".join(f"{s} {gb / ms * 1e3:.0f} GB/s" for s, ms in best.items()))  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(json.dumps({
        "model_size": args.model_size,
        "host": args.host,
        "tensors": len(list(model.parameters())),
        "parameters": sum(p.numel() for p in model.parameters()),
        "bertforge_ms": round(best["bertforge"], 3),
        "usual_ms": round(best["usual"], 3),
        "ratio": round(best["usual"] / best["bertforge"], 3),
        "flat_ms": round(best["flat"], 3),
        "flat_torch_ms": round(best["flat_torch"], 3) if "flat_torch" in best else None,
        "gb_per_update": round(gb, 3),
        "device": f"{name}, torch {torch.__version__}",
    }))  # fmt: skip


if __name__ == "__main__":
    main()
