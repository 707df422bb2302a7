"""`bertforge <stage>`: parse flags (+ an optional TOML file) into a stage config, call the stage.

The flags themselves are generated from the config dataclasses in config.py; this module only
wires subcommands to stage functions and turns UserError into one line on stderr (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from bertforge import __version__
from bertforge.config import (
    SECTIONS,
    STAGES,
    TOOLS,
    DataConfig,
    EmbedConfig,
    ExportConfig,
    FillMaskConfig,
    RunConfig,
    TrainConfig,
    VocabConfig,
    VocabExtendConfig,
    add_config_arguments,
    build_config,
    fold_positionals,
    normalize_argv,
    read_toml,
    unknown_flags_error,
)
from bertforge.errors import UserError
from bertforge.fileio import os_error_message


def demo_corpus() -> Path:
    """Path of the bundled King James Bible corpus (gzip, Google's format)."""
    return Path(str(resources.files("bertforge") / "demo" / "kjv.txt.gz"))


def run_vocab(cfg: VocabConfig) -> None:
    from bertforge.vocab import train_vocab

    result = train_vocab(cfg)
    s, q = result.stats, result.quality.as_dict()
    casing = "uncased" if cfg.do_lower_case else "cased"
    print(f"vocab: {len(result.tokens)} tokens ({cfg.algorithm}, {casing}) -> "
          f"{result.output / 'vocab.txt'}")  # fmt: skip
    print(
        f"  corpus: {s.files} file(s), {s.documents:,} documents, {s.sentences:,} sentences, "
        f"{s.bytes / 1e6:.1f} MB; trained on {result.sampled_sentences:,} sentences, "
        f"alphabet {result.alphabet_size} characters"
    )
    if q["sentences"]:
        print(
            f"  quality on {q['sentences']:,} held-out sentences: [UNK] {q['unk_rate']:.3%}, "
            f"{q['pieces_per_word']:.3f} pieces/word, {q['vocab_used']:.1%} of the vocab used"
        )
    for w in result.warnings:
        print(w, file=sys.stderr)


def run_data(cfg: DataConfig) -> None:
    from bertforge.data import create_data, mask_cap_warning, print_summary

    if warning := mask_cap_warning(
        cfg.max_seq_length, cfg.resolved_max_predictions, cfg.masked_lm_prob
    ):
        print(warning, file=sys.stderr)  # before the work: a long run can be stopped and fixed
    print_summary(create_data(cfg))


def run_train(cfg: TrainConfig) -> None:
    from bertforge.train import train

    result = train(cfg)
    if result.stop_signal is not None:
        raise SystemExit(128 + result.stop_signal)  # 130 for Ctrl-C, 143 for SIGTERM


def run_export(cfg: ExportConfig) -> None:
    from bertforge.export import export, print_summary

    print_summary(export(cfg))


def run_embed(cfg: EmbedConfig) -> None:
    from bertforge.embed import embed

    embed(cfg)


def run_fill_mask(cfg: FillMaskConfig) -> None:
    from bertforge.inference import run_fill_mask as fill

    fill(cfg)


RUNNERS: dict[str, Callable[[Any], None]] = {
    "vocab": run_vocab,
    "data": run_data,
    "train": run_train,
    "export": run_export,
    "embed": run_embed,
    "fill-mask": run_fill_mask,
}


def data_tool(argv: list[str]) -> None:
    """`bertforge data verify DIR`, `bertforge data inspect PATH` and `bertforge data convert`."""
    from bertforge import datacheck

    parser = argparse.ArgumentParser(prog="bertforge data")
    sub = parser.add_subparsers(dest="tool", required=True)
    v = sub.add_parser("verify", help="check every shard against the manifest (sha256, records)")
    v.add_argument("directory")
    i = sub.add_parser("inspect", help="show instances as tokens, then statistics")
    i.add_argument("path", nargs="+", help="a data directory, or TFRecord files (globs, comma "
                   "lists, or several)")  # fmt: skip
    i.add_argument("-n", type=int, default=5, help="instances to show (5)")
    i.add_argument("--vocab", help="vocab.txt or directory (default: the data's own vocab)")
    i.add_argument("--max-records", type=int, default=100_000,
                   help="statistics over at most this many records (100000)")  # fmt: skip
    c = sub.add_parser("convert", help="Google's TFRecords -> native shards for train (streaming)")
    c.add_argument("input", nargs="+", help="TFRecord files (globs, comma lists, or several)")
    c.add_argument(
        "--vocab", required=True, help="the vocab.txt (or directory) they were made with"
    )
    c.add_argument("--output", required=True, help="the data directory to write")
    casing = c.add_mutually_exclusive_group()
    casing.add_argument(
        "--do-lower-case",
        "--lowercase",
        dest="lower",
        action="store_const",
        const=True,
        help="the vocabulary is uncased (when it does not say)",
    )
    casing.add_argument(
        "--no-do-lower-case",
        "--cased",
        dest="lower",
        action="store_const",
        const=False,
        help="the vocabulary is cased (when it does not say)",
    )
    c.add_argument("--overwrite", action="store_true", help="replace an earlier conversion")
    c.add_argument(
        "--workers",
        type=int,
        help="processes decoding records (default: every CPU this process may use)",
    )
    args, unknown = parser.parse_known_args(argv)
    if args.tool == "verify" and unknown and not any(u.startswith("-") for u in unknown):
        raise UserError(f"data verify takes one data directory; got {args.directory}, "
                        f"{', '.join(unknown)}.")  # fmt: skip
    if unknown:  # named under the tool's usage, not `bertforge data [-h] {verify,...}`'s
        raise unknown_flags_error(unknown, {"verify": v, "inspect": i, "convert": c}[args.tool])
    for name in ("path", "input"):  # several files (an unquoted glob): a comma list
        if isinstance(getattr(args, name, None), list):
            setattr(args, name, ",".join(getattr(args, name)))
    if args.tool == "inspect" and args.n < 0:
        raise UserError("-n: must be 0 or more.")
    if args.tool == "inspect" and args.max_records < 1:
        raise UserError("--max-records: must be 1 or more.")
    if args.tool == "convert" and (args.workers or 0) < 0:
        raise UserError("--workers: must be 0 or more (0: every usable CPU).")
    if args.tool == "convert":
        m = datacheck.convert(
            args.input, args.vocab, args.output, args.lower, args.overwrite, args.workers
        )
        print(f"data: {m['counts']['instances']:,} instances in {len(m['shards'])} shard(s) "
              f"(native, static masking, from TFRecords) -> {args.output}")  # fmt: skip
    elif args.tool == "verify":
        result = datacheck.verify(args.directory)
        print(f"{args.directory}: ok, {result['shards']} shard(s), {result['records']:,} records "
              "match the manifest")  # fmt: skip
    else:
        datacheck.inspect(args.path, args.n, args.vocab, args.max_records)


def vocab_extend(argv: list[str]) -> None:
    """`bertforge vocab extend`: new words over a vocabulary's [unusedN] lines."""
    from bertforge.corpus import corpus_notes, corpus_warnings
    from bertforge.vocab import extend_vocab

    parser = argparse.ArgumentParser(
        prog="bertforge vocab extend", description=VocabExtendConfig.__doc__
    )
    add_config_arguments(parser, VocabExtendConfig)
    args, unknown = parser.parse_known_args(normalize_argv(argv, [VocabExtendConfig]))
    unknown = fold_positionals(args, unknown, VocabExtendConfig)
    if unknown:
        raise unknown_flags_error(unknown, parser)
    cfg = build_config(VocabExtendConfig, {}, vars(args), source="flags")
    result = extend_vocab(cfg)
    base, before, after = result.base, result.before.as_dict(), result.after.as_dict()
    print(
        f"vocab extend: {len(result.added)} new word(s) over the {result.slots} [unusedN] "
        f"lines of {base.path} -> {result.output / 'vocab.txt'}"
    )
    for a in result.added[:10]:
        pieces = f"{a['pieces']} pieces" if a["pieces"] else "[UNK]"
        print(f"  {a['slot']} -> {a['word']} ({a['count']:,} in the sample, was {pieces})")
    if len(result.added) > 10:
        print(f"  ... ({len(result.added) - 10} more in manifest.json)")
    if result.rarer:
        print(f"  note: {result.rarer:,} other word(s) that the vocabulary splits were seen fewer "
              f"than --min-count {cfg.min_count} times in the sample; lower it to add them "
              "(a rare word's new embedding gets little training).")  # fmt: skip
    if result.already:
        more = ", ..." if len(result.already) > 5 else ""
        print(f"  --words: {len(result.already)} already in the vocabulary "
              f"({', '.join(result.already[:5])}{more})")  # fmt: skip
    if after["sentences"]:
        print(
            f"  on {after['sentences']:,} held-out sentences: {before['pieces_per_word']:.3f} -> "
            f"{after['pieces_per_word']:.3f} pieces/word, [UNK] {before['unk_rate']:.3%} -> "
            f"{after['unk_rate']:.3%}"
        )
    if result.added:
        print(
            f"  next: make the data with --vocab {result.output}, then train with "
            "--init-checkpoint (the new words start from the mean of their pieces' embeddings)."
        )
    else:  # a copy: nothing to make the data with that the checkpoint's own would not do
        print(f"  nothing added: {result.output} holds the words of {base.path} unchanged, so use "
              "that one (or lower --min-count, or list --words).")  # fmt: skip
    stats = result.stats.as_dict()
    for line in [*corpus_warnings(stats), *(f"note: {n}." for n in corpus_notes(stats))]:
        print(line, file=sys.stderr)


def demo_config() -> Path:
    """The demo's recipe (configs/demo.toml in the repository)."""
    return Path(str(resources.files("bertforge") / "demo" / "demo.toml"))


DEMO_PROMPTS = (
    "In the beginning God created the heaven and the [MASK].",
    "And the LORD spake unto [MASK], saying,",
    "The LORD is my [MASK]; I shall not want.",
)


def run_demo(output: str) -> None:
    from bertforge.inference import run_fill_mask as fill

    print(f"demo: King James Bible ({demo_corpus()}) -> {output}, settings {demo_config()}")
    run = RunConfig(input=(str(demo_corpus()),), output=output)
    run_pipeline_command(run, str(demo_config()), {}, keep_training=False)
    print("fill-mask with the trained model:")
    fill(FillMaskConfig(text=DEMO_PROMPTS, model=str(Path(output) / "model"), top_k=5))


def run_pipeline_command(
    run: RunConfig, config: str | None, flag_values: dict[str, Any], keep_training: bool = True
) -> None:
    from bertforge.run import plan, run_many, run_pipeline

    toml = read_toml(config) if config else {}
    run, configs = plan(run, toml, flag_values, config)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        run_many(run, configs, RUNNERS, keep_training)
    else:
        run_pipeline(run, configs, RUNNERS, keep_training)


def summary(cls: type) -> str:
    """The first sentence of a config's docstring, after the `bertforge X:` prefix."""
    text = " ".join((cls.__doc__ or "").split(":", 1)[-1].split())
    return re.split(r"\.(?:\s|$)", text)[0]


SUBTOOLS = {
    "vocab": "Also: `bertforge vocab extend` writes new words over a vocabulary's [unusedN] "
    "lines (see its --help).",
    "data": "Also: `bertforge data verify DIR`, `bertforge data inspect PATH` and `bertforge "
    "data convert TFRECORDS` (see their --help).",
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="bertforge",
        description="From your own text corpus to a pretrained BERT model.",
    )
    parser.add_argument("--version", action="version", version=f"bertforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers: dict[str, argparse.ArgumentParser] = {}
    for name, cls in STAGES.items():
        p = sub.add_parser(name, help=summary(cls), description=cls.__doc__,
                           epilog=SUBTOOLS.get(name))  # fmt: skip
        p.add_argument(
            "--config", metavar="FILE.toml", help=f"TOML file whose [{name}] section sets flags"
        )
        add_config_arguments(p, cls)
        subparsers[name] = p
    for name, cls in TOOLS.items():
        p = sub.add_parser(name, help=summary(cls), description=cls.__doc__)
        add_config_arguments(p, cls)
        subparsers[name] = p
    p = sub.add_parser("run", help=summary(RunConfig), description=RunConfig.__doc__)
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with [run] and stage sections")
    add_config_arguments(p, RunConfig)
    from bertforge.run import add_run_arguments

    add_run_arguments(p)
    subparsers["run"] = p
    p = sub.add_parser(
        "demo",
        help="run the pipeline on the bundled King James Bible corpus",
        description="`bertforge demo`: `bertforge run` on the bundled King James Bible corpus "
        "with its recipe (a tiny BERT, L2/H128, under 5 minutes on 2 CPU cores): vocabulary, data, "
        "training, export, report.md, then the model's guesses for a few masked verses.",
    )
    p.add_argument("--output", default="demo-output", help="output directory (demo-output)")
    subparsers["demo"] = p
    return parser, subparsers


def command_config(command: str) -> type:
    """The config dataclass of a command (`bertforge demo` has none of its own)."""
    return {**SECTIONS, **TOOLS}[command]


def dispatch(args: argparse.Namespace) -> None:
    command = args.command
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and command not in ("train", "run"):
        raise UserError(
            f"bertforge {command} runs in one process, and torchrun started {processes} of "
            "them (each would write the same files). Under torchrun, run `bertforge train`, "
            "or `bertforge run` for the whole pipeline (process 0 makes the vocabulary and "
            "data while the others wait, then all train)."
        )
    if command == "demo":
        run_demo(args.output)
        return
    values = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    config = getattr(args, "config", None)
    toml = read_toml(config, command) if config else {}
    try:
        if command == "run":
            own = {f.name for f in dataclasses.fields(RunConfig)}
            source = f"{config} [run]" if config else "config file"
            mine = {k: v for k, v in values.items() if k in own}
            run = build_config(RunConfig, toml.get("run", {}), mine, source=source)
            run_pipeline_command(run, config, {k: v for k, v in values.items() if k not in own})
            return
        source = f"{config} [{command}]" if config else "config file"
        cfg = build_config(command_config(command), toml.get(command, {}), values, source=source)
        RUNNERS[command](cfg)
    except UserError as e:
        sections = toml if command == "run" else {command: toml.get(command, {})}
        raise UserError(blamed(str(e), config, sections, values)) from None


def blamed(error: str, config: str | None, sections: dict[str, Any], given: dict[str, Any]) -> str:
    """An error naming a flag (`--vocab-size: ...`) that the command line did not give but
    the --config file set, with the file's line for it: the user looks there, not at the
    command."""
    flag = re.match(r"--([a-z][a-z0-9-]*)[:, ]", error)
    if config is None or flag is None or flag[1].replace("-", "_") in given:
        return error
    name = flag[1].replace("-", "_")
    lines = [f"[{section}] {key} = {json.dumps(value)}"
             for section, keys in sections.items() if isinstance(keys, dict)
             for key, value in keys.items() if key.replace("-", "_") == name]  # fmt: skip
    return f"{error} (set in {config}: {'; '.join(lines)})" if lines else error


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a batch system's time limit), handled as Ctrl-C is."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def process_group() -> Any:
    """bertforge.distributed where this process is one of a torchrun job's (in its process
    group), else None. torch.distributed must have been imported for a group to exist: the
    commands that never import torch stay free of it."""
    if "torch.distributed" not in sys.modules:
        return None
    from bertforge import distributed

    return distributed if distributed.grouped() else None


def ended(code: int) -> int:
    """The exit status `code`, after an error said: returned, or where this process is one of
    several, the process ends here, leaving the process group as it is (`distributed.leave`:
    the others may be waiting for this one inside a collective)."""
    if (group := process_group()) is not None:
        group.leave(code)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    on_term = None
    if threading.current_thread() is threading.main_thread():
        on_term = signal.signal(signal.SIGTERM, _terminate)  # training overrides it for its own
    try:
        if argv[:1] == ["data"] and argv[1:2] in (["verify"], ["inspect"], ["convert"]):
            data_tool(argv[1:])
            return 0
        if argv[:2] == ["vocab", "extend"]:
            vocab_extend(argv[2:])
            return 0
        argv = normalize_argv(argv, [*STAGES.values(), *TOOLS.values(), RunConfig])
        args, unknown = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        cls = command_config(args.command) if args.command != "demo" else None
        unknown = fold_positionals(args, unknown, cls)
        if unknown:
            raise unknown_flags_error(unknown, subparsers[args.command])
        dispatch(args)
    except UserError as e:
        print(f"bertforge: error: {e}", file=sys.stderr)
        return ended(2)
    except BrokenPipeError:  # `bertforge data inspect ... | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 128 + signal.SIGPIPE
    except OSError as e:  # the file system refused (full, read-only, permissions): no traceback
        print(f"bertforge: error: {os_error_message(e)}", file=sys.stderr)
        return ended(1)
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        how = "terminated" if term else "interrupted"
        print(f"bertforge: {how}; finished outputs are kept.", file=sys.stderr)
        return ended(128 + (signal.SIGTERM if term else signal.SIGINT))  # 143 or 130, as train
    except Exception as e:  # a bug, or torch's own error: Python's traceback, as always,
        if (group := process_group()) is None:  # but under torchrun printed here, to leave
            raise
        print(group.peer_gone(e) or traceback.format_exc().rstrip(), file=sys.stderr)
        return ended(1)
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
    return 0


if __name__ == "__main__":
    sys.exit(main())
