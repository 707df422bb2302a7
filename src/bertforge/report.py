"""DIR/report.md for a `bertforge run`: what went in, what came out, and how training went.

Everything is read from the stages' own records (manifests, metrics.jsonl, run.json), so the
report can be rewritten at any time from a run directory. Plots are PNGs drawn with
matplotlib's non-interactive backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertforge.config import TUNABLE
from bertforge.corpus import corpus_notes
from bertforge.data import manifest_warnings, mask_cap_warning, split_summary
from bertforge.fileio import atomic_open, read_jsonl, read_manifest, write_text

PLOTS = "plots"
# the options the report names beside "compiled" and "packed batches"
SPEED_OPTIONS = tuple(k for k in TUNABLE if k not in ("compile", "packed"))


@dataclass
class Summary:
    """The figures the end-of-run message prints."""

    model: Path
    steps: int
    masked_lm_accuracy: float | None
    unigram_baseline: float | None
    next_sentence_accuracy: float | None
    tokens_per_second: float | None
    mfu: float | None = None


def embeddings_note(transfer: bool, counts: dict[str, int] | None) -> str:
    """How the checkpoint's embeddings became the vocabulary's, as the train manifest says."""
    if transfer:
        if not counts:  # a manifest from before the counts were recorded
            return " (its embeddings carried over to this vocabulary: --transfer-vocab)"
        total = counts["kept"] + counts["from_pieces"] + counts["from_unk"]
        unk = f", {counts['from_unk']:,} from its [UNK]" if counts["from_unk"] else ""
        return (
            f" (--transfer-vocab: {counts['kept']:,} of the {total:,} tokens kept their "
            f"embeddings, {counts['from_pieces']:,} started from the mean of their pieces'{unk})"
        )
    if counts:
        slots = counts["new_words_as_slots"]
        rest = f"; {slots:,} kept their slots' embeddings" if slots else ""
        return (
            f" ({counts['new_words_from_pieces']:,} new words in [unusedN] slots started from "
            f"the mean of their pieces' embeddings{rest})"
        )
    return ""


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training log records, evaluation records) of a metrics.jsonl, skipping a torn line."""
    records = read_jsonl(path)
    return [r for r in records if not r.get("eval")], [r for r in records if r.get("eval")]


def steady_mean(train: list[dict[str, Any]], key: str) -> float | None:
    """Mean of a training log figure, leaving out the first record (warm-up, compiling)
    unless it is the only one; None when no record has it."""
    values = [r[key] for r in train[1:] or train if key in r]
    return sum(values) / len(values) if values else None


def plot(out: Path, train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> list[str]:
    """loss.png and accuracy.png; the names written (none without training records)."""
    if not train:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / PLOTS).mkdir(exist_ok=True)
    steps = [r["step"] for r in train]
    esteps = [r["step"] for r in evals]
    written = []
    for name, series in (
        (
            "loss",
            (
                ("loss", "loss"),
                ("masked_lm_loss", "masked LM loss"),
                ("next_sentence_loss", "next sentence loss"),
            ),
        ),
        (
            "accuracy",
            (
                ("masked_lm_accuracy", "masked LM accuracy"),
                ("next_sentence_accuracy", "next sentence accuracy"),
            ),
        ),
    ):
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for key, label in series:
            line = ax.plot(steps, [r[key] for r in train], label=f"train {label}")[0]
            if evals:
                ax.plot(
                    esteps,
                    [r[key] for r in evals],
                    "o",
                    color=line.get_color(),
                    label=f"held-out {label}",
                )
        if name == "accuracy" and evals and "masked_lm_unigram_baseline" in evals[-1]:
            ax.axhline(
                evals[-1]["masked_lm_unigram_baseline"],
                ls="--",
                color="grey",
                label="unigram baseline (masked LM)",
            )
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_open(out / PLOTS / f"{name}.png") as f:
            fig.savefig(f, format="png")
        plt.close(fig)
        written.append(f"{PLOTS}/{name}.png")
    return written


