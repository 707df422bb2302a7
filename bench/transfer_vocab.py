"""Does a checkpoint help a model with another vocabulary? `bertforge train --transfer-vocab`.

A model is pretrained on general English (GCIDE dictionary text) with its own vocabulary. A
new domain (the King James Bible) gets a vocabulary of its own, and its data is made with it.
Two runs train on that data side by side, same steps, learning rate and seed:
- transfer: from the general model, `--init-checkpoint ... --transfer-vocab` (tokens both
  vocabularies have keep their rows, the others start from the mean of their pieces' rows);
- random rows: the same, but the tokens the general vocabulary lacks start from fresh random
  rows (as a new model's) instead of their pieces' mean: what the mean is worth;
- scratch: the same model size from a random start (what a new vocabulary meant until now).
All predict the same tokens, so their held-out masked-LM losses compare directly. The loss
before the first step and at each evaluation is printed; the last line is one JSON object.

    python bench/transfer_vocab.py --general bench/work/gcide4.txt
(`python bench/corpora.py gcide --output bench/work/gcide4.txt --max-mb 4` builds it.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from common import QUIET, SHAPE, bertforge, eval_records, general_model_flags, pretrain_general
from safetensors.torch import save_file

from bertforge.checkpoint import read_init_checkpoint, transfer_vocab
from bertforge.cli import demo_corpus
from bertforge.model import to_hf
from bertforge.tokenization import read_vocab_file


def random_new_rows(base: Path, vocab: Path, out: Path) -> None:
    """The transferred start with fresh random rows (and zero bias) for every token the
    base vocabulary lacks, saved as a Hugging Face directory with the new vocabulary."""
    init = read_init_checkpoint(str(base))
    assert init.vocab_file is not None
    tokens = read_vocab_file(vocab / "vocab.txt")
    c = dataclasses.replace(init.config, vocab_size=len(tokens))
    theirs = read_vocab_file(init.vocab_file)
    weights, t = transfer_vocab(init.weights, tokens, theirs, c.padded_vocab_size)
    new = t.pieces + t.unknown
    std = c.initializer_range
    fresh = torch.empty(len(new), c.hidden_size)
    torch.nn.init.trunc_normal_(fresh, std=std, a=-2 * std, b=2 * std,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    weights["word_embeddings.weight"][new] = fresh
    weights["mlm_bias"][new] = 0.0
    out.mkdir(parents=True)
    save_file({k: v.clone().contiguous() for k, v in to_hf(weights, c)}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({**c.to_dict(), "model_type": "bert"}))
    shutil.copy(vocab / "vocab.txt", out / "vocab.txt")


def main_() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    general_model_flags(p, "bench/work/transfer_vocab")
    p.add_argument("--domain-vocab-size", type=int, default=4000)
    p.add_argument("--learning-rate", default="5e-4")
    args = p.parse_args()
    work = Path(args.work)
    start = time.perf_counter()
    pretrain_general(args, work)
    domain = str(demo_corpus())
    bertforge("vocab", "--input", domain, "--output", str(work / "domain-vocab"),
              "--vocab-size", str(args.domain_vocab_size), QUIET)  # fmt: skip
    bertforge("data", "--input", domain, "--vocab", str(work / "domain-vocab"),
              "--output", str(work / "domain"), *SHAPE, QUIET)  # fmt: skip
    random_new_rows(work / "base", work / "domain-vocab", work / "start-random-rows")
    runs = {
        "transfer": ["--init-checkpoint", str(work / "base"), "--transfer-vocab"],
        "random rows": ["--init-checkpoint", str(work / "start-random-rows")],
        "scratch": ["--model-size", args.model_size],
    }
    results = {}
    for name, how in runs.items():
        common = ["--data", str(work / "domain"), *how, QUIET]
        train = ["--train-batch-size", str(args.batch_size), "--learning-rate", args.learning_rate]
        run = work / name.replace(" ", "-")
        bertforge("train", *common, *train, "--output", f"{run}-0",
                  "--num-train-steps", "1", "--num-warmup-steps", "1")  # fmt: skip
        bertforge("train", *common, *train, "--output", str(run), "--num-train-steps",
                  str(args.steps), "--eval-every", str(args.steps // 4))  # fmt: skip
        # The 1-step run's lr is 0 (warm-up): its evaluation is the starting point.
        results[name] = [{**eval_records(Path(f"{run}-0"))[-1], "step": 0}, *eval_records(run)]
    print(f"{'step':>6}" + "".join(f" {name + ': MLM loss':>22} {'acc':>7}" for name in runs))
    for rows in zip(*results.values(), strict=True):
        print(
            f"{rows[0]['step']:>6}"
            + "".join(
                f" {r['masked_lm_loss']:>22.4f} {r['masked_lm_accuracy']:>7.2%}" for r in rows
            )
        )
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
