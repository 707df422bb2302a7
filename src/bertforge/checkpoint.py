"""Training checkpoints (atomic, last K kept) and the weights `--init-checkpoint` starts from.

A checkpoint is one file, OUTPUT/checkpoints/ckpt-SSSSSSSS.pt, written to a temporary name
and renamed: it holds the model, the optimizer, the loss scaler, every RNG state, the step
(which is the data position: batches are a function of the step) and the configs.

`--init-checkpoint` reads weights from a bertforge checkpoint (file or training directory), a
Hugging Face BERT directory (config.json + model.safetensors or pytorch_model.bin; names as
published, see model.published_names; its vocab.txt, or its tokenizer.json where transformers 5
saved no vocab.txt) or a Google TF checkpoint (bert_model.ckpt +
bert_config.json + vocab.txt). Optimizer state starts fresh.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bertforge.errors import UserError
from bertforge.fileio import RUN_STATE, atomic_open, output_stages
from bertforge.model import BertConfig, BertForPretraining, config_file_in, from_hf
from bertforge.tokenization import bert_normalizer, find_vocab_file, new_words, wordpiece_ids

CHECKPOINTS = "checkpoints"
FORMAT = "bertforge-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def checkpoint_path(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"ckpt-{step:08d}.pt"


def list_checkpoints(output: Path) -> list[Path]:
    d = output / CHECKPOINTS
    found = [p for p in d.glob("ckpt-*.pt") if _NAME.match(p.name)] if d.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def checkpoint_bytes(bert: BertConfig) -> int:
    """About the size of one checkpoint of this model: its fp32 weights and buffers and the
    optimizer's two fp32 moments per weight (every optimizer of `bertforge train` is Adam's
    kind), counted on the meta device, so without allocating the model, and 1 MB for the
    names, RNG states and settings. Tied weights count once, as torch.save writes them once."""
    with torch.device("meta"):
        model = BertForPretraining(bert)
    weights = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return 3 * 4 * weights + buffers + (1 << 20)


def saves_left(step: int, last: int, every: int) -> int:
    """How many checkpoints a run at `step` still writes: every `every` steps and at `last`."""
    return max(0, last // every - step // every + (1 if last % every and last > step else 0))


def save_checkpoint(output: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ckpt-STEP.pt atomically, then delete all but the newest `keep`."""
    path = checkpoint_path(output, step)
    with atomic_open(path) as f:
        writer = _WriteErrors(f)
        try:
            torch.save({"format": FORMAT, "version": VERSION, "step": step, **state}, writer)
        except RuntimeError:  # torch's C++ writer reports a failed write as its own error
            if writer.error is not None:
                raise writer.error from None  # the real one (a full disk): atomic_open says so
            raise
    for old in list_checkpoints(output)[:-keep]:
        old.unlink(missing_ok=True)
    return path