def tune_record(path: Path) -> dict[str, Any] | None:
    """train --tune's record (tune.json), or None without one (or with one unreadable: the
    report leaves it out rather than fail)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def not_learned_note(accuracy: float | None, baseline: float | None) -> str | None:
    """Said where the masked LM guesses no better than the best constant guess (within half a
    point): the accuracy alone does not show that the model has learned nothing yet."""
    if accuracy is None or baseline is None or accuracy > baseline + 0.005:
        return None
    return (
        "the masked LM guesses no better than always guessing the most frequent token, so it "
        "has not learned yet; train longer (--num-train-steps) or check the learning rate."
    )


def write_report(out: Path, dirs: dict[str, str]) -> Summary:
    vocab = read_manifest(out / dirs["vocab"]) or {}
    data = read_manifest(out / dirs["data"]) or {}
    trained = read_manifest(out / dirs["train"]) or {}
    exported = read_manifest(out / dirs["export"]) or {}
    state = json.loads((out / "run.json").read_text(encoding="utf-8"))
    train, evals = read_metrics(out / dirs["train"] / "metrics.jsonl")
    images = plot(out, train, evals)
    last = evals[-1] if evals else {}
    speed, mfu = steady_mean(train, "tokens_per_second"), steady_mean(train, "mfu")
    model = out / dirs["export"]

    vc, vq, vcfg = vocab.get("counts", {}), vocab.get("quality", {}), vocab.get("config", {})
    dc, dcfg = data.get("counts", {}), data.get("config", {})
    bert = trained.get("bert_config", {})
    tcfg = trained.get("config", {})
    lines = [
        "# bertforge run report",
        "",
        f"Corpus: {', '.join(state.get('data', {}).get('config', {}).get('input', []))}  ",
        f'Model: `{model}` (transformers: `AutoModel.from_pretrained("{model}")`; flair: '
        f'`TransformerWordEmbeddings("{model}")`)',
        "",
        "## Stages",
        "",
        "| stage | directory | seconds |",
        "|---|---|---|",
    ]
    for stage, sub in dirs.items():
        seconds = state.get(stage, {}).get("seconds")
        shown = "–" if seconds is None else f"{seconds:.{1 if seconds < 10 else 0}f}"  # not 0
        lines.append(f"| {stage} | `{sub}/` | {shown} |")
    corpus = dc.get("corpus", vc)
    lines += [
        "",
        "## Corpus and vocabulary",
        "",
        f"- {corpus.get('documents', 0):,} documents, {corpus.get('sentences', 0):,} sentences, "
        f"{corpus.get('bytes', 0) / 1e6:.1f} MB",
    ]
    if vocab:
        lines += [
            f"- vocabulary: {vc.get('vocab_size', '?')} tokens ({vcfg.get('algorithm', '?')}, "
            f"{'uncased' if vcfg.get('do_lower_case') else 'cased'}), alphabet "
            f"{vc.get('alphabet', '?')} characters",
            f"- on {vq.get('sentences', 0):,} held-out sentences: [UNK] "
            f"{_pct(vq.get('unk_rate'))}, {vq.get('pieces_per_word', 0):.3f} pieces per word, "
            f"{_pct(vq.get('vocab_used'))} of the vocabulary in use",
            *(f"- {w}" for w in vocab.get("warnings", [])),
        ]
    else:
        given = data.get("vocab", {})
        lines.append(f"- vocabulary given: {given.get('path')} ({given.get('size')} tokens)")
    lines += [
        "",
        "## Pretraining data",
        "",
        f"- {dc.get('instances', 0):,} instances of at most {dcfg.get('max_seq_length', '?')} "
        f"tokens, {dc.get('tokens', 0):,} tokens; mean length {dc.get('mean_length', 0):.1f}, "
        f"padding {_pct(dc.get('padding_share'))}, random next sentence "
        f"{_pct(dc.get('random_next_share'))}",
        f"- masking: {dcfg.get('masked_lm_prob', '?')} of the tokens, at most "
        f"{dcfg.get('max_predictions_per_seq', '?')} per instance"
        + (", whole words" if dcfg.get("do_whole_word_mask") else ""),
    ]
    lines += [f"- {split}" for split in [split_summary(data)] if split]
    if not vocab:  # how the corpus was read, said under the vocabulary when the run made one
        lines += [f"- note: {note}" for note in corpus_notes(dc.get("corpus", {}))]
    lines += [f"- **{warning}**" for warning in manifest_warnings(data)]
    masking = [dcfg.get(k) for k in ("max_seq_length", "max_predictions_per_seq", "masked_lm_prob")]
    if None not in masking and (warning := mask_cap_warning(*masking)):
        lines.append(f"- **{warning}**")
    lines += [
        "",
        "## Training",
        "",
        f"- model: L{bert.get('num_hidden_layers', '?')} H{bert.get('hidden_size', '?')} "
        f"A{bert.get('num_attention_heads', '?')}, vocabulary {bert.get('vocab_size', '?')}",
        f"- {trained.get('counts', {}).get('steps', 0):,} steps of {tcfg.get('train_batch_size')} "
        f"instances, learning rate {tcfg.get('learning_rate')} ({tcfg.get('optimizer')}), "
        f"{trained.get('precision', '?')} on {trained.get('device', '?')} x "
        f"{trained.get('processes', 1)}"
        + (", compiled" if trained.get("compiled") else "")
        + (", packed batches" if trained.get("packed") else ""),
        f"- throughput: {speed:,.0f} tokens/s" + (f", MFU {mfu:.1%}" if mfu else "")
        if speed
        else "- throughput: –",
    ]
    options = [f"--{k.replace('_', '-')}" for k in SPEED_OPTIONS if tcfg.get(k)]
    tuned = tune_record(out / dirs["train"] / "tune.json")
    if options or tuned:
        chosen = ""
        if tuned:
            chosen = f", chosen by --tune ({tuned.get('speedup', 1.0):.2f}x the default step)"
        lines.append(f"- speed options: {' '.join(options) or 'the defaults'}{chosen}")
    if tcfg.get("init_checkpoint"):
        lines.append(
            f"- continued from {tcfg['init_checkpoint']}"
            + embeddings_note(bool(tcfg.get("transfer_vocab")), trained.get("embeddings"))
        )
    lines.append("")
    if last:
        lines += [
            f"### Held-out evaluation (step {last['step']})",
            "",
            "| metric | value |",
            "|---|---|",
            f"| masked LM accuracy | {last['masked_lm_accuracy']:.4f} |",
            f"| unigram baseline (best constant guess) | "
            f"{last.get('masked_lm_unigram_baseline', float('nan')):.4f} |",
            f"| masked LM loss | {last['masked_lm_loss']:.4f} |",
            f"| next sentence accuracy | {last['next_sentence_accuracy']:.4f} |",
            f"| next sentence loss | {last['next_sentence_loss']:.4f} |",
            "",
        ]
        note = not_learned_note(last["masked_lm_accuracy"], last.get("masked_lm_unigram_baseline"))
        lines += [f"Note: {note}", ""] if note else []
    lines += [f"![{Path(i).stem}]({i})" for i in images]
    files = sorted(exported.get("outputs", {}))
    lines += ["", "## Exported model", "", f"`{model}`: {', '.join(files)}", ""]
    write_text(out / "report.md", "\n".join(lines))
    return Summary(
        model=model,
        steps=trained.get("counts", {}).get("steps", 0),
        masked_lm_accuracy=last.get("masked_lm_accuracy"),
        unigram_baseline=last.get("masked_lm_unigram_baseline"),
        next_sentence_accuracy=last.get("next_sentence_accuracy"),
        tokens_per_second=speed,
        mfu=mfu,
    )
