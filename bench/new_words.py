"""Does starting new words from the mean of their pieces help? `bertforge vocab extend`, measured.

A model is pretrained on general English (GCIDE dictionary text) with its own vocabulary, then
continued on a new domain (the King James Bible) with that vocabulary extended by `vocab
extend` (99 words over its [unusedN] lines). Two continuations, side by side on the same data,
steps and seed:
- mean: the default, each new word's embedding and masked-LM bias start as the mean of its
  pieces' rows in the checkpoint;
- slot: the new words keep the [unusedN] rows of the checkpoint (what editing vocab.txt by
  hand gives; here a copy of the checkpoint whose vocab.txt already holds the new words).
Held-out masked-LM loss and accuracy before the first step and after each evaluation are
printed; the last line is one JSON object.

    python bench/new_words.py --general bench/work/gcide.txt
(`python bench/corpora.py gcide --output bench/work/gcide.txt --max-mb 4` builds it.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import QUIET, SHAPE, bertforge, eval_records, general_model_flags, pretrain_general

from bertforge.cli import demo_corpus


def main_() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    general_model_flags(p, "bench/work/new_words")
    args = p.parse_args()
    work = Path(args.work)
    start = time.perf_counter()
    pretrain_general(args, work)
    domain = str(demo_corpus())
    bertforge("vocab", "extend", "--input", domain, "--vocab", str(work / "vocab"),
              "--output", str(work / "vocab-ext"), QUIET)  # fmt: skip
    bertforge("data", "--input", domain, "--vocab", str(work / "vocab-ext"),
              "--output", str(work / "domain"), *SHAPE, QUIET)  # fmt: skip
    slot = work / "base-slot"  # the checkpoint as if its vocab.txt had been edited by hand
    shutil.copytree(work / "base", slot)
    shutil.copy(work / "vocab-ext" / "vocab.txt", slot / "vocab.txt")
    results = {}
    for name, init in (("mean", work / "base"), ("slot", slot)):
        common = ["--data", str(work / "domain"), "--init-checkpoint", str(init), QUIET]
        bertforge("train", *common, "--output", str(work / f"{name}-0"), "--no-do-train")
        bertforge("train", *common, "--output", str(work / name), "--train-batch-size",
                  str(args.batch_size), "--num-train-steps", str(args.steps),
                  "--learning-rate", "5e-4", "--eval-every", str(args.steps // 4))  # fmt: skip
        results[name] = eval_records(work / f"{name}-0") + eval_records(work / name)
    ext = json.loads((work / "vocab-ext" / "manifest.json").read_text())
    print(f"\nvocab extend: {ext['counts']['added_words']} words; held-out pieces/word "
          f"{ext['quality_before']['pieces_per_word']:.3f} -> "
          f"{ext['quality']['pieces_per_word']:.3f}")  # fmt: skip
    print(f"{'step':>6} {'mean: MLM loss':>15} {'acc':>7} {'slot: MLM loss':>15} {'acc':>7}")
    for a, b in zip(results["mean"], results["slot"], strict=True):
        print(f"{a['step']:>6} {a['masked_lm_loss']:>15.4f} {a['masked_lm_accuracy']:>7.2%} "
              f"{b['masked_lm_loss']:>15.4f} {b['masked_lm_accuracy']:>7.2%}")  # fmt: skip
    summary = {
        "model_size": args.model_size,
        "base_steps": args.base_steps,
        "steps": args.steps,
        "pieces_per_word": [q["pieces_per_word"] for q in (ext["quality_before"], ext["quality"])],
        **{
            name: [(r["step"], r["masked_lm_loss"], r["masked_lm_accuracy"]) for r in rows]
            for name, rows in results.items()
        },
        "seconds": round(time.perf_counter() - start),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main_()
