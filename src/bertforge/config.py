"""One frozen dataclass per stage; the CLI flags and the TOML keys are generated from them.

A setting is declared once, as a dataclass field with a docstring under it; that docstring is
the `--help` text. Flags are the field name with dashes (`--vocab-size`); Google's underscored
spelling (`--vocab_size`) and any aliases in the field metadata are accepted too, and booleans
also take absl's forms (`--do_lower_case=False`, `--nodo_lower_case`) so old commands paste in.
`--config FILE.toml` sets fields per stage section (`[vocab]`, `[data]`, ...); flags override
the file. Unknown keys and flags are errors that list the valid names.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import re
import sys
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from bertforge.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

C = TypeVar("C")
TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}
NEGATIVE_VALUE = re.compile(r"^-[\d.]")
GOOGLE_MAX_PREDICTIONS = 20  # create_pretraining_data.py's --max_predictions_per_seq
UNIT_MB = 4.0  # `bertforge data`'s default work unit (MB of text; a shard per unit)


def option(
    default: Any = MISSING,
    *,
    aliases: Sequence[str] = (),
    true_flags: Sequence[str] = (),
    false_flags: Sequence[str] = (),
    split_commas: bool = False,
    positional: bool = False,
    comma_list: bool = False,
) -> Any:
    """A config field. aliases: extra flag spellings; true/false_flags: extra boolean switches;
    split_commas: a list field that also accepts Google's comma-separated form; positional: also
    given without a flag (`bertforge fill-mask "text"`); comma_list: a one-string field that
    names several files by commas, whose arguments are joined so (`train a.tfrecord b.tfrecord`,
    as the shell expands an unquoted glob)."""
    metadata = {
        "aliases": tuple(aliases),
        "true_flags": tuple(true_flags),
        "false_flags": tuple(false_flags),
        "split_commas": split_commas,
        "positional": positional,
        "comma_list": comma_list,
    }
    return field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------- stage configs


@dataclass(frozen=True, kw_only=True)
class CorpusInput:
    """Settings of every stage that reads a raw corpus."""

    input: tuple[str, ...] = option(aliases=("--input_file",), split_commas=True, positional=True)
    """Corpus files, globs, directories (read recursively, sorted), .gz/.bz2/.xz/.zst files, -
    for stdin, or a pipe. Google's format: one sentence per line, a blank line between
    documents. JSON Lines, Parquet and Arrow files: one document per record (see --text-field)."""
    strict_utf8: bool = False
    """Stop at the first invalid UTF-8 byte (naming file:line:offset) instead of dropping bad
    bytes and reporting how many lines had them."""
    text_field: str = "text"
    """The field (column) that holds the text of a record. A file whose first line is a JSON
    object is read as JSON Lines (Hugging Face datasets, OSCAR, WikiExtractor --json), and a
    Parquet or Arrow file (the Hub's; datasets' save_to_disk and cache) by rows, with pyarrow
    (pip install 'bertforge[parquet]'): each record is one document, its text's lines the
    sentences."""


@dataclass(frozen=True, kw_only=True)
class VocabConfig(CorpusInput):
    """`bertforge vocab`: train a WordPiece vocabulary (vocab.txt + Hugging Face tokenizer)."""

    output: str = option(aliases=("--output_dir",))
    """Directory for vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json
    and manifest.json."""
    vocab_size: int = 30522
    """Exact number of lines of vocab.txt, special tokens and [unused] slots included."""
    do_lower_case: bool = option(True, true_flags=("--lowercase",), false_flags=("--cased",))
    """Lowercase the text (--lowercase) or keep case (--cased); recorded for every later stage."""
    strip_accents: bool | None = None
    """Strip accents (NFD, drop combining marks). Default: like Google, only when lowercasing.
    --no-strip-accents keeps Turkish ç ş ğ ö ü in a lowercased model."""
    algorithm: Literal["wordpiece", "sentencepiece"] = "wordpiece"
    """wordpiece: Hugging Face's WordPiece trainer. sentencepiece: SentencePiece (see
    --sentencepiece-model) on BERT-pre-tokenized text, converted to WordPiece format."""
    sentencepiece_model: Literal["bpe", "unigram"] = "bpe"
    """SentencePiece model type, with --algorithm sentencepiece."""
    min_frequency: int = 2
    """Pieces must occur at least this often in the training sample (wordpiece; scaled like the
    word counts the trainer is fed)."""
    limit_alphabet: int = 1000
    """Keep at most this many distinct characters (the most frequent); rarer ones become [UNK]."""
    num_unused: int = 99
    """[unusedN] slots reserved after [PAD] (Google's layout: 99, so [UNK] is id 100); `bertforge
    vocab extend` fills them with new words later, keeping every other id."""
    max_sentences: int = 300_000
    """Train on at most this many sentences, sampled evenly over the corpus; bounds time and
    memory on large corpora (SentencePiece samples the same way). Their words are counted,
    and the trainer sees the 80,000 most frequent with their proportions."""
    heldout_sentences: int = 5_000
    """Sentences held out of training (whole documents, spread over the corpus, at most 5% of
    them: fewer on a small corpus; the summary gives the number) to measure the [UNK] rate,
    pieces per word and vocabulary use."""
    seed: int = 12345
    """Seed of the sentence sampling; same corpus + settings + seed give the same vocab.txt."""
    overwrite: bool = False
    """Replace an output directory that holds something other than a bertforge vocabulary."""
    progress: bool = True
    """Show a progress bar on a terminal."""

    def __post_init__(self) -> None:
        require(len(self.input) > 0, "--input", "give at least one corpus file")
        require(self.vocab_size >= 100, "--vocab-size", "must be at least 100")
        require(self.num_unused >= 0, "--num-unused", "must be 0 or more")
        require(self.min_frequency >= 1, "--min-frequency", "must be at least 1")
        require(self.limit_alphabet >= 1, "--limit-alphabet", "must be at least 1")
        require(self.max_sentences >= 1, "--max-sentences", "must be at least 1")
        require(self.heldout_sentences >= 0, "--heldout-sentences", "must be 0 or more")


@dataclass(frozen=True, kw_only=True)
class VocabExtendConfig(CorpusInput):
    """`bertforge vocab extend`: write frequent words of a corpus over the [unusedN] lines of a
    vocabulary, every other id kept, for continued pretraining from a checkpoint that has it.

    The words chosen are those the vocabulary splits into the most pieces in all (occurrences
    x (pieces - 1), counted in a sample of the corpus), plus any --words you list; the new
    vocabulary's pieces per word on held-out text are printed before and after. Training with
    --init-checkpoint then starts each new word's embedding (and output bias) as the mean of
    its pieces' in the checkpoint."""

    vocab: str = option(aliases=("--vocab_file",))
    """The vocabulary to extend: a checkpoint's directory (Google's, Hugging Face's, a bertforge
    vocab) or its vocab.txt."""
    output: str = option(aliases=("--output_dir",))
    """Directory for the extended vocab.txt, tokenizer files and manifest.json (not --vocab's)."""
    do_lower_case: bool | None = option(None, true_flags=("--lowercase",), false_flags=("--cased",))
    """Casing of a vocab.txt that does not record it (Google's checkpoints); read from the
    manifest or tokenizer_config.json beside it otherwise."""
    words: str | None = None
    """A file of words to add first, one per line (blank lines and lines starting with # are
    skipped), whatever their count in the corpus."""
    max_words: int | None = None
    """Add at most this many words (default: as many as there are [unusedN] lines)."""
    min_count: int = 20
    """Corpus words must occur at least this often in the sample to be added (a word seen
    rarely gets too little training for its new embedding)."""
    max_sentences: int = 300_000
    """Count the words of at most this many sentences, sampled evenly over the corpus."""
    heldout_sentences: int = 5_000
    """Sentences held out of the count (whole documents, at most 5% of them) on which pieces
    per word are measured before and after."""
    seed: int = 12345
    """Seed of the sampling; the same corpus, vocabulary and settings give the same vocab.txt."""
    overwrite: bool = False
    """Replace an output directory that holds something other than a bertforge vocabulary."""
    progress: bool = True
    """Show a progress bar on a terminal."""

    def __post_init__(self) -> None:
        require(len(self.input) > 0, "--input", "give at least one corpus file")
        require(self.max_words is None or self.max_words >= 0, "--max-words", "must be 0 or more")
        require(self.min_count >= 1, "--min-count", "must be at least 1")
        require(self.max_sentences >= 1, "--max-sentences", "must be at least 1")
        require(self.heldout_sentences >= 0, "--heldout-sentences", "must be 0 or more")


@dataclass(frozen=True, kw_only=True)
class DataConfig(CorpusInput):
    """`bertforge data`: turn a corpus into pretraining instances (native shards or TFRecords).

    Default mode: streaming and parallel, in flat memory, output byte-identical for any
    --workers. --google-compatible: Google's create_pretraining_data.py record for record (one
    process, every instance in memory, as Google's script)."""

    vocab: str = option(aliases=("--vocab_file",))
    """A `bertforge vocab` directory, or a vocab.txt (then give --do-lower-case or
    --no-do-lower-case)."""
    output: str = option(aliases=("--output_dir",))
    """Directory for the shards and manifest.json."""
    do_lower_case: bool | None = option(None, true_flags=("--lowercase",), false_flags=("--cased",))
    """Casing of a bare vocab.txt; read from the vocab directory's manifest otherwise."""
    max_seq_length: int = 128
    """Tokens per instance, [CLS] and [SEP]s included; the model trains at this length."""
    max_predictions_per_seq: int | None = None
    """Most masked tokens per instance. Default: Google's 20, raised to max_seq_length x
    masked_lm_prob where that is more (77 at 512), so every instance is masked as asked;
    with --google-compatible, 20 as Google's script."""
    masked_lm_prob: float = 0.15
    """Share of tokens masked."""
    short_seq_prob: float = 0.1
    """Share of instances given a random shorter target length."""
    dupe_factor: int | None = None
    """Passes over the corpus, each with other segment pairs and masks. Default: 10 (Google's)
    with static masks; 1 for native shards, whose masks are drawn anew at training time."""
    random_seed: int = 12345
    """Seed of everything random; the same seed, corpus and settings give the same bytes."""
    do_whole_word_mask: bool = False
    """Mask all pieces of a word together."""
    split_sentences: bool = False
    """Split each line into sentences first, at sentence-ending punctuation before a capital
    (conservative, language-agnostic rules): for a corpus with a paragraph or a whole document
    per line, whose instances would otherwise keep only each line's start."""
    format: Literal["native", "tfrecord"] | None = None
    """native (default): memory-mappable shards holding instances before masking (dynamic
    masking in training). tfrecord: Google's tf.train.Example files, static masks."""
    static_masking: bool = False
    """Store Google-style fixed masks in native shards too."""
    google_compatible: bool = False
    """Reproduce Google's script exactly (its random call order, one global shuffle, all
    instances in memory like Google's: needs about 80x the corpus size in RAM). Writes
    data.tfrecord."""
    workers: int = 0
    """Worker processes (0: one per CPU this process may use: its affinity mask, capped by a
    cgroup CPU quota). The output does not depend on it."""
    unit_mb: float = UNIT_MB
    """Size of a work unit (MB of text, cut at document boundaries); one shard per unit.
    Random next segments and the shuffle stay within a unit."""
    overwrite: bool = False
    """Start over, replacing what the output directory holds. Without it, a rerun of the same
    command resumes (or keeps finished output), and other settings are refused."""
    progress: bool = True
    """Show a progress bar on a terminal."""

    def __post_init__(self) -> None:
        require(len(self.input) > 0, "--input", "give at least one corpus file")
        require(self.max_seq_length >= 5, "--max-seq-length",
                "must be at least 5 ([CLS] a [SEP] b [SEP])")  # fmt: skip
        require(self.max_seq_length <= 65535, "--max-seq-length", "must be at most 65535")
        require(1 <= self.resolved_max_predictions <= self.max_seq_length - 3,
                "--max-predictions-per-seq",
                f"must be between 1 and max_seq_length - 3 = {self.max_seq_length - 3} "
                "(only that many tokens can be masked)")  # fmt: skip
        require(
            0 < self.masked_lm_prob < 1,
            "--masked-lm-prob",
            "must be above 0 and below 1 (0.15 in BERT)",
        )
        require(0 <= self.short_seq_prob <= 1, "--short-seq-prob", "must be between 0 and 1")
        require(self.dupe_factor is None or self.dupe_factor >= 1, "--dupe-factor",
                "must be at least 1")  # fmt: skip
        require(self.random_seed >= 0, "--random-seed", "must be 0 or more")
        require(self.workers >= 0, "--workers", "must be 0 (every usable CPU) or more")
        require(self.unit_mb > 0, "--unit-mb", "must be positive")
        require(not (self.google_compatible and self.format == "native"), "--format",
                "--google-compatible writes Google's TFRecords; drop --format native")  # fmt: skip
        require(not (self.google_compatible and self.workers > 1), "--workers",
                "--google-compatible runs in one process, as Google's script does; drop one "
                "of the two")  # fmt: skip
        require(not (self.google_compatible and self.unit_mb != UNIT_MB), "--unit-mb",
                "--google-compatible reads the corpus as one unit (one shuffle over all of "
                "it), as Google's script does; drop one of the two")  # fmt: skip
        require(not (self.google_compatible and self.text_field != "text"), "--text-field",
                "--google-compatible reads every file as text, as Google's script does; drop "
                "one of the two")  # fmt: skip

    @property
    def resolved_format(self) -> str:
        return self.format or ("tfrecord" if self.google_compatible else "native")

    @property
    def static(self) -> bool:
        """Masks are fixed at data time (TFRecords always; native with --static-masking)."""
        return self.resolved_format == "tfrecord" or self.static_masking

    @property
    def resolved_max_predictions(self) -> int:
        """--max-predictions-per-seq as given, else GOOGLE_MAX_PREDICTIONS, raised to what
        --masked-lm-prob asks of a full-length instance (Google's rule: round(length x prob))
        outside --google-compatible. Google's README says to set it so by hand, in both
        scripts; here training reads it from the data."""
        if self.max_predictions_per_seq is not None:
            return self.max_predictions_per_seq
        if self.google_compatible:
            return GOOGLE_MAX_PREDICTIONS
        wanted = round(self.max_seq_length * self.masked_lm_prob)
        return min(max(GOOGLE_MAX_PREDICTIONS, wanted), self.max_seq_length - 3)

    @property
    def resolved_dupe_factor(self) -> int:
        if self.dupe_factor is not None:
            return self.dupe_factor
        return 10 if self.static else 1


# TrainConfig's speed options that `train --tune` times and chooses (tune.py), and the report
# names; each None ("auto") until chosen.
TUNABLE = (
    "compile",
    "packed",
    "fused_attention",
    "fused_ffn",
    "fused_gelu",
    "fused_norm",
    "split_qkv",
    "flat_optimizer",
    "cuda_graphs",
)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """`bertforge train`: pretrain BERT (masked LM + next sentence) on `bertforge data` output
    or Google's TFRecords, on a CPU, a GPU, or many under torchrun. Resumes by itself."""

    data: str = option(aliases=("--input_file",), positional=True, comma_list=True)
    """A `bertforge data` directory, or TFRecord files (comma lists and globs, as Google's
    --input_file), as an argument or --data."""
    output: str = option(aliases=("--output_dir",))
    """Directory for checkpoints, metrics.jsonl, eval_results.txt, bert_config.json, the vocab
    files, data_check.json and manifest.json. A directory with checkpoints is resumed from its
    latest."""
    model_size: Literal["tiny", "mini", "small", "medium", "base", "large"] | None = None
    """Google's sizes: tiny L2/H128, mini L4/H256, small L4/H512, medium L8/H512, base L12/H768,
    large L24/H1024 (default base, or the --init-checkpoint's size)."""
    bert_config: str | None = option(None, aliases=("--bert_config_file",))
    """Google's bert_config.json instead of --model-size; its vocab_size must be the data's."""
    dropout: float | None = None
    """Hidden and attention dropout of the model (default: the model's, Google's 0.1). 0 helps
    short runs of small models; it is saved in the exported config."""
    init_checkpoint: str | None = None
    """Start from these weights (optimizer fresh): a bertforge checkpoint or training
    directory, a Hugging Face BERT directory, or a Google TF checkpoint (bert_model.ckpt, or
    run_pretraining.py's output directory: its latest; give --bert-config with it)."""
    transfer_vocab: bool = False
    """With --init-checkpoint: train on data made with another vocabulary than the
    checkpoint's (one trained on your corpus, e.g. to leave multilingual BERT's). Tokens both
    vocabularies have keep their trained embeddings; each other token starts from the mean of
    those of the pieces the checkpoint's vocabulary splits it into ([UNK]'s where it has none)."""
    resume_google: str | None = None
    """Continue a run of Google's run_pretraining.py from its checkpoint (model.ckpt-N, or its
    output directory: the latest): the weights, Adam moments and global_step carry over, so the
    learning-rate schedule goes on where it was (data order, masks and dropout start afresh).
    Give the run's --bert-config, --num-train-steps and --num-warmup-steps (and --google-adam to
    update exactly as Google's optimizer). A rerun resumes from --output's checkpoints."""
    vocab: str | None = option(None, aliases=("--vocab_file",))
    """The vocabulary (directory or vocab.txt). Default: the data's (from its manifest), else
    the --init-checkpoint's vocab.txt; Google's TFRecords need one of them."""
    max_seq_length: int | None = None
    """Check only: must be the data's (it is read from the data)."""
    max_predictions_per_seq: int | None = None
    """Check only: must be the data's."""
    do_lower_case: bool | None = option(None, true_flags=("--lowercase",), false_flags=("--cased",))
    """Check only: must be the data's vocabulary casing."""
    train_batch_size: int = 256
    """Instances per optimizer step, over all processes and accumulation steps."""
    micro_batch_size: int | None = None
    """Instances per forward pass per process (default: all of the process's share). On a CUDA
    out-of-memory error it is halved and accumulation doubled, automatically (with several
    processes in a trial step before the first)."""
    learning_rate: float = 1e-4
    """Peak learning rate (Google: 1e-4 from scratch, 2e-5 continuing from a checkpoint)."""
    num_train_steps: int = 10000
    """Optimizer steps in all; the learning rate reaches 0 at the last."""
    num_warmup_steps: int | None = None
    """Steps of linear warmup (default: 1% of num_train_steps, at most 10000)."""
    optimizer: Literal["adamw", "lamb"] = "adamw"
    """adamw, or lamb for very large batches."""
    google_adam: bool = False
    """AdamW exactly as Google's AdamWeightDecayOptimizer: no bias correction."""
    flat_optimizer: bool | None = None
    """AdamW over one buffer per parameter group (weights, gradients and moments laid end to
    end): the update is one fused call per group instead of one per tensor, and gradients
    accumulate in place. The same updates and checkpoints as without it. Default: on with
    --cuda-graphs (which needs it), otherwise off unless --tune measures it faster
    (bench/optimizer_update.py, bench/train_throughput.py --flat-optimizer). AdamW only (not
    --optimizer lamb or --google-adam)."""
    loader: Literal["process", "thread"] = "process"
    """Where the batches of the next steps are made: a worker process (Linux; elsewhere a
    thread), whose Python does not share the trainer's GIL (a step whose host is its slower
    side, as a GPU step's is, ran 2.4 ms slower with a thread making BERT-base's batches
    beside it, 0.65 ms with the process, on 2 CPU cores: bench/loader_contention.py), or a
    thread of the trainer's. The same batches either way."""
    cuda_graphs: bool | None = None
    """Replay the compiled step's kernels as CUDA graphs (torch.compile's reduce-overhead
    mode), so the GPU does not wait for Python to launch them. Packed batches are rounded up
    by filler sequences to a few token counts (one graph each; about 1% more tokens, exact).
    CUDA only; implies --compile and --flat-optimizer (gradients added into its buffer,
    which a replay does not overwrite; --no-flat-optimizer is refused). Not yet run with
    several GPUs (DDP around a replay). Default: off, unless --tune measures it faster on
    this GPU, in a run of one process (bench/train_throughput.py --graphs)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not on LayerNorm and biases)."""
    adam_epsilon: float = 1e-6
    """Adam's epsilon (Google's 1e-6)."""
    max_grad_norm: float = 1.0
    """Clip gradients to this global norm (0: no clipping)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs that have it, fp16 with loss scaling on older ones; on a CPU bf16
    where it multiplies bf16 in hardware (Intel's AMX, AVX512-BF16: AMD's Zen 4), else fp32."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train (auto: CUDA when available)."""
    peak_tflops: float | None = None
    """The peak TFLOP/s of one device at the training precision (dense, no sparsity), for the
    MFU in the log where bertforge's table does not know it (it knows the H100, H200, A100,
    L40S and L4 in bf16/fp16); given, it is used instead of the table."""
    compile: bool | None = None
    """torch.compile the model and loss: faster steps on a GPU after a warm-up compile
    (default: on a GPU for runs of 10,000 steps or more, where the compile pays back; if
    compiling then fails, one process goes on uncompiled with a warning, several stop and say
    to rerun with --no-compile). On a CPU off unless asked: in bf16 the eager step measured
    faster, in fp32 the compiled one (1.05-1.5x on a Xeon). --no-compile never compiles."""
    packed: bool | None = None
    """Batches without padding: the loader packs each batch's real tokens back to back and
    attention runs per instance (flash varlen attention, with dropout, on CUDA). Exact.
    Default: up to max_seq_length 128 on a GPU that runs flash varlen attention (compute
    capability 8.0+, bf16/fp16): 2-4% faster there on an H200, 14% slower at 512, where
    cuDNN's padded attention is faster. Not on a CPU: a packed batch's token count differs
    every step, and a CPU pays for each new shape (new pages for the step's tensors; in bf16
    a new oneDNN kernel per matrix shape), so over a long run padded batches were the faster,
    1.08-1.20x for BERT-mini and BERT-small in fp32, 1.5-2.0x for BERT-mini in bf16
    (bench/RESULTS.md). --no-packed pads every batch."""
    fused_norm: bool | None = None
    """Each layer's output bias, dropout, residual add and LayerNorm as one Triton kernel each
    way (CUDA with Triton only): one Philox call per eight dropout decisions instead of one per
    element, the mask kept as bits, LayerNorm's and the bias's gradients in one pass. Default: off,
    unless --tune measures it faster than inductor's own fusion on this GPU
    (bench/train_throughput.py --fused-norm).
    Dropout draws differ from the unfused path's; the model and its weights are the same."""
    fused_gelu: bool | None = None
    """Each layer's feed-forward bias + GELU (erf form) as one Triton kernel each way (CUDA with
    Triton only): a branch-free erf (absolute error under 5e-7) where inductor's kernels are
    bound by libdevice's instructions, and the bias's gradient summed in the same pass.
    Default: off, unless --tune measures it faster on this GPU (bench/train_throughput.py
    --fused-gelu). For models whose hidden_act is gelu."""
    fused_ffn: bool | None = None
    """Each layer's feed-forward with GELU (erf form) in the epilogues of two Triton matmuls
    (CUDA with Triton only; hidden sizes a multiple of 64): the product into GELU writes both
    itself and GELU of it with the bias, and in the backward the product of the output's
    gradient with ffn_out's weight comes out as the gradient at GELU's input, with the bias's
    gradient summed. Three of the five passes over the [tokens, intermediate] tensors that
    GELU costs with --fused-gelu go (6.2 GB a step for BERT-base at seq 128, batch 256, by
    bench/kernel_census.py); the other matmuls stay cuBLAS's. Default: off, unless --tune measures
    it faster on this GPU (bench/train_throughput.py --fused-ffn).
    Takes over from --fused-gelu. For models whose hidden_act is gelu."""
    split_qkv: bool | None = None
    """q, k and v as three matmuls on the row blocks of each layer's qkv weight instead of
    one: their three gradients from the attention's backward then go into three matmuls as
    they are, where one matmul needed them concatenated first (a copy of 3.3 GB a step for
    BERT-base seq 128 batch 256, bench/kernel_census.py --split-qkv). The same weights and
    numbers. Default: off, unless --tune measures it faster (bench/train_throughput.py
    --split-qkv)."""
    fused_attention: bool | None = None
    """A packed batch's attention as bertforge's Triton kernels (CUDA with Triton, packed
    batches, max_seq_length up to 128, head size 16/32/64/128; with it a GPU packs batches by
    default, in fp32 too, where flash varlen would not run): a sequence's keys fit one
    program, so the softmax needs no running maximum and the backward no atomics; dropout
    decides from one Philox call per eight probabilities and keeps its decisions for the
    backward as bits (an eighth of a byte per probability: 75 MB a step for BERT-base at
    batch 256, seq 128). Default: off, unless --tune measures it faster than flash varlen attention
    on this GPU (bench/attention_kernel.py, bench/train_throughput.py --fused-attention).
    Dropout draws differ from flash's; the model and its weights are the same."""
    prune_last_layer: bool = True
    """The last layer computes only the rows the pretraining heads read: each instance's first
    token (next sentence) and its masked positions, 21 of 128 at seq 128, whose queries still
    attend to every token's keys and values. The same logits, losses and gradients as the
    whole layer, which computes every row and drops the rest. Without its q, output and
    feed-forward matmuls and attention at the other rows, a step skips about 6% of its model
    FLOPs for BERT-base at seq 128 (3% BERT-large, 13% BERT-mini;
    `BertConfig.pruned_flops_per_token`). MFU (in the log and bench/train_throughput.py) still
    counts the whole model's FLOPs, as its definition does. --no-prune-last-layer computes
    every row."""
    tune: bool | None = None
    """Before the first step, time the speed options left unset (--compile, --packed,
    --fused-attention, --fused-ffn or --fused-gelu, --fused-norm, --split-qkv,
    --flat-optimizer, --cuda-graphs) on this device with this model and batch, and train
    with the fastest: one option at a time on top of the best so far, kept if its step is
    at least 2% faster (in the median of three blocks of steps, and in its slowest), and
    the choice kept if it is still faster when it and the defaults are timed again. Each
    trial runs in a process of its own (a failed kernel, compile or out-of-memory costs that
    trial only) and first checks its gradients against the default step's; an option set on
    the command line is not tried. Takes a few minutes on a GPU (most trials compile); the
    choice is kept in a cache per device, model, batch and library versions
    (~/.cache/bertforge/tune, or $BERTFORGE_CACHE/tune), so a rerun or resume starts at
    once, and reported in OUTPUT/tune.json. Default: on a GPU for runs of 100,000 steps or
    more (--num-train-steps; a resumed one too, which finds the choice cached)."""
    save_checkpoints_steps: int = 1000
    """Save a checkpoint every N steps (and at the end, and on Ctrl-C)."""
    keep_checkpoints: int = 3
    """Checkpoints kept (the newest)."""
    do_train: bool = True
    """Train (--no-do-train with --do-eval only evaluates --init-checkpoint)."""
    do_eval: bool = True
    """Evaluate on the held-out split (every --eval-every steps and at the end)."""
    eval_every: int | None = None
    """Evaluate every N steps (default: at every checkpoint)."""
    eval_records: int | None = None
    """Held-out instances (the last ones of the data; default: 1%, at least 1, at most 10000).
    They are never trained on. 0: no held-out set and no evaluation."""
    eval_batch_size: int | None = None
    """Instances per evaluation forward pass (default: the micro-batch size)."""
    max_eval_steps: int | None = None
    """Evaluate on at most this many eval batches."""
    log_every: int = 50
    """Write a metrics.jsonl line and a progress line every N steps."""
    random_seed: int = 12345
    """Seed of the data order, the masks, dropout and initialization."""
    resume: str | None = None
    """Resume from this checkpoint instead of the output directory's latest."""
    overwrite: bool = False
    """Start over in an output directory that holds another run."""
    max_bad_steps: int = 5
    """Stop when this many steps in a row have a NaN/inf loss (each is skipped)."""
    progress: bool = True
    """Print progress lines."""

    def __post_init__(self) -> None:
        require(not (self.model_size and self.bert_config), "--bert-config",
                "give either --model-size or --bert-config, not both")  # fmt: skip
        for name in ("train_batch_size", "num_train_steps", "save_checkpoints_steps",
                     "keep_checkpoints", "log_every", "max_bad_steps"):  # fmt: skip
            require(getattr(self, name) >= 1, "--" + name.replace("_", "-"), "must be at least 1")
        for name in ("micro_batch_size", "eval_every", "eval_batch_size", "max_eval_steps"):
            value = getattr(self, name)
            require(value is None or value >= 1, "--" + name.replace("_", "-"),
                    "must be at least 1")  # fmt: skip
        require(self.eval_records is None or self.eval_records >= 0, "--eval-records",
                "must be 0 or more")  # fmt: skip
        require(self.do_train or self.eval_records != 0, "--eval-records",
                "0 leaves nothing to evaluate, and --no-do-train nothing to train")  # fmt: skip
        require(self.learning_rate > 0, "--learning-rate", "must be positive")
        require(self.weight_decay >= 0, "--weight-decay", "must be 0 or more (0.01 in BERT)")
        require(self.adam_epsilon > 0, "--adam-epsilon", "must be positive (1e-6 in BERT; "
                "0 divides by zero for a weight whose gradients are all 0)")  # fmt: skip
        require(self.max_grad_norm >= 0, "--max-grad-norm", "must be 0 (no clipping) or more")
        require(self.peak_tflops is None or self.peak_tflops > 0, "--peak-tflops",
                "must be positive (the peak in TFLOP/s, e.g. 989 for an H100 SXM)")  # fmt: skip
        require(self.dropout is None or 0 <= self.dropout < 1, "--dropout",
                "must be at least 0 and below 1")  # fmt: skip
        require(self.num_warmup_steps is None or self.num_warmup_steps >= 0,
                "--num-warmup-steps", "must be 0 or more")  # fmt: skip
        require(self.random_seed >= 0, "--random-seed", "must be 0 or more")
        require(self.do_train or self.do_eval, "--do-train", "nothing to do: no train, no eval")
        require(self.do_train or self.init_checkpoint is not None, "--init-checkpoint",
                "evaluation without training needs the weights to evaluate")  # fmt: skip
        require(not self.transfer_vocab or self.init_checkpoint is not None, "--transfer-vocab",
                "needs --init-checkpoint (the weights whose vocabulary it replaces)")  # fmt: skip
        require(not (self.resume_google and (self.init_checkpoint or self.resume)),
                "--resume-google", "not with --init-checkpoint or --resume")  # fmt: skip

    @property
    def warmup_steps(self) -> int:
        if self.num_warmup_steps is not None:
            return self.num_warmup_steps
        return min(10000, self.num_train_steps // 100)


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """`bertforge export`: write a model as a Hugging Face directory (transformers, flair).

    Reads a bertforge training directory (its latest checkpoint) or checkpoint file, a Hugging
    Face BERT directory, or a Google TF checkpoint (bert_model.ckpt with bert_config.json and
    vocab.txt beside it: the seed's TF-to-PyTorch conversion)."""

    checkpoint: str = option(aliases=("--init_checkpoint", "--tf_checkpoint_path"), positional=True)
    """A `bertforge train` directory or ckpt-*.pt file, a Hugging Face directory, or a Google TF
    checkpoint (prefix bert_model.ckpt, or a directory: the latest its `checkpoint` file
    names), as an argument or --checkpoint."""
    output: str = option(aliases=("--output_dir", "--pytorch_dump_path"))
    """Directory for config.json, model.safetensors, the tokenizer files and manifest.json."""
    vocab: str | None = option(None, aliases=("--vocab_file",))
    """The vocabulary (directory or vocab.txt). Default: the one beside the checkpoint."""
    do_lower_case: bool | None = option(None, true_flags=("--lowercase",), false_flags=("--cased",))
    """Casing of a bare vocab.txt (a Google checkpoint's); read from bertforge's files otherwise."""
    format: Literal["hf", "google"] = "hf"
    """hf: the Hugging Face files. google: also Google's bert_config.json and bert_model.ckpt
    (a TF checkpoint, for Google's run_classifier.py and the like)."""
    overwrite: bool = False
    """Replace an output directory that holds something other than a bertforge export."""


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """`bertforge embed`: vectors for each line of a text file (sentence) or each of its words
    (token), from any model bertforge can read (export, training directory, checkpoint)."""

    model: str
    """An exported model directory, a `bertforge train` directory or ckpt-*.pt, a Hugging Face
    BERT directory, or a Google TF checkpoint (its bare vocab.txt needs --cased/--lowercase)."""
    input: str = option(positional=True)
    """One text file (or .gz/.bz2/.xz/.zst, - for stdin, a pipe), as an argument or --input:
    one sentence or text per line; or JSON Lines (its first line a JSON object), Parquet or
    Arrow: one text per record, from --text-field."""
    text_field: str = "text"
    """The field (column) of a record that holds its text (its lines are joined by spaces)."""
    strict_utf8: bool = False
    """Stop at the first invalid UTF-8 byte (naming file:line:offset) instead of dropping bad
    bytes (the line keeps its row) and reporting how many lines had them."""
    output: str
    """FILE.npy or FILE.safetensors. Sentence level: one row per input line. Token level: one
    row per word, FILE's `offsets` (safetensors, or FILE.offsets.npy) give each line's first
    row, and FILE.words.txt lists the words of each line."""
    level: Literal["sentence", "token"] = "sentence"
    """sentence: one vector per line. token: one vector per word (as BERT's basic tokenizer
    splits words; a word's pieces are pooled by --pooling)."""
    layers: str = "-1"
    """Layers to use, comma-separated; -1 is the last, 0 the embedding layer (-1,-2,-3,-4: the
    last four). Write --layers=-1,-2 (with =) when the list starts with a minus."""
    combine: Literal["concat", "mean"] = "concat"
    """How several --layers become one vector: concatenated or averaged."""
    pooling: Literal["first", "mean", "cls"] | None = None
    """token level: first (default) or mean of a word's pieces. sentence level: mean (default,
    over the line's pieces) or cls (the [CLS] vector)."""
    batch_size: int = 32
    """Lines per forward pass."""
    max_length: int | None = None
    """Pieces per forward pass, [CLS] and [SEP] included (default: the longest sequence the
    model was trained on, its tokenizer's model_max_length; given, up to its positions, with
    a warning past the trained length, whose positions are untrained).
    Longer lines: token level cuts them into several passes at word boundaries; sentence
    level keeps the first pieces (and says how many lines were cut)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run the model (auto: CUDA when available)."""
    do_lower_case: bool | None = option(None, true_flags=("--lowercase",), false_flags=("--cased",))
    """Casing of a bare vocab.txt (a Google checkpoint's); read from bertforge's files otherwise."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs that have it, fp16 on older ones; on a CPU bf16 where it multiplies
    bf16 in hardware (Intel's AMX, AVX512-BF16: AMD's Zen 4), else fp32. bf16 ran 2x faster
    than fp32 on such a CPU, its vectors at a cosine of 0.99997 or more from fp32's
    (bench/embed.py); fp32 gives transformers' own vectors (to 1e-6)."""
    overwrite: bool = False
    """Replace an existing output file."""
    progress: bool = True
    """Show a progress bar on a terminal."""

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "--batch-size", "must be at least 1")
        require(self.max_length is None or self.max_length >= 3, "--max-length",
                "must be at least 3 ([CLS] piece [SEP])")  # fmt: skip
        require(Path(self.output).suffix in (".npy", ".safetensors"), "--output",
                f"{self.output} must end in .npy or .safetensors")  # fmt: skip
        allowed = ("first", "mean") if self.level == "token" else ("mean", "cls")
        require(self.pooling is None or self.pooling in allowed, "--pooling",
                f"with --level {self.level} use {' or '.join(allowed)}")  # fmt: skip
        self.layer_indices()

    def layer_indices(self) -> tuple[int, ...]:
        try:
            layers = tuple(int(x) for x in self.layers.split(",") if x.strip())
        except ValueError:
            layers = ()
        require(
            len(layers) > 0,
            "--layers",
            f"expected comma-separated layer numbers like -1,-2,-3,-4, got {self.layers!r}",
        )
        return layers

    @property
    def resolved_pooling(self) -> str:
        return self.pooling or ("first" if self.level == "token" else "mean")


@dataclass(frozen=True, kw_only=True)
class FillMaskConfig:
    """`bertforge fill-mask`: the model's top guesses for each [MASK] in a text (a quick check)."""

    text: tuple[str, ...] = option(positional=True)
    """Texts with [MASK] in them."""
    model: str
    """An exported model directory, a `bertforge train` directory or ckpt-*.pt, a Hugging Face
    BERT directory, or a Google TF checkpoint (its bare vocab.txt needs --cased/--lowercase)."""
    top_k: int = 5
    """Guesses shown per [MASK]."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run the model (auto: CUDA when available)."""
    do_lower_case: bool | None = option(None, true_flags=("--lowercase",), false_flags=("--cased",))
    """Casing of a bare vocab.txt (a Google checkpoint's); read from bertforge's files otherwise."""

    def __post_init__(self) -> None:
        require(len(self.text) > 0, "TEXT", "give a text with [MASK] in it")
        require(self.top_k >= 1, "--top-k", "must be at least 1")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """`bertforge run`: the whole pipeline, vocab -> data -> train -> export, then report.md.

    Every stage flag works here too and is given once: a flag several stages use (--input,
    --max-seq-length, --random-seed, --cased, ...) goes to each of them; export's --format is
    --export-format. A TOML --config sets [run] and per-stage sections. A stage whose
    settings and output are unchanged since the last run is skipped; an interrupted one
    resumes. Under torchrun, process 0 runs the stages and all processes train."""

    input: tuple[str, ...] = option(aliases=("--input_file",), split_commas=True, positional=True)
    """The corpus: files, globs, directories, .gz/.bz2/.xz/.zst, - for stdin (Google's format),
    JSON Lines, Parquet or Arrow."""
    output: str = option(aliases=("--output_dir",))
    """Directory of the run: vocab/, data/, train/, model/ (the export), report.md."""
    vocab: str | None = option(None, aliases=("--vocab_file",))
    """Use this vocabulary (a `bertforge vocab` directory, or a checkpoint's vocab.txt with
    --cased/--lowercase) instead of training one; the vocab stage is then skipped. Default
    with --init-checkpoint: the vocab.txt beside the checkpoint (continued pretraining must
    keep the checkpoint's vocabulary)."""
    overwrite: bool = False
    """Run every stage from the start, replacing what the directory holds."""
    progress: bool = True
    """Show progress bars and lines."""

    def __post_init__(self) -> None:
        require(len(self.input) > 0, "CORPUS", "give at least one corpus file")


STAGES: dict[str, type] = {
    "vocab": VocabConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "export": ExportConfig,
}
# A config file's sections: a stage's, and [run] (`bertforge run`'s own settings).
SECTIONS: dict[str, type] = {**STAGES, "run": RunConfig}
# Commands with a config that are not pipeline stages (no TOML section of their own).
TOOLS: dict[str, type] = {"embed": EmbedConfig, "fill-mask": FillMaskConfig}


def require(condition: bool, flag: str, message: str) -> None:
    """Raise a UserError naming the flag when a setting is out of range."""
    if not condition:
        raise UserError(f"{flag}: {message}.")


# ----------------------------------------------------------------------------- introspection


@dataclass(frozen=True)
class FieldSpec:
    """What the CLI and the TOML reader need to know about one config field."""

    name: str
    kind: str  # "bool", "int", "float", "str", "list", "choice"
    help: str
    required: bool
    default: Any
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is a valid value
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def names(self) -> list[str]:
        """All flag spellings that set this field (to a value, or to True for booleans)."""
        out = [self.flag]
        if "--" + self.name != self.flag:
            out.append("--" + self.name)
        out += [a for a in self.metadata.get("aliases", ()) if a not in out]
        out += list(self.metadata.get("true_flags", ()))
        return out

    def false_names(self) -> list[str]:
        out = ["--no-" + self.name.replace("_", "-"), "--no" + self.name]
        return out + list(self.metadata.get("false_flags", ()))


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields, read from the source (also of base classes)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        docs.update(module_field_docs(klass.__module__).get(klass.__qualname__, {}))
    return docs


@functools.cache
def module_field_docs(module: str) -> dict[str, dict[str, str]]:
    """{class name: {field: docstring}} for the top-level classes of a module, parsed once
    (inspect.getsource per class re-reads and re-tokenizes the file: a third of a second)."""
    try:
        tree = ast.parse(inspect.getsource(sys.modules[module]))
    except (KeyError, OSError, TypeError, SyntaxError):
        return {}
    out: dict[str, dict[str, str]] = {}
    for cls_node in tree.body:
        if not isinstance(cls_node, ast.ClassDef):
            continue
        docs = out.setdefault(cls_node.name, {})
        for node, nxt in itertools.pairwise(cls_node.body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return out


def field_specs(cls: type) -> list[FieldSpec]:
    """FieldSpecs of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    specs = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        optional = False
        args = typing.get_args(tp)
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
            optional = True
            tp = next(a for a in args if a is not type(None))
        choices: tuple[str, ...] = ()
        if tp is bool:
            kind = "bool"
        elif tp is int:
            kind = "int"
        elif tp is float:
            kind = "float"
        elif tp is str:
            kind = "str"
        elif typing.get_origin(tp) is Literal:
            kind, choices = "choice", tuple(typing.get_args(tp))
        elif typing.get_origin(tp) is tuple:
            kind = "list"
        else:  # pragma: no cover - a programming error in a config class
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported config type {tp}")
        required = f.default is MISSING and f.default_factory is MISSING
        specs.append(
            FieldSpec(
                name=f.name,
                kind=kind,
                help=docs.get(f.name, ""),
                required=required,
                default=None if required else f.default,
                choices=choices,
                optional=optional,
                metadata=f.metadata,
            )
        )
    return specs


# ----------------------------------------------------------------------------- CLI


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of cls; unset flags stay absent from the namespace."""
    for spec in field_specs(cls):
        add_field_argument(parser, spec)


def add_field_argument(parser: argparse.ArgumentParser, spec: FieldSpec, note: str = "") -> None:
    """The flag(s) of one field, with dest = the field name; `note` is added to the help."""
    default = "required" if spec.required else f"default: {format_value(spec.default)}"
    help_text = f"{spec.help} ({default}{note})".replace("%", "%%")
    if spec.kind == "bool":
        parser.add_argument(
            *spec.names(), dest=spec.name, action="store_const", const=True,
            default=argparse.SUPPRESS, help=help_text,
        )  # fmt: skip
        parser.add_argument(
            *spec.false_names(), dest=spec.name, action="store_const", const=False,
            default=argparse.SUPPRESS, help=argparse.SUPPRESS,
        )  # fmt: skip
    elif spec.kind == "list":
        if spec.metadata.get("positional"):
            parser.add_argument(  # extend: `a --input b` and `--input b a` both read a and b
                spec.name, nargs="*", action="extend", default=argparse.SUPPRESS,
                help=help_text, metavar=spec.name.upper(),
            )  # fmt: skip
        parser.add_argument(
            *spec.names(), dest=spec.name, nargs="+", action="extend",
            default=argparse.SUPPRESS, help=help_text, metavar=spec.name.upper(),
        )  # fmt: skip
    else:
        kind = {"int": int, "float": float}.get(spec.kind, str)
        parser.add_argument(
            *spec.names(), dest=spec.name, type=kind, default=argparse.SUPPRESS,
            choices=spec.choices or None, help=help_text, metavar=spec.name.upper(),
        )  # fmt: skip


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "auto"
    return str(value)


def normalize_argv(argv: Sequence[str], classes: Sequence[type]) -> list[str]:
    """Rewrite absl-style `--flag=true/false` for boolean fields into plain switches, and join
    a value that starts with a minus (`--layers -1,-2`) to its flag."""
    true_of: dict[str, str] = {}
    false_of: dict[str, str] = {}
    value_flags: set[str] = set()
    for cls in classes:
        for spec in field_specs(cls):
            if spec.kind != "bool":
                value_flags.update(spec.names())
            else:
                for name in spec.names():
                    true_of[name], false_of[name] = name, spec.false_names()[0]
                for name in spec.false_names():
                    true_of[name], false_of[name] = name, spec.names()[0]
    out: list[str] = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if out and out[-1] in value_flags and NEGATIVE_VALUE.match(arg):
            out[-1] = f"{out[-1]}={arg}"  # `--layers -1,-2`: argparse would take -1 for a flag
        elif eq and name in true_of:
            if value.lower() in TRUE_WORDS:
                out.append(true_of[name])
            elif value.lower() in FALSE_WORDS:
                out.append(false_of[name])
            else:
                raise UserError(f"{name}: expected true or false, got {value!r}.")
        else:
            out.append(arg)
    return out


def fold_positionals(args: argparse.Namespace, unknown: list[str], cls: type | None) -> list[str]:
    """What argparse left over, less the command's inputs given after a flag (`run a.txt
    --output o b.txt`: argparse takes only the first run of positional arguments and leaves
    b.txt unknown). Such leftovers are added to the command's positional field, in order."""
    specs = field_specs(cls) if cls is not None else []
    spec = next((s for s in specs if s.metadata.get("positional")), None)
    if not unknown or spec is None or any(u.startswith("-") and u != "-" for u in unknown):
        return unknown  # (nothing left over: the field untouched, so a TOML file can set it)
    if spec.kind == "list":
        setattr(args, spec.name, [*getattr(args, spec.name, []), *unknown])
        return []
    given = [getattr(args, spec.name)] if hasattr(args, spec.name) else []  # `embed a.txt`
    if spec.metadata.get("comma_list"):  # `train google/*.tfrecord`, the glob unquoted
        setattr(args, spec.name, ",".join([*given, *unknown]))
        return []
    if given or len(unknown) > 1:
        raise UserError(
            f"{spec.name.upper()} is one path, given as an argument or {spec.flag}; got "
            f"{', '.join([*given, *unknown])}: give one."
        )
    setattr(args, spec.name, unknown[0])
    return []


def unknown_flags_error(unknown: Sequence[str], parser: argparse.ArgumentParser) -> UserError:
    """The first unknown argument, with the flags it may have meant (any spelling), or else
    every flag, each by its first spelling (train has some 65 flags, 130 with their Google
    and underscore spellings)."""
    shown = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]
    first_of = {s: a.option_strings[0] for a in shown for s in a.option_strings}
    valid = sorted(a.option_strings[0] for a in shown)
    first = next((u for u in unknown if u.startswith("-")), unknown[0]).split("=")[0]
    if not first.startswith("-"):
        return UserError(
            f"unexpected argument {first!r}; this command takes flags only ({', '.join(valid)})."
        )
    matches = difflib.get_close_matches(first, sorted(first_of), n=6, cutoff=0.7)
    close = list(dict.fromkeys(first_of[m] for m in matches))[:3]  # a flag once, any spelling
    if close:
        return UserError(
            f"unknown argument {first!r}. Did you mean {' or '.join(close)}? "
            f"(`{parser.prog} --help` describes every flag.)"
        )
    return UserError(f"unknown argument {first!r}. Valid flags: {', '.join(valid)}.")


# ----------------------------------------------------------------------------- TOML + merge


def read_toml(path: str | Path, command: str | None = None) -> dict[str, Any]:
    """Read a TOML config file; sections must be stage names. A key above every section is
    told to go under the sections that take it, the `command`'s first."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config: {p} does not exist.")
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # TOML is UTF-8
        raise UserError(f"{p}: not valid TOML ({e}).") from None
    for key, value in data.items():
        if not isinstance(value, dict):  # a key above every section
            name = key.replace("-", "_")
            takers = [f"[{s}]" for s, cls in SECTIONS.items()
                      if name in {f.name for f in dataclasses.fields(cls)}]  # fmt: skip
            takers.sort(key=lambda section: section != f"[{command}]")  # the command's first
            if not takers:
                raise UserError(f"{p}: {key} is outside any section, and no section takes such a "
                                f"key (each key is a flag of its section's stage).")  # fmt: skip
            raise UserError(
                f"{p}: {key} is outside any section (keys above the first [section] belong to "
                f"none); put it under {' or '.join(takers)}: a section per stage, each key a "
                "flag of that stage."
            )
        if key not in SECTIONS:
            raise UserError(
                f"{p}: unknown section [{key}]; valid sections: "
                + ", ".join(f"[{s}]" for s in SECTIONS)
                + "."
            )
    return data


# What a TOML value of each kind of setting is written as, for the error that names it.
KIND_NAMES = {"bool": "true or false", "int": "an integer", "float": "a number",
              "list": "a list of strings", "str": "a string"}  # fmt: skip


def coerce(spec: FieldSpec, value: Any, where: str) -> Any:
    """Check and convert a value from TOML (or code) to the field's type."""
    if value is None and spec.optional:
        return None
    ok: bool
    if spec.kind == "bool":
        ok = isinstance(value, bool)
    elif spec.kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif spec.kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif spec.kind == "list":
        if isinstance(value, str):
            value = [value]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        if ok:
            items = []
            for v in value:
                items += v.split(",") if spec.metadata.get("split_commas") else [v]
            value = tuple(v for v in items if v)
    elif spec.kind == "choice":
        ok = value in spec.choices
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = KIND_NAMES.get(spec.kind, spec.kind)
        if spec.choices:
            expected = f"one of {', '.join(spec.choices)}"
        raise UserError(f"{where}: {spec.name} must be {expected}, got {value!r}.")
    return value


def build_config(
    cls: type[C],
    file_values: Mapping[str, Any] | None = None,
    flag_values: Mapping[str, Any] | None = None,
    source: str = "config file",
) -> C:
    """Defaults < file section < flags; unknown keys and missing required fields are errors."""
    specs = {s.name: s for s in field_specs(cls)}
    values: dict[str, Any] = {}
    for key, value in (file_values or {}).items():
        name = key.replace("-", "_")
        if name not in specs:
            close = difflib.get_close_matches(name, specs, n=3)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise UserError(f"{source}: unknown key {key!r}.{hint} Valid keys: {', '.join(specs)}.")
        values[name] = coerce(specs[name], value, source)
    for name, value in (flag_values or {}).items():
        values[name] = coerce(specs[name], value, specs[name].flag)
    for spec in specs.values():
        if spec.required and spec.name not in values:
            if spec.metadata.get("positional"):  # given as an argument: `vocab corpus.txt`
                name = spec.name.upper()
                raise UserError(f"{name} is required, as an argument (or {spec.flag} {name}): "
                                f"{spec.help}")  # fmt: skip
            raise UserError(f"{spec.flag} is required ({spec.help})")
    return cls(**values)


def changed_settings(
    old: Mapping[str, Any], new: Mapping[str, Any], cls: type, ignore: Collection[str] = ()
) -> list[str]:
    """The settings in `new` (config_to_dict of a `cls`) whose value differs from `old`'s, but
    those in `ignore`. A setting that `old`, written by an older bertforge, lacks counts as the
    field's default: a new option left at its default changes nothing, so an upgrade alone
    does not redo a finished stage or refuse to resume a training run."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}

    def was(key: str) -> Any:
        if key in old:
            return old[key]
        value = defaults.get(key, MISSING)
        return list(value) if isinstance(value, tuple) else value

    return [k for k, v in new.items() if k not in ignore and was(k) != v]


def describe_changes(
    old: Mapping[str, Any], new: Mapping[str, Any], keys: Sequence[str], cls: type | None = None
) -> str:
    """Settings `keys` as the flags that set them, with both values: "--learning-rate was
    0.0001, now 0.0003" (what a refusal to keep or resume an output names). A setting `old`
    lacks (an older bertforge's record) was `cls`'s default, as `changed_settings` takes it."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)} if cls else {}

    def was(key: str) -> Any:
        return old[key] if key in old else defaults.get(key)

    return ", ".join(f"--{k.replace('_', '-')} was {was(k)}, now {new.get(k)}" for k in keys)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready view of a config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
