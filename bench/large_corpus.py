"""The brief's 6 GB corpus: `bertforge vocab` and `bertforge data` on it whole, against
Google's create_pretraining_data.py on a chunk of it, as the how-to documents cut it.

Google's script holds every instance of its input in memory (2.2 GB for 30 MB of text), so a
corpus of gigabytes must be cut into chunks and each chunk run on its own; this runs it on one
30 MB chunk of the same corpus, in the same run, and scales its time to the whole corpus
(chunks take about the same time each: the script is linear in its input). bertforge runs on
the whole corpus in one command. Then what comes after the data stage on such a corpus: `data
verify`, and the time `bertforge train` takes to its first step (BERT-mini, one step) on the
whole output against on the chunk's.

The corpus is built here (never shipped): the English benchmark corpus (GCIDE + King James
text, 27 MB) repeated to `--gb`, each repetition with its documents in another order and 2% of
its words replaced by new compounds of two corpus words ("lightfirmament"), so that its
vocabulary keeps growing as a real corpus's does (about 20 words in 1,000 are new, nearly
all of them seen once) and the tokenizer's cache of distinct pieces does not see only
repeats.

    python bench/large_corpus.py [--gb 6] [--chunk-mb 30] [--reference-python PYTHON]
        [--work bench/work/large] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import HERE, corpus_file, measure

ROOT = HERE.parent
FLAGS = {"max_seq_length": 128, "max_predictions_per_seq": 20, "masked_lm_prob": 0.15,
         "short_seq_prob": 0.1, "dupe_factor": 5, "random_seed": 12345}  # fmt: skip
NEW_WORDS = 0.02  # share of word occurrences replaced by a new compound in each repetition


def build_corpus(base: Path, out: Path, gb: float, seed: int = 0) -> None:
    """Write `gb` GB of text made from `base` (documents separated by blank lines): each
    repetition shuffles the documents and replaces NEW_WORDS of the words by compounds of two
    random corpus words. Streamed: memory holds the base only."""
    docs = [d for d in base.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    # Each document as a flat list of words, each with what follows it (" " or "\n").
    split: list[list[str]] = []
    for doc in docs:
        words: list[str] = []
        for line in doc.strip("\n").split("\n"):
            parts = line.split(" ")
            words += [w + " " for w in parts[:-1]] + [parts[-1] + "\n"]
        split.append(words)
    pool = sorted({w.strip().lower() for d in split for w in d if w.strip().isalpha()})
    pool_arr = np.array(pool, dtype=object)
    sizes = np.array([len(d) for d in split])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    flat = [w for d in split for w in d]
    rng = np.random.default_rng(seed)
    target = int(gb * 1e9)
    written = 0
    tmp = out.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            words = list(flat)
            where = np.flatnonzero(rng.random(len(words)) < NEW_WORDS)
            left = pool_arr[rng.integers(len(pool), size=len(where))]
            right = pool_arr[rng.integers(len(pool), size=len(where))]
            for i, a, b in zip(where.tolist(), left.tolist(), right.tolist(), strict=True):
                w = words[i]
                words[i] = a + b + w[-1]
            for d in rng.permutation(len(split)).tolist():
                text = "".join(words[starts[d] : starts[d + 1]]) + "\n"
                f.write(text)
                written += len(text.encode("utf-8"))
                if written >= target:
                    break
    tmp.rename(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=6.0)
    ap.add_argument("--reference-python", default=str(ROOT / ".venv-ref" / "bin" / "python"))
    ap.add_argument("--work", type=Path, default=HERE / "work" / "large")
    ap.add_argument("--chunk-mb", type=float, default=30, help="the how-tos' chunk of text")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help="keep the corpus and outputs")
    args = ap.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"varied_{args.gb:g}gb.txt"
    if args.build_only:
        build_corpus(corpus_file(HERE / "work", 27), corpus, args.gb)
        return
    if not corpus.exists():  # in a child process: a forked child's peak RSS counts ours
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--build-only"], check=True)
        print(f"built {corpus} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    size_mb = corpus.stat().st_size / 1e6
    chunk = work / f"chunk_{args.chunk_mb:g}mb.txt"
    with open(corpus, "rb") as f:
        head = f.read(int(args.chunk_mb * 1e6))
    chunk.write_bytes(head[: head.rfind(b"\n\n") + 1])
    chunk_mb = chunk.stat().st_size / 1e6

    bf = [sys.executable, "-m", "bertforge.cli"]
    vocab, data, small = work / "vocab", work / "data", work / "data_chunk"
    job = work / "google_job.json"
    job.write_text(json.dumps({"tasks": [{"create": {
        "vocab": str(vocab / "vocab.txt"), "do_lower_case": True, "input": str(chunk),
        "output": str(work / "google.tfrecord"), **FLAGS}}]}))  # fmt: skip
    steps = ["--model-size", "mini", "--num-train-steps", "1", "--train-batch-size", "32",
             "--no-do-eval", "--no-progress", "--overwrite"]  # fmt: skip
    google_env = {"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    like = ["--format", "tfrecord", "--dupe-factor", "5", "--random-seed", "12345"]
    runs: dict[str, tuple[str, list[str], dict[str, str] | None, float, Path | None]] = {
        "vocab": ("bertforge vocab (30,522 pieces), whole corpus",
                  [*bf, "vocab", "--input", str(corpus), "--output", str(vocab),
                   "--vocab-size", "30522", "--overwrite", "--no-progress"], None, size_mb, vocab),
        "google": (f"Google create_pretraining_data.py (dupe 5), one {args.chunk_mb:g} MB chunk",
                   [args.reference_python, str(ROOT / "tests/reference/google_runner.py"),
                    str(job)], google_env, chunk_mb, work / "google.tfrecord"),
        "like": ("bertforge data --format tfrecord --dupe-factor 5, the same chunk",
                 [*bf, "data", "--input", str(chunk), "--vocab", str(vocab), "--output",
                  str(work / "data_chunk_tf"), *like, "--overwrite", "--no-progress"], None,
                 chunk_mb, work / "data_chunk_tf"),
        "whole": ("bertforge data (default: native, dynamic masking), whole corpus",
                  [*bf, "data", "--input", str(corpus), "--vocab", str(vocab), "--output",
                   str(data), "--overwrite", "--no-progress"], None, size_mb, data),
        "verify": ("bertforge data verify, the whole corpus's output",
                   [*bf, "data", "verify", str(data)], None, size_mb, None),
        "chunk": ("bertforge data (default), the chunk",
                  [*bf, "data", "--input", str(chunk), "--vocab", str(vocab), "--output",
                   str(small), "--overwrite", "--no-progress"], None, chunk_mb, small),
        "train_chunk": ("bertforge train, start-up and 1 step of BERT-mini, on the chunk's output",
                        [*bf, "train", "--data", str(small), "--output",
                         str(work / "train_chunk"), *steps], None, chunk_mb, None),
        "train_whole": ("bertforge train, start-up and 1 step of BERT-mini, on the whole's output",
                        [*bf, "train", "--data", str(data), "--output",
                         str(work / "train_whole"), *steps], None, size_mb, None),
    }  # fmt: skip

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")  # fmt: skip
    print(f"corpus: {corpus} ({size_mb:.0f} MB); chunk {chunk_mb:.1f} MB; Google's flags "
          f"{FLAGS}\n")  # fmt: skip
    print("| run | corpus MB | wall s | MB/s | peak RSS MB (largest process) | "
          "peak RSS MB (all processes) | output MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    wall: dict[str, float] = {}
    for key, (name, cmd, env, mb, out) in runs.items():
        wall[key], single, tree = measure(cmd, env)
        size = f"{du(out) / 1e6:,.0f}" if out is not None else ""
        print(f"| {name} | {mb:.0f} | {wall[key]:.1f} | {mb / wall[key]:.2f} | {single:.0f} | "
              f"{tree:.0f} | {size} |", flush=True)  # fmt: skip
    google = wall["google"] * size_mb / chunk_mb
    print(
        f"\nGoogle's script on the whole corpus by {args.chunk_mb:g} MB chunks (one chunk's time x "
        f"{size_mb / chunk_mb:.0f}): {google:.0f} s = {google / 3600:.1f} h"
    )
    print(f"like for like on the chunk: bertforge {wall['google'] / wall['like']:.1f}x Google")
    print(
        f"bertforge default on the whole corpus: {wall['whole']:.0f} s, "
        f"{google / wall['whole']:.1f}x Google's chunked time"
    )
    print(
        f"train start-up on the whole corpus's output: "
        f"{wall['train_whole'] - wall['train_chunk']:+.1f} s against the chunk's"
    )
    if not args.keep:
        for path in (corpus, data, small, work / "data_chunk_tf", work / "google.tfrecord"):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def du(path: Path) -> int:
    """Bytes in a file, or in a directory's files."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


if __name__ == "__main__":
    main()
