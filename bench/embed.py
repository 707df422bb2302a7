"""`bertforge embed` against the transformers code a user would write, side by side.

Sentence vectors (the mean of the last layer over each line's pieces, [CLS] and [SEP] left
out) for the first --lines verses of the demo corpus, from one BERT model (random weights
of --model-size, saved as a Hugging Face BertModel with a vocabulary trained on the demo
corpus), all in this process, interleaved --repeats times so that the machine's drift hits
every side alike; each side's time includes loading the model:

- transformers: AutoTokenizer + AutoModel, batches of 32 lines in file order (padding=True,
  truncation at 512), masked mean, torch.no_grad, fp32: the usual loop;
- transformers, sorted: the same with the lines sorted by length first (less padding);
- bertforge embed --precision fp32, and --precision auto (bf16 on a CPU that multiplies
  bf16 in hardware, and on a GPU).

Printed: seconds (best of the repeats), lines/s, each side's ratio to the usual loop, and how
far each side's vectors are from the usual loop's (the largest absolute difference, the
smallest cosine). The last line is one JSON object.

    python bench/embed.py [--model-size small] [--lines 2000] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import bertforge, demo_bench

from bertforge.config import EmbedConfig
from bertforge.embed import embed

SIZES = {"mini": (4, 256, 4), "small": (4, 512, 8), "base": (12, 768, 12)}  # layers, H, heads


def build_model(work: Path, size: str, corpus: Path) -> Path:
    """A Hugging Face BertModel of `size` with random weights and a demo-corpus vocabulary."""
    import transformers

    model = work / f"bert-{size}"
    if (model / "config.json").exists():
        return model
    vocab = work / "vocab"
    if not (vocab / "vocab.txt").exists():
        bertforge("vocab", "--input", str(corpus), "--output", str(vocab), "--vocab-size", "8000",
                  "--no-progress")  # fmt: skip
    tok = transformers.BertTokenizerFast(str(vocab / "vocab.txt"), do_lower_case=True)
    layers, hidden, heads = SIZES[size]
    config = transformers.BertConfig(
        vocab_size=tok.vocab_size, num_hidden_layers=layers, hidden_size=hidden,
        num_attention_heads=heads, intermediate_size=4 * hidden,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(model)
    tok.save_pretrained(model)
    return model


def transformers_loop(
    model_dir: Path, lines: list[str], device: str, by_length: bool
) -> np.ndarray:
    """The usual loop: batches of 32, padded to their longest line, masked mean of the last layer
    over the pieces ([CLS] and [SEP] left out, as bertforge's mean pooling does)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir).to(device).eval()
    order = (
        sorted(range(len(lines)), key=lambda i: len(lines[i])) if by_length else range(len(lines))
    )
    order = list(order)
    out = np.zeros((len(lines), model.config.hidden_size), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(order), 32):
            rows = order[start : start + 32]
            enc = tok([lines[i] for i in rows], padding=True, truncation=True, max_length=512,
                      return_tensors="pt").to(device)  # fmt: skip
            states = model(**enc).last_hidden_state
            mask = enc["attention_mask"].clone()
            mask[:, 0] = 0  # [CLS]
            mask[torch.arange(len(rows)), enc["attention_mask"].sum(1) - 1] = 0  # [SEP]
            mean = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            out[rows] = mean.float().cpu().numpy()
    return out


def bertforge_embed(
    model_dir: Path, source: Path, out: Path, device: str, precision: str
) -> np.ndarray:
    paths = {"model": str(model_dir), "input": str(source), "output": str(out)}
    embed(EmbedConfig(**paths, device=device, precision=precision, max_length=512,
                      overwrite=True, progress=False))  # fmt: skip
    return np.load(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-size", choices=sorted(SIZES), default="small")
    p.add_argument("--lines", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args, work, chapters = demo_bench(p, "embed")
    corpus = work / "corpus.txt"
    corpus.write_text("\n\n".join(chapters) + "\n")
    lines = [line for c in chapters for line in c.split("\n") if line.strip()][: args.lines]
    source = work / "lines.txt"
    source.write_text("\n".join(lines) + "\n")
    model_dir = build_model(work, args.model_size, corpus)
    out = work / "vectors.npy"
    sides: dict[str, Callable[[], np.ndarray]] = {
        "transformers": lambda: transformers_loop(model_dir, lines, args.device, False),
        "transformers, sorted": lambda: transformers_loop(model_dir, lines, args.device, True),
        "bertforge fp32": lambda: bertforge_embed(model_dir, source, out, args.device, "fp32"),
        "bertforge auto": lambda: bertforge_embed(model_dir, source, out, args.device, "auto"),
    }
    from bertforge.hardware import precision_name, resolve_precision

    auto = precision_name(resolve_precision("auto", torch.device(args.device)))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; BERT-{args.model_size}, {len(lines):,} lines, device "
          f"{args.device}, --precision auto here: {auto}")  # fmt: skip
    seconds: dict[str, float] = {}
    vectors: dict[str, np.ndarray] = {}
    for r in range(args.repeats):
        for name, run in sides.items():
            start = time.perf_counter()
            vectors[name] = run()
            took = time.perf_counter() - start
            seconds[name] = min(seconds.get(name, took), took)
            print(f"round {r + 1}: {name} {took:.2f} s", flush=True)
    base = vectors["transformers"]
    rows = {}
    print(f"\n{'side':22s} {'seconds':>8s} {'lines/s':>8s} {'speed':>6s} {'max diff':>9s} "
          f"{'min cosine':>10s}")  # fmt: skip
    for name, v in vectors.items():
        cosine = (v * base).sum(1) / np.maximum(
            np.linalg.norm(v, axis=1) * np.linalg.norm(base, axis=1), 1e-12
        )
        rows[name] = {
            "seconds": seconds[name], "lines_per_s": len(lines) / seconds[name],
            "speed": seconds["transformers"] / seconds[name],
            "max_abs_diff": float(np.abs(v - base).max()), "min_cosine": float(cosine.min()),
        }  # fmt: skip
        r = rows[name]
        print(f"{name:22s} {r['seconds']:8.2f} {r['lines_per_s']:8.1f} {r['speed']:5.2f}x "
              f"{r['max_abs_diff']:9.2e} {r['min_cosine']:10.6f}")  # fmt: skip
    print(json.dumps({"model_size": args.model_size, "lines": len(lines), "device": args.device,
                      "auto_precision": auto, "sides": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
