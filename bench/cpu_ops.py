"""bertforge's own ops (`bertforge.ops`) on a CPU against the torch expressions they replace,
forward and backward at a model's training shapes, interleaved in one process.

    python bench/cpu_ops.py --model-size mini --seq-len 128 --batch-size 32

For each op and precision: the hidden dropout (F.dropout), the attention probabilities'
dropout inside attention (scaled_dot_product_attention with dropout_p, and without dropout
in training), the masked-LM loss (the fp32 cross-entropy over the vocabulary and its
accuracy count), and the hidden dropout after a residual add under torch.compile (inductor's
fused dropout against the 15-bit draws; the add gives inductor something to fuse it into).
Prints milliseconds per forward + backward of each side (the median of `--rounds` rounds, the
sides alternating) and the ratio; last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bertforge import ops
from bertforge.batches import IGNORE
from bertforge.model import PRESETS


def fwd_bwd(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for x in inputs:
            x.grad = None
        out = fn(*inputs)
        out.backward(torch.ones_like(out))

    return run


def plain_loss(logits: torch.Tensor, labels: torch.Tensor, vocab: int) -> torch.Tensor:
    x = logits[:, :vocab]
    loss = F.cross_entropy(x.float(), labels, ignore_index=IGNORE, reduction="sum")
    with torch.no_grad():
        ((x.max(-1).indices == labels) & (labels != IGNORE)).sum()
    return loss


def cases(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, tuple[Callable, Callable]]:
    hidden = PRESETS[args.model_size][1]
    b, s, heads = args.batch_size, args.seq_len, hidden // 64
    g = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)

    x = leaf(b, s, hidden)
    residual = leaf(b, s, hidden)
    qkv = leaf(b, s, 3 * hidden)

    def heads_of(t: torch.Tensor) -> list[torch.Tensor]:
        """q, k, v as the model hands them over: [B, nh, S, hs] views of [B, S, 3 x H]."""
        return [x.transpose(1, 2) for x in t.unflatten(-1, (3, heads, -1)).unbind(-3)]

    lengths = torch.randint(s // 2, s + 1, (b,), generator=g)
    mask = (torch.arange(s)[None, :] < lengths[:, None]).view(b, 1, 1, s)
    rows = b * args.predictions
    vocab = args.vocab_size
    logits = leaf(rows, -(-vocab // 64) * 64)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::7] = IGNORE
    p = args.dropout

    def sdpa(*t: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        return F.scaled_dot_product_attention(*t, attn_mask=mask, dropout_p=dropout)

    return {
        "hidden dropout": (
            fwd_bwd(lambda t: F.dropout(t, p, True), x),
            fwd_bwd(lambda t: ops.dropout(t, p, True), x),
        ),
        "attention, dropout": (
            fwd_bwd(lambda t: sdpa(*heads_of(t), dropout=p), qkv),
            fwd_bwd(lambda t: ops.attention(*heads_of(t), mask, p), qkv),
        ),
        "attention, no dropout": (
            fwd_bwd(lambda t: sdpa(*heads_of(t)), qkv),
            fwd_bwd(lambda t: ops.attention(*heads_of(t), mask, 0.0), qkv),
        ),
        "masked-LM loss": (
            fwd_bwd(lambda t: plain_loss(t, labels, vocab), logits),
            fwd_bwd(lambda t: ops.masked_lm_loss(t, labels, vocab, IGNORE)[0], logits),
        ),
        "residual + dropout, compiled": (
            fwd_bwd(torch.compile(lambda t, r: F.dropout(t + r, p, True)), x, residual),
            fwd_bwd(torch.compile(lambda t, r: ops.dropout(t + r, p, True)), x, residual),
        ),
    }


def timed(run: Callable[[], None], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-size", default="mini", choices=list(PRESETS))
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--predictions", type=int, default=20, help="masked slots per instance")
    ap.add_argument("--vocab-size", type=int, default=30522)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=5, help="calls per side per round")
    args = ap.parse_args()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    result = {}
    for name in args.precision.split(","):
        for op, (torch_side, ours) in cases(args, dtypes[name]).items():
            torch_side(), ours()  # warm-up
            ms: dict[str, list[float]] = {"torch": [], "bertforge": []}
            for _ in range(args.rounds):
                ms["torch"].append(timed(torch_side, args.repeats))
                ms["bertforge"].append(timed(ours, args.repeats))
            t, o = statistics.median(ms["torch"]), statistics.median(ms["bertforge"])
            print(f"{name} {op}: torch {t:.2f} ms, bertforge {o:.2f} ms, {t / o:.2f}x")
            result[f"{name} {op}"] = {"torch_ms": round(t, 3), "bertforge_ms": round(o, 3),
                                      "ratio": round(t / o, 3)}  # fmt: skip
    print(json.dumps({"model_size": args.model_size, "seq_len": args.seq_len,
                      "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                      "ops": result}))  # fmt: skip


if __name__ == "__main__":
    main()
