"""Does a checkpoint help a model with another vocabulary? `bertforge train --transfer-vocab`.

A model is pretrained on general English (GCIDE dictionary text) with its own vocabulary. A
new domain (the King James Bible) gets a vocabulary of its own, and its data is made with it.
Two runs train on that data side by side, same steps, learning rate and seed:
- transfer: from the general model, `--init-checkpoint ... --transfer-vocab` (tokens both
  vocabularies have keep their rows, the others start from the mean of their pieces' rows);
- scratch: the same model size from a random start (what a new vocabulary meant until now).
Both predict the same tokens, so their held-out masked-LM losses compare directly. The loss
before the first step and at each evaluation is printed; the last line is one JSON object.

    python bench/transfer_vocab.py --general bench/work/gcide4.txt
(`python bench/corpora.py gcide --output bench/work/gcide4.txt --max-mb 4` builds it.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from bertforge.cli import demo_corpus, main


def bertforge(*argv: str) -> None:
    code = main(list(argv))
    if code != 0:
        raise SystemExit(f"bertforge {' '.join(argv)}: exit {code}")


def evals(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("eval")]


def main_() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--general", required=True, help="general-domain corpus (GCIDE text)")
    p.add_argument("--work", default="bench/work/transfer_vocab")
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--vocab-size", type=int, default=8000, help="the general model's")
    p.add_argument("--domain-vocab-size", type=int, default=4000)
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=200, help="steps on the new domain")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", default="5e-4")
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    quiet = "--no-progress"
    shape = ["--max-seq-length", "64", "--max-predictions-per-seq", "10"]
    start = time.perf_counter()
    bertforge("vocab", "--input", args.general, "--output", str(work / "vocab"),
              "--vocab-size", str(args.vocab_size), quiet)  # fmt: skip
    bertforge("data", "--input", args.general, "--vocab", str(work / "vocab"),
              "--output", str(work / "data"), *shape, quiet)  # fmt: skip
    bertforge("train", "--data", str(work / "data"), "--output", str(work / "base"),
              "--model-size", args.model_size, "--train-batch-size", str(args.batch_size),
              "--num-train-steps", str(args.base_steps), "--learning-rate", "1e-3",
              "--eval-every", str(args.base_steps), quiet)  # fmt: skip
    domain = str(demo_corpus())
    bertforge("vocab", "--input", domain, "--output", str(work / "domain-vocab"),
              "--vocab-size", str(args.domain_vocab_size), quiet)  # fmt: skip
    bertforge("data", "--input", domain, "--vocab", str(work / "domain-vocab"),
              "--output", str(work / "domain"), *shape, quiet)  # fmt: skip
    runs = {
        "transfer": ["--init-checkpoint", str(work / "base"), "--transfer-vocab"],
        "scratch": ["--model-size", args.model_size],
    }
    results = {}
    for name, how in runs.items():
        common = ["--data", str(work / "domain"), *how, quiet]
        train = ["--train-batch-size", str(args.batch_size), "--learning-rate", args.learning_rate]
        bertforge("train", *common, *train, "--output", str(work / f"{name}-0"),
                  "--num-train-steps", "1", "--num-warmup-steps", "1")  # fmt: skip
        bertforge("train", *common, *train, "--output", str(work / name), "--num-train-steps",
                  str(args.steps), "--eval-every", str(args.steps // 4))  # fmt: skip
        # The 1-step run's lr is 0 (warm-up): its evaluation is the starting point.
        results[name] = [{**evals(work / f"{name}-0")[-1], "step": 0}, *evals(work / name)]
    print(f"{'step':>6} {'transfer: MLM loss':>19} {'acc':>7} {'scratch: MLM loss':>18} {'acc':>7}")
    for a, b in zip(results["transfer"], results["scratch"], strict=True):
        print(f"{a['step']:>6} {a['masked_lm_loss']:>19.4f} {a['masked_lm_accuracy']:>7.2%} "
              f"{b['masked_lm_loss']:>18.4f} {b['masked_lm_accuracy']:>7.2%}")  # fmt: skip
    summary = {
        "model_size": args.model_size,
        "base_steps": args.base_steps,
        "steps": args.steps,
        **{
            name: [(r["step"], r["masked_lm_loss"], r["masked_lm_accuracy"]) for r in rows]
            for name, rows in results.items()
        },
        "seconds": round(time.perf_counter() - start),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main_()
