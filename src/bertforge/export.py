"""`bertforge export`: a model as a Hugging Face directory that transformers and flair load.

The source is anything `read_init_checkpoint` reads: a bertforge training directory (its
latest checkpoint) or checkpoint file, a Hugging Face BERT directory, or a Google TF
checkpoint (the seed's "convert the TF checkpoint to PyTorch" step, without TensorFlow).

The weights go through the explicit key table of model.py (`to_hf`), without the internal
vocabulary padding, as `model.safetensors` in transformers' BertForPreTraining names (the
tied decoder weight and bias are left out, as transformers itself saves them). The tokenizer
files are written from the vocabulary with its recorded casing, so `AutoTokenizer` tokenizes
exactly as the data stage did. The manifest records where the model came from: the training
config, a summary of the data, and the final evaluation. `--format google` adds Google's
bert_config.json and the weights as a TF checkpoint, bert_model.ckpt (written without
TensorFlow, `tfcheckpoint.write_checkpoint`), which Google's scripts take as --init_checkpoint.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bertforge.checkpoint import InitWeights, read_init_checkpoint
from bertforge.config import ExportConfig, config_to_dict
from bertforge.errors import UserError
from bertforge.fileio import (
    atomic_open,
    begin_output,
    edited_outputs,
    finish_output,
    locked_output,
    prepare_output_dir,
    read_jsonl,
    read_manifest,
    write_json,
    write_manifest,
)
from bertforge.model import BertConfig, to_hf
from bertforge.tfcheckpoint import google_tensors, write_checkpoint
from bertforge.tokenization import (
    Vocab,
    first_difference,
    load_vocab,
    other_normalization,
    read_vocab_file,
    save_tokenizer_files,
)

WEIGHTS = "model.safetensors"
GOOGLE_CHECKPOINT = "bert_model.ckpt"  # --format google: PREFIX.index, PREFIX.data-00000-of-00001
TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


@dataclass
class ExportResult:
    output: Path
    source: InitWeights
    vocab: Vocab
    files: list[str]
    eval: dict[str, Any] | None


@locked_output("export")
def export(cfg: ExportConfig) -> ExportResult:
    source = read_init_checkpoint(cfg.checkpoint, "--checkpoint")
    vocab = export_vocab(cfg, source)
    out = prepare_output_dir(cfg.output, "export", cfg.overwrite, "--output")
    if not cfg.overwrite and (changed := edited_outputs(out)):
        raise UserError(
            f"--output: {out} holds an export whose {', '.join(p.name for p in changed)} "
            "changed since it was written (a model fine-tuned and saved there?); exporting "
            "again would replace them. Give another --output, or pass --overwrite."
        )
    begin_output(out, "export")
    # An earlier --format google export's files: rewritten below, or not wanted.
    for old in [out / "bert_config.json", *out.glob(f"{GOOGLE_CHECKPOINT}.*")]:
        old.unlink(missing_ok=True)

    bert = source.config
    write_json(out / "config.json", hf_config(bert))
    write_safetensors(out / WEIGHTS, dict(to_hf(source.weights, bert)))
    files = ["config.json", WEIGHTS]
    # model_max_length: the longest sequence the positions were trained on, so transformers'
    # truncation and flair's windows never reach rows a run at a shorter length left untrained
    longest = source.readable_length
    files += save_tokenizer_files(
        out, vocab.tokens, vocab.do_lower_case, vocab.strip_accents, longest
    )
    if cfg.format == "google":
        write_json(out / "bert_config.json", bert.to_dict())
        hf = {k: v.detach().float().numpy() for k, v in to_hf(source.weights, bert)}
        written = write_checkpoint(out / GOOGLE_CHECKPOINT, google_tensors(hf))
        files += ["bert_config.json", *(p.name for p in written)]

    training = training_record(source)
    write_manifest(
        out,
        "export",
        {**config_to_dict(cfg), "checkpoint": str(source.path.resolve())},
        inputs=[{"checkpoint": str(source.path), "kind": source.kind, "step": source.step}],
        outputs=files,
        extra={"bert_config": bert.to_dict(), "trained_length": longest, **training},
        libraries=("torch", "safetensors", "tokenizers"),
    )
    finish_output(out)
    return ExportResult(out, source, vocab, files, training.get("eval"))


def export_vocab(cfg: ExportConfig, source: InitWeights) -> Vocab:
    path = cfg.vocab or source.vocab_file
    if path is None:
        raise UserError(
            f"--checkpoint: no vocab.txt or tokenizer.json beside {source.path}; give the "
            "model's vocabulary with --vocab (and --do-lower-case or --no-do-lower-case for a "
            "bare vocab.txt)."
        )
    vocab = load_vocab(path, cfg.do_lower_case, "--vocab" if cfg.vocab else "--checkpoint")
    if vocab.size != source.config.vocab_size:
        raise UserError(
            f"--vocab: {vocab.path} has {vocab.size} tokens but the model in {source.path} "
            f"has vocab_size {source.config.vocab_size}; give the vocabulary it was trained with."
        )
    if cfg.vocab and source.vocab_file is not None:  # one beside it too: the two must agree
        own = read_vocab_file(source.vocab_file)
        if (first := first_difference(vocab.tokens, own)) is not None:
            here = repr(vocab.tokens[first]) if first < vocab.size else "nothing"
            there = repr(own[first]) if first < len(own) else "nothing"
            raise UserError(
                f"--vocab: {vocab.path} is not the vocabulary beside the model, "
                f"{source.vocab_file} (id {first}: {here} here, {there} there), so the model "
                "would read its ids as other words; leave --vocab out to use it."
            )
        if differ := other_normalization(vocab, source.vocab_file):
            given, learned, said = differ
            raise UserError(
                f"--vocab: {vocab.path} {given}, but the model's tokenizer {learned} ({said}), "
                "so the exported tokenizer would feed it text unlike what it learned from; leave "
                "--vocab out to use the one beside the model."
            )
    if vocab.casing_doubt:  # after the errors; the exported tokenizer records this casing
        print(vocab.casing_doubt, file=sys.stderr)
    return vocab


def hf_config(bert: BertConfig) -> dict[str, Any]:
    """transformers' config.json for BertForPreTraining (AutoModel* read the model type)."""
    return {
        "architectures": ["BertForPreTraining"],
        "model_type": "bert",
        **bert.to_dict(),
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "classifier_dropout": None,
        "tie_word_embeddings": True,
        "use_cache": True,
    }


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Each tensor in its own contiguous storage (safetensors refuses shared ones), written
    atomically; the tied decoder copies are left out as transformers does."""
    from safetensors.torch import save

    own = {
        k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items() if k not in TIED
    }
    with atomic_open(path) as f:
        f.write(save(own, metadata={"format": "pt"}))


def training_record(source: InitWeights) -> dict[str, Any]:
    """The training config, a data summary and the last evaluation, when the source is a
    bertforge training run."""
    if source.kind != "bertforge":
        return {"source": {"kind": source.kind}}
    run = source.path.parent.parent
    manifest = read_manifest(run)
    record: dict[str, Any] = {"source": {"kind": "bertforge", "run": str(run), "step": source.step}}
    if manifest is not None and manifest.get("stage") == "train":
        record["training"] = {"config": manifest["config"], "counts": manifest["counts"]}
        data = manifest.get("data") or {}
        data_manifest = _data_manifest(data.get("source"))
        if data_manifest is not None:
            data = {**data, "counts": data_manifest.get("counts")}
        record["data"] = data
    record["eval"] = last_eval(run, source.step)
    return record


def _data_manifest(source: str | None) -> dict[str, Any] | None:
    if not source or not Path(source).is_dir():
        return None
    try:
        return read_manifest(source, "data")
    except UserError:
        return None


def last_eval(run: Path, step: int | None) -> dict[str, Any] | None:
    """The latest evaluation in metrics.jsonl at or before `step`."""
    evals = [
        r
        for r in read_jsonl(run / "metrics.jsonl")
        if r.get("eval") and (step is None or r.get("step", 0) <= step)
    ]
    return evals[-1] if evals else None


def print_summary(result: ExportResult) -> None:
    s = result.source
    at = f" at step {s.step}" if s.step is not None else ""
    casing = "uncased" if result.vocab.do_lower_case else "cased"
    print(f"export: {s.kind} model{at} ({s.path}) -> {result.output}")
    print(
        f"  L{s.config.num_hidden_layers} H{s.config.hidden_size}, {s.config.vocab_size} tokens "
        f"({casing}); load with AutoModel.from_pretrained({str(result.output)!r})"
    )
    trained, positions = s.trained_length, s.config.max_position_embeddings
    if trained is not None and trained < positions:
        print(
            f"  model_max_length {trained}: trained on sequences of up to {trained} pieces, so "
            f"its positions {trained}-{positions - 1} are untrained (continue with "
            f"--init-checkpoint on data of a longer --max-seq-length to use them)"
        )
    if result.eval:
        print(
            f"  last eval (step {result.eval['step']}): masked LM accuracy "
            f"{result.eval['masked_lm_accuracy']:.4f}, loss {result.eval['loss']:.4f}",
            file=sys.stdout,
        )
