"""Runs Google's BERT scripts (bert-tensorflow 1.0.4) under TensorFlow for reference tests.

Executed with the reference virtual environment's Python (.venv-ref), never imported by
bertforge. Usage: python google_runner.py JOB.json, where the job lists tasks:
  {"tokenize": {"vocab": PATH, "do_lower_case": bool, "input": PATH, "output": PATH}}
  {"create": {... create_pretraining_data's flags ..., "output": PATH}}
  {"parse": {"inputs": [PATH, ...], "max_seq_length": N, "max_predictions_per_seq": N,
             "output": PATH}}
"parse" reads TFRecords the way run_pretraining.py's input pipeline does and writes one JSON
object per record. create and parse define the same absl flags, so one job holds only one kind.
Token ids are written one JSON list per input line (lines split on b"\\n", decoded the way
Google's convert_to_unicode does).
"""

import json
import sys

import tensorflow.compat.v1 as tf

sys.modules["tensorflow"] = tf  # Google's scripts `import tensorflow as tf` and use TF1 APIs
tf.flags.FLAGS([sys.argv[0]])  # tokenization.py reads the absl flag preserve_unused_tokens

import random  # noqa: E402
import types  # noqa: E402

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


def create(
    vocab: str,
    do_lower_case: bool,
    input: str,
    output: str,
    max_seq_length: int,
    max_predictions_per_seq: int,
    masked_lm_prob: float,
    short_seq_prob: float,
    dupe_factor: int,
    random_seed: int,
) -> None:
    """Google's create_pretraining_data main(), minus flags."""
    from bert import create_pretraining_data as cpd

    # TF1's GFile returned bytes, which convert_to_unicode decodes dropping invalid UTF-8;
    # TF2's text mode decodes strictly and would crash on broken text. Restore TF1 behaviour.
    cpd.tf.gfile.GFile = lambda path, mode="r": open(path, "rb" if mode == "r" else mode)  # noqa: SIM115
    tokenizer = tokenization.FullTokenizer(vocab_file=vocab, do_lower_case=do_lower_case)
    instances = cpd.create_training_instances(
        [input],
        tokenizer,
        max_seq_length,
        dupe_factor,
        short_seq_prob,
        masked_lm_prob,
        max_predictions_per_seq,
        random.Random(random_seed),
    )
    cpd.write_instance_to_example_files(
        instances, tokenizer, max_seq_length, max_predictions_per_seq, [output]
    )


def parse(inputs: list, max_seq_length: int, max_predictions_per_seq: int, output: str) -> None:
    """run_pretraining.py's decoding: its feature spec (input_fn_builder) and _decode_record."""
    # modeling.py imports tf.contrib (gone in TF2) for layer_norm only; decoding never uses it.
    sys.modules["tensorflow.contrib"] = types.SimpleNamespace(layers=None)  # type: ignore
    from bert import run_pretraining as rp

    name_to_features = {  # verbatim from run_pretraining.input_fn_builder
        "input_ids": tf.FixedLenFeature([max_seq_length], tf.int64),
        "input_mask": tf.FixedLenFeature([max_seq_length], tf.int64),
        "segment_ids": tf.FixedLenFeature([max_seq_length], tf.int64),
        "masked_lm_positions": tf.FixedLenFeature([max_predictions_per_seq], tf.int64),
        "masked_lm_ids": tf.FixedLenFeature([max_predictions_per_seq], tf.int64),
        "masked_lm_weights": tf.FixedLenFeature([max_predictions_per_seq], tf.float32),
        "next_sentence_labels": tf.FixedLenFeature([1], tf.int64),
    }
    tf.enable_eager_execution()
    with open(output, "w", encoding="utf-8") as out:
        for record in tf.data.TFRecordDataset(inputs):
            example = rp._decode_record(record, name_to_features)
            out.write(json.dumps({k: v.numpy().tolist() for k, v in example.items()}) + "\n")


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        job = json.load(f)
    for task in job["tasks"]:
        ((name, args),) = task.items()
        {"tokenize": tokenize, "create": create, "parse": parse}[name](**args)


if __name__ == "__main__":
    main()
