"""Benchmark `bertforge data` against Google's create_pretraining_data.py, side by side.

Builds a public-domain English corpus (GCIDE + King James text; GCIDE is GPL, so it is built
here and never shipped), trains one uncased 30,522-token vocabulary on it, then runs on the
same corpus, vocab and flags (max_seq_length 128, max_predictions_per_seq 20, dupe_factor 5):

- Google's script (bert-tensorflow 1.0.4 under TensorFlow, in the reference venv, through
  tests/reference/google_runner.py): one process, all instances in memory;
- Hugging Face tokenizers alone encoding every line (the floor: tokenization), and bertforge's
  own tokenizer (LineEncoder: the same ids, each distinct piece of text tokenized once);
- bertforge like for like (`--format tfrecord --dupe-factor 5`), with all cores and with one;
- bertforge's default (native shards, dynamic masking, dupe_factor 1);
- bertforge's default on a 10x larger corpus (peak memory must not grow).

`--corpus turkish` runs it on Turkish text instead (`corpora.py turkish`, 7.6 MB: `--mb 7.5
--large-mb 0`), whose words are more varied than English's; `--cased` trains and uses a cased
vocabulary (Google's script told do_lower_case False), as Turkish models usually are.

Each run is its own process; peak RSS is summed over the process tree (workers included).

    python bench/data_creation.py [--mb 30] [--large-mb 300] [--reference-python PYTHON]
        [--corpus english|turkish] [--cased]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from common import HERE, corpus_file, measure

ROOT = HERE.parent
FLAGS = {"max_seq_length": 128, "max_predictions_per_seq": 20, "masked_lm_prob": 0.15,
         "short_seq_prob": 0.1, "dupe_factor": 5, "random_seed": 12345}  # fmt: skip

ENCODE = """
import sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
with open(sys.argv[2], encoding="utf-8") as f:
    lines = [line.strip() for line in f if line.strip()]
method = getattr(tok, sys.argv[3])
for i in range(0, len(lines), 10000):
    method(lines[i : i + 10000], add_special_tokens=False)
"""

LINE_ENCODER = """
import sys
import numpy as np
from bertforge.tokenization import load_vocab
encoder = load_vocab(sys.argv[1]).encoder()
with open(sys.argv[2], encoding="utf-8") as f:
    lines = [line.strip() for line in f if line.strip()]
for i in range(0, len(lines), 65536):
    encoder.encode(lines[i : i + 65536], np.dtype(np.uint16))
"""


def bertforge_data(corpus: Path, vocab: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bertforge.cli", "data", "--input", str(corpus), "--vocab",
            str(vocab), "--output", str(out), "--overwrite", "--no-progress", *extra]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=30)
    ap.add_argument("--large-mb", type=float, default=300)
    ap.add_argument("--reference-python", default=str(ROOT / ".venv-ref" / "bin" / "python"))
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--corpus", choices=["english", "turkish"], default="english")
    ap.add_argument("--cased", action="store_true")
    args = ap.parse_args()
    work: Path = args.work
    corpus = corpus_file(work, args.mb, args.corpus)
    name = "" if args.corpus == "english" else f"_{args.corpus}"
    vocab = work / f"data_vocab{name}{'_cased' if args.cased else ''}"
    if not (vocab / "manifest.json").exists():
        measure([sys.executable, "-m", "bertforge.cli", "vocab", "--input", str(corpus),
                 "--output", str(vocab), "--vocab-size", "30522", "--overwrite",
                 "--no-progress", *(["--cased"] if args.cased else [])])  # fmt: skip
    out = work / "data_out"
    out.mkdir(parents=True, exist_ok=True)
    job = out / "google_job.json"
    job.write_text(json.dumps({"tasks": [{"create": {
        "vocab": str(vocab / "vocab.txt"), "do_lower_case": not args.cased, "input": str(corpus),
        "output": str(out / "google.tfrecord"), **FLAGS}}]}))  # fmt: skip
    like = ["--format", "tfrecord", "--dupe-factor", "5", "--max-seq-length", "128",
            "--max-predictions-per-seq", "20", "--random-seed", "12345"]  # fmt: skip
    runs: list[tuple[str, list[str], dict[str, str] | None, float]] = [
        ("Google create_pretraining_data.py (1 process)",
         [args.reference_python, str(ROOT / "tests/reference/google_runner.py"), str(job)],
         {"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}, args.mb),
        ("HF tokenizers encode_batch alone (all cores)",
         [sys.executable, "-c", ENCODE, str(vocab / "tokenizer.json"), str(corpus),
          "encode_batch"], None, args.mb),
        ("HF tokenizers encode_batch_fast alone (all cores)",
         [sys.executable, "-c", ENCODE, str(vocab / "tokenizer.json"), str(corpus),
          "encode_batch_fast"], None, args.mb),
        ("bertforge's LineEncoder alone (1 process)",
         [sys.executable, "-c", LINE_ENCODER, str(vocab), str(corpus)], None, args.mb),
        (f"bertforge --format tfrecord --dupe-factor 5 ({os.cpu_count()} workers)",
         bertforge_data(corpus, vocab, out / "tf", *like), None, args.mb),
        ("bertforge --format tfrecord --dupe-factor 5 --workers 1",
         bertforge_data(corpus, vocab, out / "tf1", *like, "--workers", "1"), None, args.mb),
        ("bertforge default (native, dynamic masking)",
         bertforge_data(corpus, vocab, out / "native"), None, args.mb),
    ]  # fmt: skip
    if args.large_mb:
        large = corpus_file(work, args.large_mb, args.corpus)
        runs.append((f"bertforge default (native), {args.large_mb:g} MB corpus",
                     bertforge_data(large, vocab, out / "native_large"), None,
                     args.large_mb))  # fmt: skip

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")  # fmt: skip
    print(f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.1f} MB); flags {FLAGS}\n")
    print("| run | corpus MB | wall s | MB/s | vs Google | vs encode_batch | peak RSS MB "
          "(largest process) | peak RSS MB (all processes) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    walls: dict[str, float] = {}
    for name, cmd, env, mb in runs:
        wall, single, tree = measure(cmd, env)
        walls[name] = wall
        google = next(iter(walls.values()))
        floor = walls.get("HF tokenizers encode_batch alone (all cores)")
        scale = mb / args.mb
        vs_google = f"{google * scale / wall:.1f}x" if not name.startswith("Google") else "1.0x"
        vs_floor = f"{wall / (floor * scale):.2f}x" if floor else ""
        print(f"| {name} | {mb:g} | {wall:.1f} | {mb / wall:.2f} | {vs_google} | {vs_floor} | "
              f"{single:.0f} | {tree:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
