"""Runs Google's BERT scripts (bert-tensorflow 1.0.4) under TensorFlow for reference tests.

Executed with the reference virtual environment's Python (.venv-ref), never imported by
bertforge. Usage: python google_runner.py JOB.json, where the job lists tasks:
  {"tokenize": {"vocab": PATH, "do_lower_case": bool, "input": PATH, "output": PATH}}
  {"basic": {"do_lower_case": bool, "input": PATH, "output": PATH}} (BasicTokenizer's words)
  {"create": {... create_pretraining_data's flags ..., "output": PATH}}
  {"parse": {"inputs": [PATH, ...], "max_seq_length": N, "max_predictions_per_seq": N,
             "output": PATH}}
"checkpoint" builds Google's BertModel with run_pretraining's heads at a given config, sets
random weights, saves a TF checkpoint with Saver and writes the weights and log-probabilities
for given inputs to an .npz file.
"train" runs run_pretraining's training step with Google's optimizer and saves checkpoints
as its Estimator does.
"restore" builds the same graph, restores every variable from a given checkpoint (as
Google's fine-tuning scripts' --init_checkpoint does) and writes the log-probabilities.
"parse" reads TFRecords the way run_pretraining.py's input pipeline does and writes one JSON
object per record. create and parse define the same absl flags, so one job holds only one kind.
Token ids are written one JSON list per input line (lines split on b"\\n", decoded the way
Google's convert_to_unicode does).
"""

import json
import os
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


def basic(do_lower_case: bool, input: str, output: str) -> None:
    tokenizer = tokenization.BasicTokenizer(do_lower_case=do_lower_case)
    with open(input, "rb") as f:
        lines = f.read().split(b"\n")
    with open(output, "w", encoding="utf-8") as out:
        for raw in lines:
            out.write(json.dumps(tokenizer.tokenize(tokenization.convert_to_unicode(raw))) + "\n")


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


def _layer_norm(inputs, begin_norm_axis=-1, begin_params_axis=-1, scope=None):
    """tf.contrib.layers.layer_norm as modeling.py calls it (contrib is gone in TF2): the same
    variable names (SCOPE/beta, SCOPE/gamma) and epsilon (1e-12)."""
    with tf.variable_scope(scope, default_name="LayerNorm"):
        dim = inputs.shape[-1]
        beta = tf.get_variable("beta", [dim], initializer=tf.zeros_initializer())
        gamma = tf.get_variable("gamma", [dim], initializer=tf.ones_initializer())
        mean, variance = tf.nn.moments(inputs, [-1], keepdims=True)
        return tf.nn.batch_normalization(inputs, mean, variance, beta, gamma, 1e-12)


def _dense(inputs, units, activation=None, name=None, kernel_initializer=None):
    """tf.layers.dense for the 2-D inputs modeling.py gives it (Keras 3 removed tf.layers):
    the same variable names (NAME/kernel [in, out], NAME/bias)."""
    with tf.variable_scope(name, default_name="dense"):
        kernel = tf.get_variable("kernel", [inputs.shape[-1], units],
                                 initializer=kernel_initializer)  # fmt: skip
        bias = tf.get_variable("bias", [units], initializer=tf.zeros_initializer())
        out = tf.matmul(inputs, kernel) + bias
        return activation(out) if activation else out


def _pretraining_graph(config: dict, input_ids: list, input_mask: list, segment_ids: list,
                       positions: list, labels: list | None = None,
                       next_sentence: list | None = None):  # fmt: skip
    """Google's BertModel with run_pretraining's heads, in the current graph: the masked-LM
    and next-sentence log-probabilities, and run_pretraining's loss for `labels` (the token
    at each position) and `next_sentence` (0 or 1 per instance) when given."""
    contrib = types.SimpleNamespace(layers=types.SimpleNamespace(layer_norm=_layer_norm))
    sys.modules["tensorflow.contrib"] = contrib  # type: ignore
    from bert import modeling
    from bert import run_pretraining as rp

    class TF1:  # tensorflow.compat.v1 with contrib and tf.layers put back
        def __getattr__(self, name):
            if name == "contrib":
                return contrib
            if name == "layers":
                return types.SimpleNamespace(dense=_dense)
            return getattr(tf, name)

    modeling.tf = rp.tf = TF1()

    bert_config = modeling.BertConfig.from_dict(config)
    model = modeling.BertModel(
        config=bert_config, is_training=False, input_ids=tf.constant(input_ids),
        input_mask=tf.constant(input_mask), token_type_ids=tf.constant(segment_ids),
        use_one_hot_embeddings=False,
    )  # fmt: skip
    pos = tf.constant(positions)
    label_ids = tf.constant(labels) if labels is not None else tf.zeros_like(pos)
    mlm_loss, _, mlm = rp.get_masked_lm_output(
        bert_config, model.get_sequence_output(), model.get_embedding_table(), pos,
        label_ids, tf.ones_like(pos, dtype=tf.float32),
    )  # fmt: skip
    nsp_labels = next_sentence if next_sentence is not None else [0] * len(input_ids)
    nsp_loss, _, nsp = rp.get_next_sentence_output(
        bert_config, model.get_pooled_output(), tf.constant(nsp_labels, tf.int32)
    )
    if labels is None:
        return mlm, nsp
    return mlm_loss + nsp_loss