class _WriteErrors:
    """A file that remembers the OSError of a failed write (torch.save replaces it with a
    RuntimeError that does not say the disk is full)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which, and what else there is
        why = str(e).split(". ")[0].rstrip(".")  # torch's first sentence, not its advice
        earlier = list_checkpoints(path.parent.parent) if path.parent.name == CHECKPOINTS else []
        earlier = earlier[: earlier.index(path)] if path in earlier else []
        advice = (
            f"; move it out of {path.parent} to go on from {earlier[-1].name}, the one before"
            if earlier
            else ""
        )
        raise UserError(f"{path}: not a readable bertforge checkpoint ({why}){advice}.") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a bertforge checkpoint.")
    if state["version"] > VERSION:
        raise UserError(
            f"{path}: checkpoint version {state['version']} is newer than this "
            f"bertforge reads ({VERSION}); upgrade bertforge."
        )
    return state


@dataclass
class InitWeights:
    """Weights to start from, in our names, with the config and vocabulary they came with."""

    weights: dict[str, torch.Tensor]
    config: BertConfig
    vocab_file: Path | None
    kind: str  # bertforge | huggingface | google
    path: Path  # the file or directory read
    step: int | None = None  # a bertforge checkpoint's training step
    # The longest sequence its position embeddings were trained on, where recorded: a bertforge
    # checkpoint's, or a Hugging Face tokenizer_config.json's model_max_length. Rows past it
    # are as initialized (a run at seq 128 never trains positions 128-511).
    trained_length: int | None = None

    @property
    def readable_length(self) -> int:
        """The longest sequence to feed it: its trained_length where recorded, else every
        position it has (Google's published models were trained at all 512)."""
        return self.trained_length or self.config.max_position_embeddings


def _config_in(directory: Path, source: str, flag: str) -> BertConfig:
    if (found := config_file_in(directory)) is not None:
        return BertConfig.from_json(found)
    given = " or give it as --bert-config FILE" if flag == "--init-checkpoint" else ""
    raise UserError(
        f"{source}: no bert_config.json or config.json beside it, so the model's size is "
        f"unknown; copy the bert_config.json it was trained with into {directory}{given}."
    )


def checkpoint_source(path: str, flag: str) -> Path:
    """The file or directory to read for `path`: a training directory (or its checkpoints/)
    means its latest checkpoint; anything else is read as it is. Errors name `flag`."""
    p = Path(path)
    if not p.exists() and not p.with_name(p.name + ".index").exists():
        raise UserError(f"{flag}: {p} does not exist.")
    if p.is_dir() and p.name == CHECKPOINTS and list_checkpoints(p.parent):
        p = p.parent  # the training directory's checkpoints/ itself
    if p.is_dir() and list_checkpoints(p):
        p = list_checkpoints(p)[-1]
    return p


def source_directory(source: Path) -> Path:
    """Where the files a checkpoint came with lie (for `checkpoint_source`'s answer): a
    bertforge checkpoint's training directory, else the directory itself, or the one that
    holds the file (a Google checkpoint's prefix)."""
    if source.is_file() and source.suffix == ".pt":
        return source.parent.parent
    return source if source.is_dir() else source.parent


def config_beside(source: Path) -> BertConfig | None:
    """A checkpoint's model shape (`checkpoint_source`'s answer) from the JSON beside it,
    without reading its weights (gigabytes, with Adam's moments). None where there is none
    (the weights are read for it later)."""
    found = config_file_in(source_directory(source))
    return None if found is None else BertConfig.from_json(found)


def vocab_beside(source: Path) -> Path | None:
    """The vocabulary file a checkpoint came with (`checkpoint_source`'s answer): its training
    directory's for a bertforge checkpoint, else the one in its directory (vocab.txt, or a
    Hugging Face tokenizer.json: `find_vocab_file`); None if absent."""
    vocab = find_vocab_file(source_directory(source))
    return vocab if vocab.is_file() else None


# What --init-checkpoint, --checkpoint and --model take, for their errors.
MODEL_SOURCES = (
    "a bertforge training directory (with checkpoints/) or checkpoint file (ckpt-*.pt), a "
    "Hugging Face BERT directory (config.json + model.safetensors), or a Google TF checkpoint "
    "(bert_model.ckpt + bert_config.json)"
)
# A Hugging Face model's files, read from their directory as a whole.
HF_FILES = {"model.safetensors", "pytorch_model.bin", "config.json", "tf_model.h5"}


def is_tf_checkpoint_file(p: Path) -> bool:
    """PREFIX.index or PREFIX.data-NNNNN-of-NNNNN: a TF checkpoint named by one of its files
    (PREFIX itself is no file)."""
    return p.name.endswith(".index") or ".data-" in p.name


def read_init_checkpoint(
    path: str, flag: str = "--init-checkpoint", bert_config: str | None = None
) -> InitWeights:
    """Weights from any source bertforge reads; errors name `flag`. A Google checkpoint's
    size is read from `bert_config` when given (run_pretraining.py's output directory has
    none), else from the bert_config.json beside it."""
    p = checkpoint_source(path, flag)
    vocab_file = vocab_beside(p)
    if p.is_file() and p.suffix == ".pt":
        state = load_checkpoint(p)
        c = BertConfig.from_dict(state["bert_config"], str(p))
        return InitWeights(state["model"], c, vocab_file, "bertforge", p, state["step"],
                           state.get("trained_length"))  # fmt: skip
    directory = source_directory(p)
    if p.is_dir() and (p / "config.json").is_file():
        c = BertConfig.from_json(p / "config.json")
        hf = _read_hf_weights(p)
        return InitWeights(from_hf(hf, c, str(p)), c, vocab_file, "huggingface", p, None,
                           _model_max_length(p, c))  # fmt: skip
    if p.is_dir() and not any(p.glob("*.index")):
        if (p / CHECKPOINTS).is_dir() or p.name == CHECKPOINTS:  # none saved yet
            raise UserError(
                f"{flag}: {p} is a training directory with no checkpoint yet (training saves "
                "one every --save-checkpoints-steps steps, and when it stops or ends); give it "
                "again once one is saved."
            )
        if (p / RUN_STATE).is_file() and (p / "train").is_dir():
            raise UserError(
                f"{flag}: {p} is a `bertforge run` directory; its model is {p / 'model'} (the "
                f"export) and its training directory {p / 'train'}: give one of those."
            )
        if stage := next(iter(output_stages(p) & {"vocab", "data"}), None):
            what = {"vocab": "a vocabulary", "data": "pretraining data"}[stage]
            raise UserError(
                f"{flag}: {p} is a `bertforge {stage}` output ({what}), not a model; give "
                f"{MODEL_SOURCES}."
            )
        raise UserError(f"{flag}: {p} holds no model bertforge reads; give {MODEL_SOURCES}.")
    if p.is_file() and not is_tf_checkpoint_file(p):  # a corpus, a config, a model's file
        of = f"{p.parent}, the directory it is in" if p.name in HF_FILES else MODEL_SOURCES
        raise UserError(f"{flag}: {p} is not a model checkpoint bertforge reads; give {of}.")
    from bertforge.tfcheckpoint import google_weights, resolve_prefix

    prefix = resolve_prefix(p)
    if bert_config:
        c = BertConfig.from_json(bert_config)
    else:
        c = _config_in(directory, f"{flag}: {prefix}", flag)
    try:
        hf = {k: torch.from_numpy(v) for k, v in google_weights(prefix).items()}
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None
    # a bertforge export in Google's format carries the length in its tokenizer_config.json
    trained = _model_max_length(directory, c)
    return InitWeights(from_hf(hf, c, str(prefix)), c, vocab_file, "google", prefix, None, trained)


def _model_max_length(directory: Path, config: BertConfig) -> int | None:
    """A Hugging Face directory's tokenizer_config.json model_max_length, when it is a length
    the model has positions for (transformers writes a huge number when none was set)."""
    try:
        n = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        n = n.get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(n, int) and not isinstance(n, bool)
    return n if ok and 1 <= n <= config.max_position_embeddings else None


@dataclass
class GoogleRun:
    """What run_pretraining.py's checkpoint holds beside the weights: each weight's Adam
    moments (in our names and shapes, vocabulary padding zero) and the step it reached."""

    moments: dict[str, tuple[torch.Tensor, torch.Tensor]]
    step: int


def read_google_run(prefix: Path, config: BertConfig, flag: str = "--resume-google") -> GoogleRun:
    from bertforge.tfcheckpoint import global_step, google_weights

    step = global_step(prefix)
    if step is None:
        raise UserError(
            f"{flag}: {prefix} has no global_step: not a checkpoint of a run_pretraining.py "
            "run (a released model?); start from its weights with --init-checkpoint."
        )
    slots = []
    for slot in ("/adam_m", "/adam_v"):
        try:
            hf = {k: torch.from_numpy(v) for k, v in google_weights(prefix, slot).items()}
            slots.append(from_hf(hf, config, f"{prefix} ({slot[1:]})"))
        except UserError as e:
            raise UserError(
                f"{flag}: {prefix} lacks the Adam moments of a run_pretraining.py run ({e}); "
                "start from its weights with --init-checkpoint (the optimizer starts fresh)."
            ) from None
    m, v = slots
    if set(m) != set(v):
        missing = sorted(set(m) ^ set(v))[0]
        raise UserError(f"{flag}: {prefix} has one Adam moment of {missing} but not the other.")
    return GoogleRun({name: (m[name], v[name]) for name in m}, step)


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors or pytorch_model.bin, whole or sharded (NAME.index.json's weight_map
    names each tensor's file, as transformers' save_pretrained writes them)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return _read_weights_file(directory / name)
        index = directory / f"{name}.index.json"
        if index.is_file():
            try:
                files = sorted(
                    set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
                )
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{index}: not a sharded checkpoint's index ({e}).") from None
            missing = [f for f in files if not (directory / f).is_file()]
            if missing:
                raise UserError(f"{index} names {missing[0]}, which is not in {directory}.")
            weights: dict[str, torch.Tensor] = {}
            for f in files:
                weights.update(_read_weights_file(directory / f))
            return weights
    raise UserError(
        f"{directory}: no model.safetensors or pytorch_model.bin (whole or sharded with its "
        ".index.json) beside config.json."
    )


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors or pickled state-dict file; a damaged one is named."""
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # the file system's error, reported as such
    except Exception as e:  # a truncated download, a foreign pickle: say which file
        raise UserError(f"{path}: cannot read its weights ({e}); download it again.") from None


@dataclass(frozen=True)
class NewWords:
    """What `seed_new_words` did: the ids whose rows now hold the mean of their pieces' rows,
    and those left as the checkpoint had them (a word the checkpoint's vocabulary makes [UNK])."""

    seeded: list[int]
    unknown: list[int]


def seed_new_words(
    weights: dict[str, torch.Tensor], tokens: Sequence[str], theirs: Sequence[str]
) -> tuple[dict[str, torch.Tensor], NewWords]:
    """Weights for a vocabulary (`tokens`) that writes new words over [unusedN] slots of the
    checkpoint's (`theirs`): each such word's embedding row and masked-LM bias start as the
    mean of those of the pieces the checkpoint's vocabulary splits it into (`transfer_vocab`),
    instead of the slot's (never trained on a word; in Google's checkpoints pushed down as a
    prediction). A word it cannot split keeps the slot's rows."""
    ids = new_words(tokens, theirs)
    if not ids:
        return weights, NewWords([], [])
    rows = weights["word_embeddings.weight"].shape[0]
    out, t = transfer_vocab(weights, tokens, theirs, rows)
    unknown = set(t.unknown)
    stay = [i for i in ids if i in unknown]
    keep = stay + list(range(len(tokens), rows))  # and the padding rows, as they were
    for name, old in weights.items():
        if name in ("word_embeddings.weight", "mlm_bias"):
            out[name][keep] = old[keep]
    return out, NewWords([i for i in ids if i not in unknown], stay)


@dataclass(frozen=True)
class VocabTransfer:
    """What `transfer_vocab` did, by id of the new vocabulary: tokens the checkpoint's
    vocabulary has (their rows kept), tokens started from the mean of their pieces' rows, and
    tokens with characters it lacks (started from its [UNK] row)."""

    kept: list[int]
    pieces: list[int]
    unknown: list[int]


def transfer_vocab(
    weights: dict[str, torch.Tensor],
    tokens: Sequence[str],
    theirs: Sequence[str],
    padded_size: int,
) -> tuple[dict[str, torch.Tensor], VocabTransfer]:
    """Weights for another vocabulary (`tokens`) than the checkpoint's (`theirs`), with
    `padded_size` rows (the model's vocab padding, zero). The embedding row and masked-LM bias
    of a token the checkpoint has are its own; of any other token, the mean (fp32) of those of
    the pieces the checkpoint's vocabulary splits it into, looked up as it is, else lowercased
    and accent-stripped (an uncased checkpoint); else those of its [UNK]."""
    vocab = {t: i for i, t in enumerate(theirs)}
    lower = bert_normalizer(True, None).normalize_str
    source: list[list[int]] = []
    kept, pieces, unknown = [], [], []
    for j, token in enumerate(tokens):
        if token in vocab:
            kept.append(j)
            source.append([vocab[token]])
            continue
        split = wordpiece_ids(token, vocab)
        if split is None:  # the normalizer leaves a "##" prefix as it is
            split = wordpiece_ids(lower(token), vocab)
        if split is None:
            unknown.append(j)
            split = [vocab.get("[UNK]", 0)]
        else:
            pieces.append(j)
        source.append(split)
    rows = torch.tensor([i for s in source for i in s])
    counts = torch.tensor([len(s) for s in source])
    row_of = torch.repeat_interleave(torch.arange(len(source)), counts)
    out = dict(weights)
    for name in ("word_embeddings.weight", "mlm_bias"):
        if name not in weights:
            continue  # a bare encoder: the head starts fresh anyway
        old = weights[name]
        sums = torch.zeros((len(tokens), *old.shape[1:]), dtype=torch.float32)
        sums.index_add_(0, row_of, old[rows].float())
        new = torch.zeros((padded_size, *old.shape[1:]), dtype=old.dtype)
        new[: len(tokens)] = (sums / counts.view(-1, *[1] * (old.dim() - 1))).to(old.dtype)
        out[name] = new
    return out, VocabTransfer(kept, pieces, unknown)
