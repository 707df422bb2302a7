"""`bertforge run CORPUS... --output DIR`: vocab -> data -> train -> export, then report.md.

The pipeline is the four stage commands with their outputs wired together (DIR/vocab,
DIR/data, DIR/train, DIR/model): each stage's own code runs, writes its own manifest, checks
its own inputs. What run adds:

- Settings given once. Every stage flag is a run flag; one that several stages use goes to
  each (--input, --cased, --max-seq-length, --random-seed), and the paths between stages are
  set by run (a TOML section that sets one of them is refused). Names that mean different
  things in two stages get the stage as prefix (export's --format is --export-format).
- Skipping and resuming. DIR/run.json records, per stage, the settings it last ran with, the
  corpus files it read (names, sizes, times and sha256: `corpus_change`) and the sha256 of
  the manifest it wrote. A stage is skipped when its settings, its corpus, its manifest and
  everything upstream are unchanged; a stage that was cut off resumes (data and train resume
  by themselves); training also resumes when only settings it can resume with changed
  (--num-train-steps, logging, ...).
  Anything else starts the stage, and all after it, over; but a run that would start a
  trained model over from step 0, deleting its checkpoints, is refused before any stage runs
  (`check_training_kept`), as `bertforge train` refuses to resume with other settings.
- Many processes. Under torchrun, process 0 runs the pipeline; the others wait for it to
  reach training, train with it, and leave export and the report to it (`run_many`).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertforge.config import (
    STAGES,
    DataConfig,
    FieldSpec,
    RunConfig,
    add_field_argument,
    build_config,
    changed_settings,
    config_to_dict,
    describe_changes,
    field_specs,
)
from bertforge.corpus import (
    STDIN,
    corpus_change,
    is_stream,
    resolve_inputs,
    restamped,
    stamped,
    with_digests,
)
from bertforge.errors import UserError
from bertforge.fileio import (
    MANIFEST,
    RUN_STATE,
    edited_outputs,
    holds_files,
    output_lock,
    read_manifest,
    refuse_other_stage,
    sha256_file,
    write_json,
)
from bertforge.report import Summary, not_learned_note, write_report

ORDER = ("vocab", "data", "train", "export")
DIRS = {"vocab": "vocab", "data": "data", "train": "train", "export": "model"}
# Set by run itself: the corpus and the paths from one stage to the next.
WIRED = {
    "vocab": {"input", "output"},
    "data": {"input", "vocab", "output"},
    "train": {"data", "output", "vocab"},
    "export": {"checkpoint", "output", "vocab"},
}
# Stage settings that `bertforge run` does not take (the stage command alone does).
STAGE_ONLY = {"train": {"resume_google"}}
# Stages that continue where they were cut off (the others are quick and start again).
RESUMES = {"data", "train"}
# Settings that do not change a stage's output (--peak-tflops only what the log calls MFU).
COSMETIC = {"progress", "overwrite", "peak_tflops"}


# ----------------------------------------------------------------------------- flags


@dataclass(frozen=True)
class RunFlag:
    """One run flag: the field it sets in each stage that has it."""

    spec: FieldSpec  # named as the flag's dest
    targets: tuple[tuple[str, str], ...]  # (stage, field)


def run_flags() -> list[RunFlag]:
    """The stage flags of `bertforge run`: shared names merged, clashing names prefixed."""
    own = {s.name for s in field_specs(RunConfig)}
    by_name: dict[str, list[tuple[str, FieldSpec]]] = {}
    for stage in ORDER:
        for spec in field_specs(STAGES[stage]):
            if spec.name not in WIRED[stage] | STAGE_ONLY.get(stage, set()) | own:
                by_name.setdefault(spec.name, []).append((stage, spec))
    flags = []
    for name, uses in by_name.items():
        first = uses[0][1]
        same = [(st, sp) for st, sp in uses if (sp.kind, sp.choices) == (first.kind, first.choices)]
        flags.append(
            RunFlag(
                dataclasses.replace(first, required=False, default=None),
                tuple((st, name) for st, _ in same),
            )
        )
        for stage, spec in uses:
            if (stage, spec) not in same:
                flags.append(
                    RunFlag(
                        dataclasses.replace(
                            spec,
                            name=f"{stage}_{name}",
                            required=False,
                            default=None,
                            metadata={},
                        ),
                        ((stage, name),),
                    )
                )
    return flags


def add_run_arguments(parser: argparse.ArgumentParser) -> list[RunFlag]:
    flags = run_flags()
    for flag in flags:
        stages = ", ".join(dict.fromkeys(st for st, _ in flag.targets))
        add_field_argument(parser, flag.spec, note=f"; stage: {stages}")
    return flags


def stage_configs(
    run: RunConfig,
    toml: Mapping[str, Mapping[str, Any]],
    flag_values: Mapping[str, Any],
    config_path: str | None = None,
) -> dict[str, Any]:
    """Each stage's config: its defaults < its TOML section < run flags < run's wiring.

    Paths are made absolute, so the same run started from another directory is recognised."""
    out = Path(run.output).resolve()
    corpus = tuple(
        p if p == "-" or glob.has_magic(p) else str(Path(p).resolve()) for p in run.input
    )
    vocab = str(Path(run.vocab).resolve()) if run.vocab else str(out / DIRS["vocab"])
    wiring: dict[str, dict[str, Any]] = {
        "vocab": {"input": corpus, "output": str(out / DIRS["vocab"])},
        "data": {
            "input": corpus,
            "vocab": vocab,
            "output": str(out / DIRS["data"]),
        },
        "train": {"data": str(out / DIRS["data"]), "output": str(out / DIRS["train"])},
        "export": {"checkpoint": str(out / DIRS["train"]), "output": str(out / DIRS["export"])},
    }
    per_stage: dict[str, dict[str, Any]] = {stage: {} for stage in ORDER}
    for flag in run_flags():
        if flag.spec.name in flag_values:
            for stage, name in flag.targets:
                per_stage[stage][name] = flag_values[flag.spec.name]
    configs = {}
    for stage in ORDER:
        section = dict(toml.get(stage, {}))
        for key in section:
            if key.replace("-", "_") in WIRED[stage]:
                raise UserError(
                    f"{config_path} [{stage}]: {key} is set by bertforge run (the corpus and the "
                    "paths between stages); remove it from the file."
                )
            if key.replace("-", "_") in STAGE_ONLY.get(stage, set()):
                raise UserError(
                    f"{config_path} [{stage}]: {key} is for `bertforge {stage}` alone, not "
                    "bertforge run; remove it from the file."
                )
        values = {**per_stage[stage], **wiring[stage], "progress": run.progress}
        if stage == "export":
            values.pop("progress")
        source = f"{config_path} [{stage}]" if config_path else "config file"
        configs[stage] = build_config(STAGES[stage], section, values, source=source)
    return configs


def plan(
    run: RunConfig,
    toml: Mapping[str, Mapping[str, Any]],
    flag_values: Mapping[str, Any],
    config_path: str | None = None,
) -> tuple[RunConfig, dict[str, Any]]:
    """The run and its stage configs (`stage_configs`), checked before anything runs.

    Continued pretraining (train's --init-checkpoint) without --vocab uses the checkpoint's
    vocabulary: one trained anew would not match its embeddings, and train would only find
    that out after the vocab and data stages (hours on a large corpus). With --transfer-vocab
    the run trains its own vocabulary (or takes --vocab) and train maps the embeddings to it.
    A run whose vocabulary is given refuses flags that only the skipped vocab stage reads."""
    if streams := [path for path in run.input if is_stream(path)]:
        what = "standard input" if streams[0] == STDIN else "a pipe"
        raise UserError(
            f"CORPUS {streams[0]}: bertforge run cannot read the corpus from {what} (it reads "
            "the corpus in two stages, and tells an unchanged corpus by its files); save it to "
            "a file first (compressed files are read as they are), or run the stage commands."
        )
    configs = stage_configs(run, toml, flag_values, config_path)
    init = configs["train"].init_checkpoint
    own = Path(configs["train"].output).resolve()
    if init and Path(init).resolve().is_relative_to(own):
        raise UserError(
            f"--init-checkpoint {init} is this run's own training directory, which its train "
            "stage would start over (deleting the checkpoint); continue into another --output, "
            f"e.g. --output {Path(run.output).name}-2 --init-checkpoint {init}."
        )
    transfer = configs["train"].transfer_vocab
    if run.vocab is None and init and not transfer:
        from bertforge.checkpoint import checkpoint_source, vocab_beside  # imports torch

        vocab = vocab_beside(checkpoint_source(init, "--init-checkpoint"))
        if vocab is None:
            raise UserError(
                f"--init-checkpoint: no vocab.txt or tokenizer.json beside {init}; continued "
                "pretraining keeps the checkpoint's vocabulary: give it with --vocab (and "
                "--cased or --lowercase)."
            )
        run = dataclasses.replace(run, vocab=str(vocab.parent))
        configs = stage_configs(run, toml, flag_values, config_path)
    elif run.vocab is not None and init and not transfer:  # checked now, not after data
        from bertforge.checkpoint import checkpoint_source, vocab_beside
        from bertforge.tokenization import check_init_vocab, find_vocab_file, read_vocab_file

        theirs = vocab_beside(checkpoint_source(init, "--init-checkpoint"))
        ours = find_vocab_file(run.vocab)
        if theirs is not None:
            check_init_vocab(read_vocab_file(ours), ours, theirs)
    check_stages_agree(configs, run.vocab is None, config_path)
    if run.vocab is not None:  # its casing known, its files readable: before any stage runs
        from bertforge.tokenization import load_vocab

        load_vocab(run.vocab, configs["data"].do_lower_case)
    if init and not configs["train"].bert_config:
        check_init_shape(init, configs["train"].model_size, configs["data"].max_seq_length)
    if run.vocab is not None:
        for flag in run_flags():
            if flag.spec.name in flag_values and {st for st, _ in flag.targets} == {"vocab"}:
                raise UserError(
                    f"{flag.spec.flag}: only the vocab stage reads it, and this run uses the "
                    f"vocabulary {run.vocab} instead of training one; drop the flag."
                )
    return run, configs


def check_init_shape(init: str, model_size: str | None, max_seq_length: int) -> None:
    """What train would refuse of --init-checkpoint's shape, checked before the vocab and data
    stages run (hours on a corpus), from the config beside it (its weights are not read)."""
    from bertforge.checkpoint import checkpoint_source, config_beside  # imports torch
    from bertforge.train import check_model_size

    shape = config_beside(checkpoint_source(init, "--init-checkpoint"))
    if shape is None:
        return
    check_model_size(model_size, shape)
    if shape.max_position_embeddings < max_seq_length:
        raise UserError(
            f"--max-seq-length {max_seq_length}: the model of --init-checkpoint {init} has "
            f"{shape.max_position_embeddings} positions; give --max-seq-length "
            f"{shape.max_position_embeddings} or less."
        )


def check_stages_agree(
    configs: Mapping[str, Any], own_vocab: bool, config_path: str | None
) -> None:
    """Settings that several stages hold must agree: train checks the data's length, masks and
    casing against its own flags, and the data its casing against the vocabulary's. A run
    flag sets every stage at once; a config file's sections may not, and before, the clash
    stopped the run at the later stage, after the earlier ones had run (hours on a corpus)."""
    vocab, data, train = configs["vocab"], configs["data"], configs["train"]
    shared = [
        ("max_seq_length", ("data", data.max_seq_length), ("train", train.max_seq_length)),
        ("max_predictions_per_seq", ("data", data.resolved_max_predictions),
         ("train", train.max_predictions_per_seq)),
        ("do_lower_case", ("vocab", vocab.do_lower_case if own_vocab else None),
         ("data", data.do_lower_case), ("train", train.do_lower_case)),
    ]  # fmt: skip
    where = f"{config_path}: " if config_path else ""
    for name, *holders in shared:
        given = [(stage, value) for stage, value in holders if value is not None]
        if len({value for _, value in given}) > 1:
            said = " but ".join(f"[{stage}] {name} is {json.dumps(v)}" for stage, v in given)
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{where}{said}; the stages must agree ({given[-1][0]} reads what "
                f"{given[0][0]} makes); set it once, in [{given[0][0]}] or with {flag}, and "
                f"leave it out of [{given[-1][0]}]."
            )


# ----------------------------------------------------------------------------- pipeline


@dataclass
class RunResult:
    output: Path
    ran: list[str]
    skipped: list[str]
    summary: Summary


def settings_key(cfg: Any) -> dict[str, Any]:
    """The settings a stage's record keeps, resolved where a default depends on others (the
    data stage's masking cap on the length), so a default that came to depend on them does
    not make a finished stage look changed."""
    key = {k: v for k, v in config_to_dict(cfg).items() if k not in COSMETIC}
    if isinstance(cfg, DataConfig):
        key["max_predictions_per_seq"] = cfg.resolved_max_predictions
    return key


def corpus_files(cfg: Any) -> list[dict[str, Any]] | None:
    """The corpus files a stage reads, by name, size and modification time (`stamped`), or
    None for a stage that reads no corpus."""
    return stamped(resolve_inputs(cfg.input)) if hasattr(cfg, "input") else None


def recorded_corpus(record: dict[str, Any], directory: Path, default: Any) -> Any:
    """The corpus files a stage last ran on: from run.json, or for a run.json written before
    bertforge recorded them, from the stage's manifest (`default` when neither says)."""
    if "corpus" in record:
        return record["corpus"]
    manifest = read_manifest(directory) if (directory / MANIFEST).is_file() else None
    return manifest.get("inputs", default) if manifest else default


def within_run(key: dict[str, Any]) -> dict[str, Any]:
    """A stage's settings with the paths inside its run directory written relative to it
    (`<run>/vocab`): the stages are wired by absolute paths, and a run directory moved or
    copied (another disk, another machine) is the same run. Before, every stage of a moved
    run started over, its training from step 0 (its checkpoints deleted)."""
    top = str(Path(key["output"]).parent) if isinstance(key.get("output"), str) else None

    def inside(value: Any) -> Any:
        if top is None or not isinstance(value, str):
            return value
        return "<run>" + value[len(top) :] if value.startswith(top + os.sep) else value

    return {k: inside(v) for k, v in key.items()}


def decide(
    stage: str, cfg: Any, record: dict[str, Any] | None, directory: Path, upstream: str | None
) -> tuple[str, str]:
    """skip, resume or start, and why a stage starts over (`upstream`: why the first earlier
    stage that runs does, None when none runs)."""
    if upstream is not None:
        return "start", upstream
    if record is None:
        return "start", "run.json has no record of it"
    old, new = within_run(record["config"]), within_run(settings_key(cfg))
    manifest = directory / MANIFEST
    changed = changed_settings(old, new, type(cfg))
    if not changed:
        if record.get("done"):
            if not (manifest.is_file() and sha256_file(manifest) == record.get("manifest_sha256")):
                return "start", f"its {MANIFEST} is not the one it wrote"
            if stage == "data" and (why := vocabulary_changed(cfg, directory)):
                return "start", why
            return "skip", ""
        return "resume", ""
    if stage == "train":
        from bertforge.train import RESUMABLE

        changed = changed_settings(old, new, type(cfg), ignore=RESUMABLE)
        if not changed:
            return "resume", ""
    return "start", describe_changes(old, new, changed, type(cfg))


def vocabulary_changed(cfg: DataConfig, directory: Path) -> str | None:
    """Why finished data no longer holds its vocabulary's ids: the vocab.txt it was made with
    changed since (words written into [unused] slots by hand); None while it is the same."""
    made = ((read_manifest(directory) or {}).get("vocab") or {}).get("sha256")
    if made is None or cfg.vocab is None:
        return None
    from bertforge.tokenization import find_vocab_file

    try:
        path = find_vocab_file(Path(cfg.vocab), "--vocab")
    except UserError:  # gone: the stage's own run says so
        return None
    if sha256_file(path) == made:
        return None
    return f"its vocabulary changed: {path} is not the one the data was made with"


def plan_stages(
    run: RunConfig, configs: dict[str, Any], state: dict[str, Any], out: Path
) -> dict[str, tuple[str, str, list[dict[str, Any]] | None]]:
    """Each stage's (action, why it starts over, the corpus files it reads), decided before
    any stage runs: skip, resume or start (`decide`); a stage after one that runs starts over.
    A corpus that changed drops the stage's record (its notes printed here)."""
    plans = {}
    upstream: str | None = "--overwrite" if run.overwrite else None
    for stage in ORDER:
        cfg, directory = configs[stage], out / DIRS[stage]
        if stage == "vocab" and run.vocab:
            continue
        record = state.get(stage)
        corpus = corpus_files(cfg)
        if (
            record
            and corpus is not None
            and (how := corpus_change(recorded_corpus(record, directory, corpus), corpus))
        ):
            changed = f"the corpus changed ({how})"
            if stage == "data" and not record.get("done"):  # fixed after an error: resumed,
                # the data stage keeps what it can (`data.run_units`)
                print(f"run: data: {changed}; its shards whose text is unchanged are kept",
                      file=sys.stderr)  # fmt: skip
            else:
                print(f"run: {stage}: {changed}", file=sys.stderr)
                record = None
                upstream = upstream or changed
        action, why = decide(stage, cfg, record, directory, upstream)
        if action == "resume" and stage not in RESUMES:
            action, why = "start", "it was cut off"  # quick stages simply run again
        if action != "skip" and upstream is None:
            upstream = f"the {stage} stage runs again" + (f" ({why})" if why else "")
        plans[stage] = (action, why, corpus)
    return plans


def check_edits_kept(plans: dict[str, tuple[str, str, Any]], run: RunConfig, out: Path) -> None:
    """Refuse, before any stage runs, to write a stage's output again over files edited or
    replaced by hand since it wrote them: the vocabulary's vocab.txt (words written into its
    [unused] slots), the export's files (a model fine-tuned and saved there). The edits would
    be gone without a word."""
    if run.overwrite:
        return
    for stage, names in (("vocab", ["vocab.txt"]), ("export", None)):
        plan = plans.get(stage)
        if plan is None or plan[0] == "skip":
            continue
        directory = out / DIRS[stage]
        if not (changed := edited_outputs(directory, names)):
            continue
        what = ", ".join(p.name for p in changed)
        keep = (
            "copy its directory out of the run and give it with --vocab; to make it anew, "
            "pass --overwrite (every stage runs again)"
            if stage == "vocab"
            else f"move them out of {directory}, and rerun"
        )
        raise UserError(
            f"--output: this run would write {directory} again, because {plan[1]}, and its "
            f"{what} changed since the {stage} stage wrote it: the changes would be lost. "
            f"Nothing was changed. To keep them, {keep}."
        )


def check_training_kept(plans: dict[str, tuple[str, str, Any]], run: RunConfig, out: Path) -> None:
    """Refuse, before any stage runs, a run that would start a trained model over: training
    from step 0 deletes the checkpoints of its directory, which may hold days of training.
    `bertforge train` refuses to resume with other settings; run must not quietly do more."""
    from bertforge.checkpoint import list_checkpoints

    action, why, _ = plans["train"]
    directory = out / DIRS["train"]
    checkpoints = list_checkpoints(directory) if directory.is_dir() else []
    if action != "start" or run.overwrite or not checkpoints:
        return
    own = why.startswith("--")  # training's own settings, not an earlier stage's
    vocab = plans.get("vocab")
    edited = (
        vocab is not None
        and vocab[0] == "skip"
        and edited_outputs(out / DIRS["vocab"], ["vocab.txt"])
    )
    again = ", the vocabulary too, without the edits of its vocab.txt" if edited else ""
    raise UserError(
        f"--output: this run would start the training in {directory} over from step 0 and "
        f"delete its checkpoints (the last: {checkpoints[-1].name}), because {why}. Nothing was "
        "changed. To keep them, rerun as they were trained (the same corpus and settings). To "
        f"train anew: delete {directory} (or pass --overwrite: every stage runs again{again}), "
        "or give another --output."
        + (
            f" To go on from their weights with the new settings: --init-checkpoint "
            f"{checkpoints[-1]} with another --output."
            if own
            else ""
        )
    )


def run_pipeline(
    run: RunConfig,
    configs: dict[str, Any],
    runners: Mapping[str, Callable[[Any], None]],
    keep_training: bool = True,
) -> RunResult:
    """The stages in turn. `keep_training`: refuse to start a trained model over
    (`check_training_kept`); the demo, whose model is a throwaway, retrains instead."""
    with output_lock(run.output, "run", "--output"):
        return _run_pipeline(run, configs, runners, keep_training)


def _run_pipeline(
    run: RunConfig,
    configs: dict[str, Any],
    runners: Mapping[str, Callable[[Any], None]],
    keep_training: bool,
) -> RunResult:
    out = Path(run.output)  # `output_lock` has refused a file of that name
    state_path = out / RUN_STATE
    if out.is_dir() and holds_files(out):  # as `prepare_output_dir`, with the run's record
        refuse_other_stage(out, "run", "--output")
        if not state_path.is_file() and not run.overwrite:
            raise UserError(
                f"--output: {out} is not empty and is not a bertforge run; choose another "
                "directory or pass --overwrite."
            )
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = read_state(state_path) if not run.overwrite else {}
    plans = plan_stages(run, configs, state, out)
    if keep_training:
        check_edits_kept(plans, run, out)
        check_training_kept(plans, run, out)
    ran: list[str] = []
    skipped: list[str] = []
    for stage in ORDER:
        cfg = configs[stage]
        directory = out / DIRS[stage]
        if stage == "vocab" and run.vocab:
            print(f"run: vocab: using {run.vocab}", file=sys.stderr)
            state.pop("vocab", None)
            continue
        action, _, corpus = plans[stage]
        if action == "skip":
            skipped.append(stage)
            if stage == "vocab" and edited_outputs(directory, ["vocab.txt"]):
                print(f"run: vocab: kept {directory}, whose vocab.txt is not the one the "
                      "stage wrote (edited by hand?): the stages after it read it as it is",
                      file=sys.stderr)  # fmt: skip
            else:
                print(f"run: {stage}: unchanged, kept {directory}", file=sys.stderr)
            if corpus is not None and restamped(state[stage].get("corpus"), corpus):
                state[stage]["corpus"] = with_digests(corpus)  # found the same: not read again
                write_json(state_path, state)
            continue
        print(
            f"run: {stage}: {'resuming' if action == 'resume' else 'running'} -> {directory}",
            file=sys.stderr,
        )
        cfg = dataclasses.replace(cfg, overwrite=action == "start")
        if corpus is not None:
            corpus = with_digests(corpus)
        state[stage] = {"config": settings_key(cfg), "corpus": corpus, "done": False}
        write_json(state_path, state)
        started = time.monotonic()
        runners[stage](cfg)
        state[stage]["seconds"] = round(time.monotonic() - started, 1)
        state[stage]["done"] = True
        state[stage]["manifest_sha256"] = sha256_file(directory / MANIFEST)
        write_json(state_path, state)
        ran.append(stage)
    summary = write_report(out, DIRS)
    print_summary(summary, out)
    return RunResult(out, ran, skipped, summary)


def run_many(
    run: RunConfig,
    configs: dict[str, Any],
    runners: Mapping[str, Callable[[Any], None]],
    keep_training: bool = True,
) -> None:
    """`bertforge run` under torchrun: process 0 runs the pipeline; the others wait (in a
    group that waits for days: making the data can take hours) until it reaches the train
    stage, train with it, and leave export and the report to it. Process 0 tells them one
    word: 'start' or 'resume' (train, from scratch or from the last checkpoint) or 'none'
    (training was kept as it is, or an earlier stage stopped)."""
    from bertforge import distributed

    d = distributed.setup(configs["train"].device)
    group = distributed.waiting_group(d)
    if d.main:
        told = False

        def train_together(cfg: Any) -> None:
            nonlocal told
            told = True
            distributed.broadcast_word("start" if cfg.overwrite else "resume", d, group)
            runners["train"](cfg)

        try:
            run_pipeline(run, configs, {**runners, "train": train_together}, keep_training)
        finally:
            if not told:
                distributed.broadcast_word("none", d, group)
    else:
        word = distributed.broadcast_word(None, d, group)
        if word != "none":
            runners["train"](dataclasses.replace(configs["train"], overwrite=word == "start"))
    distributed.shutdown(d)  # on success only (`distributed.leave`)


def print_summary(s: Summary, out: Path) -> None:
    print(f"run: done -> {out / 'report.md'}")
    if s.masked_lm_accuracy is not None:
        print(
            f"  held-out masked LM accuracy {s.masked_lm_accuracy:.1%} (unigram baseline "
            f"{s.unigram_baseline or 0:.1%}), next sentence accuracy "
            f"{s.next_sentence_accuracy or 0:.1%} after {s.steps:,} steps"
        )
        if note := not_learned_note(s.masked_lm_accuracy, s.unigram_baseline):
            print(f"  note: {note}")
    if s.tokens_per_second:
        mfu = f" (MFU {s.mfu:.1%})" if s.mfu else ""
        print(f"  training throughput {s.tokens_per_second:,.0f} tokens/s{mfu}")
    print(f"  model: {s.model} (transformers AutoModel / flair TransformerWordEmbeddings)")


def read_state(path: Path) -> dict[str, Any]:
    """run.json, or nothing when absent or damaged (then every stage starts over)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return state if isinstance(state, dict) else {}