def _random_weights(sess, seed: int) -> None:
    """Every float weight of the graph drawn at random (LayerNorm scales around 1); optimizer
    slots and the step keep their initial zeros."""
    import numpy as np

    rng = np.random.RandomState(seed)
    for v in tf.global_variables():
        if v.dtype.base_dtype == tf.float32 and "/adam_" not in v.name:
            value = rng.normal(0, 0.05, v.shape.as_list())
            if v.name.endswith("gamma:0"):
                value += 1.0
            v.load(value.astype(np.float32), sess)


def checkpoint(directory: str, config: dict, input_ids: list, input_mask: list,
               segment_ids: list, positions: list, output: str) -> None:  # fmt: skip
    import numpy as np

    with tf.Graph().as_default():
        mlm, nsp = _pretraining_graph(config, input_ids, input_mask, segment_ids, positions)
        # an optimizer slot and the step counter, as in a real pretraining checkpoint
        tf.get_variable("bert/embeddings/word_embeddings/adam_m",
                        [config["vocab_size"], config["hidden_size"]])  # fmt: skip
        tf.train.get_or_create_global_step()
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            for v in tf.global_variables():  # the Adam slot made above: random too
                if "/adam_" in v.name:
                    value = np.random.RandomState(1).normal(0, 0.05, v.shape.as_list())
                    v.load(value.astype(np.float32), sess)
            _random_weights(sess, 0)
            saver = tf.train.Saver()
            saver.save(sess, directory + "/bert_model.ckpt")
            # as run_pretraining.py's --output_dir: model.ckpt-STEP and the `checkpoint` file
            os.makedirs(directory + "/run", exist_ok=True)
            for step in (9, 10):
                saver.save(sess, directory + "/run/model.ckpt", global_step=step)
            values = {v.name[:-2]: sess.run(v) for v in tf.global_variables()}
            mlm_out, nsp_out = sess.run([mlm, nsp])
    np.savez(output, mlm_log_probs=mlm_out, nsp_log_probs=nsp_out,
             **{"var:" + k: v for k, v in values.items()})  # fmt: skip


def train(directory: str, config: dict, input_ids: list, input_mask: list, segment_ids: list,
          positions: list, labels: list, next_sentence: list, steps: int, learning_rate: float,
          num_train_steps: int, num_warmup_steps: int, output: str) -> None:  # fmt: skip
    """run_pretraining.py's training step (its loss, optimization.create_optimizer: clipping,
    AdamWeightDecayOptimizer, the warmup and decay schedule) on one batch from random
    weights: `steps` steps, a checkpoint saved as its Estimator does (DIRECTORY/model.ckpt-N
    and the `checkpoint` file), then one step more, whose weights go to `output`."""
    import numpy as np
    from bert import optimization

    with tf.Graph().as_default():
        loss = _pretraining_graph(config, input_ids, input_mask, segment_ids, positions,
                                  labels, next_sentence)  # fmt: skip
        train_op = optimization.create_optimizer(
            loss, learning_rate, num_train_steps, num_warmup_steps, False
        )
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            _random_weights(sess, 0)
            for _ in range(steps):
                sess.run(train_op)
            tf.train.Saver().save(sess, directory + "/model.ckpt", global_step=steps)
            sess.run(train_op)
            after = {v.name[:-2]: sess.run(v) for v in tf.trainable_variables()}
    np.savez(output, **after)


def restore(checkpoint: str, config: dict, input_ids: list, input_mask: list,
            segment_ids: list, positions: list, output: str) -> None:  # fmt: skip
    """Google's model restored from a checkpoint (every variable of its graph must be there,
    as run_classifier.py's init needs): its log-probabilities."""
    import numpy as np

    with tf.Graph().as_default():
        mlm, nsp = _pretraining_graph(config, input_ids, input_mask, segment_ids, positions)
        with tf.Session() as sess:
            tf.train.Saver().restore(sess, checkpoint)
            mlm_out, nsp_out = sess.run([mlm, nsp])
    np.savez(output, mlm_log_probs=mlm_out, nsp_log_probs=nsp_out)


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        job = json.load(f)
    for task in job["tasks"]:
        ((name, args),) = task.items()
        {
            "tokenize": tokenize,
            "basic": basic,
            "create": create,
            "parse": parse,
            "checkpoint": checkpoint,
            "train": train,
            "restore": restore,
        }[name](**args)


if __name__ == "__main__":
    main()
