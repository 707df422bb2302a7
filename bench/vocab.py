"""Benchmark `bertforge vocab` against SentencePiece BPE and Hugging Face's WordPiece trainer.

Builds a public-domain English corpus (GCIDE + King James text, cut to --mb; GCIDE is GPL, so it
is built here and never shipped), then trains a --vocab-size vocabulary with each tool in its
own process, measuring wall time and peak RSS side by side in one run. bertforge runs are also
swept over --max-sentences, with the quality figures it measures on held-out documents.
SentencePiece and bertforge's default run alternately --repeats times (this VM's speed drifts
by 20% within minutes); the table gives their medians. Peak RSS covers all processes of a run.
`--large-mb 1000` adds a run on a ~1 GB corpus to show time and memory stay bounded.
`--accented` adds alternating pairs on the same corpus with c, g, I written ç, ğ, İ (every line
then has non-ASCII letters, as Turkish text does), bertforge cased and uncased.
`--corpus turkish` runs it all on Turkish text instead (`corpora.py turkish`: 7.6 MB of
Debian's Turkish manual pages and LibreOffice's Turkish help; `--mb 7.5` reads it once);
`--cased` trains every vocabulary cased (as SentencePiece always is, and as Turkish models
usually are).

    python bench/vocab.py [--mb 30] [--vocab-size 30000] [--repeats 3] [--large-mb 1000]
        [--accented] [--corpus english|turkish] [--cased]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from common import HERE, corpus_file, measure

import bertforge as bertforge_pkg


def bertforge(corpus: Path, out: Path, vocab_size: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bertforge.cli",
        "vocab",
        "--input",
        str(corpus),
        "--output",
        str(out),
        "--vocab-size",
        str(vocab_size),
        "--overwrite",
        "--no-progress",
        *extra,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=30)
    ap.add_argument("--vocab-size", type=int, default=30000)
    ap.add_argument("--large-mb", type=float, default=0)
    ap.add_argument(
        "--repeats", type=int, default=3, help="alternating SentencePiece/bertforge pairs"
    )
    ap.add_argument("--accented", action="store_true", help="also time accented text")
    ap.add_argument("--corpus", choices=["english", "turkish"], default="english")
    ap.add_argument("--cased", action="store_true", help="cased vocabularies (bertforge, HF)")
    ap.add_argument("--work", type=Path, default=HERE / "work")
    args = ap.parse_args()
    corpus = corpus_file(args.work, args.mb, args.corpus)
    cased = ["--cased"] if args.cased else []
    out = args.work / "vocab_out"
    v = args.vocab_size
    spm = (
        "import sentencepiece as s, sys; s.SentencePieceTrainer.train(input=sys.argv[1], "
        "model_prefix=sys.argv[2], vocab_size=int(sys.argv[3]), model_type='bpe', "
        "character_coverage=1.0, num_threads=os.cpu_count(), minloglevel=2)"
    ).replace("import sentencepiece", "import os, sentencepiece")
    hf = (
        "import sys; from tokenizers import BertWordPieceTokenizer as B; "
        f"B(lowercase={not args.cased}).train([sys.argv[1]], vocab_size=int(sys.argv[2]), "
        "show_progress=False)"
    )
    sp = (
        "SentencePiece BPE (spm.train)",
        [sys.executable, "-c", spm, str(corpus), str(args.work / "spm"), str(v)],
        None,
    )
    default = (
        f"bertforge vocab ({'--cased' if cased else 'default'})",
        bertforge(corpus, out / "default", v, *cased),
        out / "default",
    )
    runs: list[tuple[str, list[str], Path | None]] = [
        ("HF BertWordPieceTokenizer.train", [sys.executable, "-c", hf, str(corpus), str(v)], None),
    ]
    for n in (100_000, 1_000_000_000):
        name = "all sentences" if n > 1e8 else f"{n:,} sentences"
        runs.append(
            (
                f"bertforge vocab --max-sentences {name}",
                bertforge(corpus, out / f"s{n}", v, "--max-sentences", str(n), *cased),
                out / f"s{n}",
            )
        )
    runs.append(
        (
            "bertforge vocab --algorithm sentencepiece",
            bertforge(corpus, out / "sp", v, "--algorithm", "sentencepiece", *cased),
            out / "sp",
        )
    )
    if args.large_mb:
        large = corpus_file(args.work, args.large_mb, args.corpus)
        runs.append(
            (
                f"bertforge vocab (default), {args.large_mb:g} MB corpus",
                bertforge(large, out / "large", v, *cased),
                out / "large",
            )
        )

    # Python's bytecode cache on, as on a user's machine (this VM sets PYTHONDONTWRITEBYTECODE,
    # which makes every bertforge run recompile its modules: ~0.1-0.2 s), filled once here.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(Path(bertforge_pkg.__file__).parent)],
        check=True,
    )
    py = platform.python_version()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {py}")
    print(f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.1f} MB), vocab size {v}")
    # SentencePiece and bertforge's default alternate, so that drift of the machine hits both.
    walls: dict[str, list[float]] = {sp[0]: [], default[0]: []}
    rss: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, cmd, _ in (sp, default):
            wall, _, tree = measure(cmd)
            walls[name].append(wall)
            rss[name] = max(rss.get(name, 0.0), tree)
    pairs = [b / a for a, b in zip(walls[sp[0]], walls[default[0]], strict=True)]
    print(
        f"alternating runs (s): SentencePiece {fmt(walls[sp[0]])}, "
        f"bertforge {fmt(walls[default[0]])};"
        f" per-pair ratios {', '.join(f'{r:.2f}' for r in pairs)}\n"
    )
    print(
        "| run | wall s | peak RSS MB (all processes) | vs SentencePiece | [UNK] "
        "| pieces/word | vocab used |"
    )
    print("|---|---|---|---|---|---|---|")
    base = statistics.median(walls[sp[0]])
    for name, cmd, outdir in [sp, default, *runs]:
        if name in walls:
            wall, tree = statistics.median(walls[name]), rss[name]
        else:
            wall, _, tree = measure(cmd)
        q = "| |"
        if outdir is not None:
            m = json.loads((outdir / "manifest.json").read_text())["quality"]
            q = f"{m['unk_rate']:.3%} | {m['pieces_per_word']:.4f} | {m['vocab_used']:.1%}"
        label = f"{name} (median of {args.repeats})" if name in walls else name
        print(f"| {label} | {wall:.2f} | {tree:.0f} | {wall / base:.2f}x | {q} |", flush=True)
    if args.accented:
        accented_pairs(corpus, args.work, spm, v, args.repeats)


def accented_pairs(corpus: Path, work: Path, spm: str, vocab_size: int, repeats: int) -> None:
    """Alternating SentencePiece / bertforge (cased, uncased) runs on accented text."""
    accented = work / (corpus.stem + "_accented.txt")
    if not accented.exists():
        text = corpus.read_text(encoding="utf-8")
        accented.write_text(text.replace("c", "ç").replace("g", "ğ").replace("I", "İ"))
    out = work / "vocab_out"
    cmds = {
        "SentencePiece BPE": [sys.executable, "-c", spm, str(accented), str(work / "spm"),
                              str(vocab_size)],
        "bertforge --cased": bertforge(accented, out / "acc_cased", vocab_size, "--cased"),
        "bertforge (uncased)": bertforge(accented, out / "acc_uncased", vocab_size),
    }  # fmt: skip
    walls: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(repeats):
        for name, cmd in cmds.items():
            walls[name].append(measure(cmd)[0])
    print(f"\naccented text ({accented.name}), alternating runs, median (runs):")
    base = statistics.median(walls["SentencePiece BPE"])
    for name, w in walls.items():
        med = statistics.median(w)
        print(f"- {name}: {med:.2f} s ({fmt(w)}), {med / base:.2f}x SentencePiece")


def fmt(values: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in values)


if __name__ == "__main__":
    main()
