"""Runs Google's BERT scripts (bert-tensorflow 1.0.4) under TensorFlow for reference tests.

Executed with the reference virtual environment's Python (.venv-ref), never imported by
bertforge. Usage: python google_runner.py JOB.json, where the job lists tasks:
  {"tokenize": {"vocab": PATH, "do_lower_case": bool, "input": PATH, "output": PATH}}
Token ids are written one JSON list per input line (lines split on b"\\n", decoded the way
Google's convert_to_unicode does).
"""

import json
import sys

import tensorflow.compat.v1 as tf

sys.modules["tensorflow"] = tf  # Google's scripts `import tensorflow as tf` and use TF1 APIs
tf.flags.FLAGS([sys.argv[0]])  # tokenization.py reads the absl flag preserve_unused_tokens

from bert import tokenization  # noqa: E402


def tokenize(vocab: str, do_lower_case: bool, input: str, output: str) -> None:
    tokenizer = tokenization.FullTokenizer(vocab_file=vocab, do_lower_case=do_lower_case)
    with open(input, "rb") as f:
        lines = f.read().split(b"\n")
    with open(output, "w", encoding="utf-8") as out:
        for raw in lines:
            text = tokenization.convert_to_unicode(raw)
            ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))
            out.write(json.dumps(ids) + "\n")


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        job = json.load(f)
    for task in job["tasks"]:
        ((name, args),) = task.items()
        {"tokenize": tokenize}[name](**args)


if __name__ == "__main__":
    main()
