"""`bertforge data --split-sentences` on a corpus with a paragraph per line, measured.

The demo corpus (King James Bible: a verse per line, a blank line between chapters) is
rewritten with each chapter on one line, the layout of WikiExtractor's output and most dumps.
Then, side by side with one vocabulary (trained on the demo corpus) and the same settings:
- verses: the corpus as it is (Google's format);
- lines: the chapter-per-line corpus, without the option (most of its text is cut away);
- split: the chapter-per-line corpus with --split-sentences.
Printed: the share of the corpus's text the instances hold (`text_ratio`), instances,
sentences and the data stage's wall time for each; how fast split_sentences runs on one core;
and how its cuts line up with the verse ends (a verse can hold several sentences, so a cut
inside a verse is not by itself a mistake). The last line is one JSON object.

    python bench/sentence_split.py [--max-seq-length 128] [--workers 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

from common import demo_bench, measure

from bertforge.sentences import split_sentences


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    args, work, texts = demo_bench(p, "sentence_split")
    chapters = [c.split("\n") for c in texts]
    verses, lines = work / "verses.txt", work / "lines.txt"
    verses.write_text("\n\n".join("\n".join(c) for c in chapters) + "\n", encoding="utf-8")
    lines.write_text("\n\n".join(" ".join(c) for c in chapters) + "\n", encoding="utf-8")

    paragraphs = [" ".join(c) for c in chapters]
    mb = sum(len(t.encode()) for t in paragraphs) / 1e6
    start = time.perf_counter()
    split = [split_sentences(t) for t in paragraphs]
    seconds = time.perf_counter() - start
    # where the cuts fall: at a verse end, or inside a verse
    at_end = cuts = ends = 0
    for chapter, sentences in zip(chapters, split, strict=True):
        verse_ends = set(itertools.accumulate(len(v) + 1 for v in chapter[:-1]))
        sentence_ends = set(starts(" ".join(chapter), sentences)[1:])
        ends += len(verse_ends)
        cuts += len(sentence_ends)
        at_end += len(verse_ends & sentence_ends)

    cli = [sys.executable, "-m", "bertforge.cli"]
    vocab = work / "vocab"
    if not (vocab / "vocab.txt").exists():
        measure([*cli, "vocab", "--input", str(verses), "--output", str(vocab),
                 "--vocab-size", "8000", "--no-progress"])  # fmt: skip
    sides = {"verses": (verses, []), "lines": (lines, []),
             "split": (lines, ["--split-sentences"])}  # fmt: skip
    results = {}
    for name, (corpus, extra) in sides.items():
        out = work / name
        wall, _, peak = measure([
            *cli, "data", "--input", str(corpus), "--vocab", str(vocab), "--output", str(out),
            "--max-seq-length", str(args.max_seq_length), "--workers", str(args.workers),
            "--overwrite", "--no-progress", *extra,
        ])  # fmt: skip
        c = json.loads((out / "manifest.json").read_text())["counts"]
        results[name] = {"text_ratio": round(c["text_ratio"], 4), "instances": c["instances"],
                         "sentences": c["sentences"], "wall_s": round(wall, 2),
                         "peak_rss_mb": round(peak)}  # fmt: skip

    print(f"{'corpus':<8} {'text held':>10} {'instances':>10} {'sentences':>10} {'wall s':>7}")
    for name, r in results.items():
        print(f"{name:<8} {r['text_ratio']:>10.1%} {r['instances']:>10,} {r['sentences']:>10,} "
              f"{r['wall_s']:>7.2f}")  # fmt: skip
    print(f"split_sentences: {mb:.1f} MB in {seconds:.3f} s on one core ({mb / seconds:.0f} MB/s)"
          f"; {cuts:,} cuts, {at_end:,} of them at a verse end; {at_end:,} of {ends:,} verse ends "
          "found")  # fmt: skip
    summary = {
        "split_mb_per_s": round(mb / seconds, 1),
        "cuts": cuts,
        "cuts_at_verse_ends": at_end,
        "verse_ends": ends,
        **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()},
    }
    print(json.dumps(summary))


def starts(text: str, pieces: list[str]) -> list[int]:
    """Where each of the pieces, found in order, starts in text."""
    found, at = [], 0
    for piece in pieces:
        at = text.index(piece, at)
        found.append(at)
        at += len(piece)
    return found


if __name__ == "__main__":
    main()
