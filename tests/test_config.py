"""Config dataclasses -> flags, TOML sections, Google aliases, clear errors."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from bertforge.cli import main
from bertforge.config import (
    DataConfig,
    EmbedConfig,
    TrainConfig,
    VocabConfig,
    build_config,
    field_specs,
    fold_positionals,
    read_toml,
)
from bertforge.errors import UserError


def parse_vocab(argv: list[str]) -> VocabConfig:
    """Parse flags the way the CLI does, without running the stage."""
    import argparse

    from bertforge.config import add_config_arguments, normalize_argv

    p = argparse.ArgumentParser()
    add_config_arguments(p, VocabConfig)
    ns = p.parse_args(normalize_argv(argv, [VocabConfig]))
    return build_config(VocabConfig, {}, vars(ns))


def test_every_field_has_help_text():
    for spec in field_specs(VocabConfig):
        assert spec.help, f"{spec.name} has no docstring"


def test_config_is_frozen():
    cfg = VocabConfig(input=("a",), output="o")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vocab_size = 3  # type: ignore[misc]


def test_flags_and_google_aliases():
    cfg = parse_vocab(["--input_file=a.txt,b.txt", "--output", "o", "--vocab_size", "500"])
    assert cfg.input == ("a.txt", "b.txt") and cfg.vocab_size == 500
    assert parse_vocab(["--input", "a", "--output", "o", "--cased"]).do_lower_case is False
    assert (
        parse_vocab(["--input", "a", "--output", "o", "--do_lower_case=False"]).do_lower_case
        is False
    )
    assert (
        parse_vocab(["--input", "a", "--output", "o", "--nodo_lower_case"]).do_lower_case is False
    )
    assert (
        parse_vocab(["--input", "a", "--output", "o", "--no-strip-accents"]).strip_accents is False
    )
    assert parse_vocab(["--input", "a", "b", "--output", "o"]).input == ("a", "b")


def test_cased_and_lowercase_are_every_stages_casing_flags(monkeypatch):
    """vocab and run took --cased/--lowercase, while data, train and export answered them with
    "unknown argument" (and their errors told to pass --do-lower-case)."""
    from bertforge import cli

    seen = []
    for name in ("vocab", "data", "train", "export"):
        monkeypatch.setitem(cli.RUNNERS, name, seen.append)
    need = {"vocab": ["a", "--output", "o"], "data": ["a", "--vocab", "v", "--output", "o"],
            "train": ["--data", "d", "--output", "o"],
            "export": ["--checkpoint", "c", "--output", "o"]}  # fmt: skip
    for stage, argv in need.items():
        for flag, value in (
            ("--cased", False),
            ("--lowercase", True),
            ("--no-do-lower-case", False),
        ):
            assert cli.main([stage, *argv, flag]) == 0, (stage, flag)
            assert seen.pop().do_lower_case is value, (stage, flag)


def test_inputs_before_between_and_after_the_flags(monkeypatch, capsys, tmp_path):
    """A corpus is given as positional arguments, --input, or both, anywhere on the line, in
    the order given, except that positional inputs after a flag come after all of --input's;
    `vocab` and `data` take it positional as `run` does. Before, `--input b --output o a` read
    only a (the positional list replaced the flag's), and an input after a flag (`a --output
    o c`) was refused as an unexpected argument. With no input on the line, a --config
    file's is used (the first version of the folding emptied it)."""
    from bertforge import cli

    seen = []
    for name in ("vocab", "data", "fill-mask"):
        monkeypatch.setitem(cli.RUNNERS, name, seen.append)
    monkeypatch.setattr(cli, "run_pipeline_command", lambda run, *_: seen.append(run))
    monkeypatch.setattr(cli, "vocab_extend", lambda argv: seen.append(argv))
    data = ("--vocab", "v", "--output", "o")
    for argv, want in (
        (["vocab", "a", "--output", "o"], ("a",)),
        (["vocab", "--input", "b", "--output", "o", "a"], ("b", "a")),
        (["vocab", "a", "--input", "b", "--output", "o"], ("a", "b")),
        (["vocab", "a", "--output", "o", "c", "d"], ("a", "c", "d")),
        (["data", "a", *data, "-", "c"], ("a", "-", "c")),
        (["data", "a", *data, "c", "--input", "b,d"], ("a", "b", "d", "c")),  # after a flag: last
        (["run", "a", "--output", "o", "c", "--vocab-size", "500", "d"], ("a", "c", "d")),
    ):
        assert cli.main(argv) == 0, argv
        assert seen.pop().input == want, argv
    assert cli.main(["fill-mask", "x [MASK]", "--model", "m", "y [MASK]"]) == 0
    assert seen.pop().text == ("x [MASK]", "y [MASK]")
    toml = tmp_path / "c.toml"  # no input on the line: the file's is kept, not emptied
    toml.write_text('[run]\ninput = ["t"]\n[vocab]\ninput = ["t"]\noutput = "o"\n')
    assert cli.main(["vocab", "--config", str(toml)]) == 0
    assert seen.pop().input == ("t",)
    assert cli.main(["run", "--config", str(toml), "--output", "o"]) == 0
    assert seen.pop().input == ("t",)
    assert cli.main(["vocab", "a", "--config", str(toml)]) == 0  # the line over the file
    assert seen.pop().input == ("a",)
    assert cli.main(["vocab", "a", "--output", "o", "c", "--bogus"]) == 2
    assert "unknown argument '--bogus'" in capsys.readouterr().err
    assert cli.main(["demo", "x"]) == 2  # no positional: refused
    assert "unexpected argument 'x'; this command takes flags only" in capsys.readouterr().err
    assert cli.main(["export", "x", "--output", "o"]) == 2  # one path: the checkpoint
    assert "--checkpoint: x does not exist." in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ({"masked_lm_prob": 0.0}, "--masked-lm-prob: must be above 0 and below 1 (0.15 in BERT)."),
        ({"masked_lm_prob": 1.0}, "--masked-lm-prob: must be above 0 and below 1 (0.15 in BERT)."),
        ({"short_seq_prob": 1.5}, "--short-seq-prob: must be between 0 and 1."),
        ({"max_seq_length": 4}, "--max-seq-length: must be at least 5 ([CLS] a [SEP] b [SEP])."),
        ({"max_predictions_per_seq": 0}, "--max-predictions-per-seq: must be between 1 and "
         "max_seq_length - 3 = 125 (only that many tokens can be masked)."),
        ({"dupe_factor": 0}, "--dupe-factor: must be at least 1."),
        ({"google_compatible": True, "workers": 2}, "--workers: --google-compatible runs in "
         "one process, as Google's script does; drop one of the two."),
        ({"google_compatible": True, "unit_mb": 8.0}, "--unit-mb: --google-compatible reads "
         "the corpus as one unit (one shuffle over all of it), as Google's script does; drop "
         "one of the two."),
    ],
)  # fmt: skip
def test_data_settings_out_of_range_name_the_flag_and_the_range(setting, says):
    """Each data setting out of range is one error naming the flag and what it may be (0 was
    refused as "must be between 0 and 1" for --masked-lm-prob, which reads as allowed), and
    so is a flag --google-compatible would leave unused (it was ignored without a word)."""
    with pytest.raises(UserError) as e:
        DataConfig(input=("a",), vocab="v", output="o", **setting)
    assert str(e.value) == says


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ({"weight_decay": -0.01}, "--weight-decay: must be 0 or more (0.01 in BERT)."),
        ({"adam_epsilon": 0.0}, "--adam-epsilon: must be positive (1e-6 in BERT; 0 divides by "
         "zero for a weight whose gradients are all 0)."),
        ({"max_grad_norm": -1.0}, "--max-grad-norm: must be 0 (no clipping) or more."),
    ],
)  # fmt: skip
def test_optimizer_settings_out_of_range_name_the_flag(setting, says):
    """A negative weight decay, a zero epsilon or a negative clipping norm trained without a
    word (the epsilon into NaN weights for rows that get no gradient)."""
    from bertforge.config import TrainConfig

    with pytest.raises(UserError) as e:
        TrainConfig(data="d", output="o", **setting)
    assert str(e.value) == says
    TrainConfig(data="d", output="o", weight_decay=0.0, max_grad_norm=0.0)  # both allowed


def test_bad_bool_value_is_an_error():
    with pytest.raises(UserError, match="--do_lower_case: expected true or false"):
        parse_vocab(["--input", "a", "--output", "o", "--do_lower_case=maybe"])


def test_missing_required_flag_names_it():
    with pytest.raises(UserError, match="--output is required"):
        build_config(VocabConfig, {}, {"input": ["a"]})
    # an argument as usually given: named as one
    said = r"^INPUT is required, as an argument \(or --input INPUT\): "
    with pytest.raises(UserError, match=said):
        build_config(VocabConfig, {}, {"output": "o"})


def test_out_of_range_value_names_flag():
    with pytest.raises(UserError, match="--vocab-size: must be at least 100"):
        VocabConfig(input=("a",), output="o", vocab_size=5)


def test_toml_sets_fields_and_flags_override(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text('[vocab]\ninput = ["x.txt"]\noutput = "out"\nvocab-size = 1234\ncased = 1\n')
    with pytest.raises(UserError, match=r"unknown key 'cased'.*Valid keys: input"):
        build_config(VocabConfig, read_toml(f)["vocab"], {})
    f.write_text('[vocab]\ninput = ["x.txt"]\noutput = "out"\nvocab-size = 1234\n')
    cfg = build_config(VocabConfig, read_toml(f)["vocab"], {"vocab_size": 999})
    assert cfg.vocab_size == 999 and cfg.input == ("x.txt",) and cfg.output == "out"


def test_toml_type_and_section_errors(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text('[vocab]\nvocab_size = "big"\n')
    with pytest.raises(UserError, match="vocab_size must be an integer, got 'big'"):
        build_config(VocabConfig, read_toml(f)["vocab"], {})
    f.write_text('[vocab]\ndo_lower_case = "yes"\n')
    with pytest.raises(UserError, match="do_lower_case must be true or false, got 'yes'"):
        build_config(VocabConfig, read_toml(f)["vocab"], {})
    f.write_text("[vocab]\noutput = 5\n")
    with pytest.raises(UserError, match="output must be a string, got 5"):
        build_config(VocabConfig, read_toml(f)["vocab"], {})
    f.write_text("[vocabulary]\nx = 1\n")
    with pytest.raises(
        UserError, match=r"unknown section \[vocabulary\]; valid sections: \[vocab\]"
    ):
        read_toml(f)
    # a key above the first section was "unknown section [vocab_size]"
    f.write_text("vocab_size = 8000\n[train]\nlearning_rate = 1e-4\n")
    above = r"is outside any section \(keys above the first \[section\] belong to none\)"
    with pytest.raises(UserError, match=rf"{f}: vocab_size {above}; put it under \[vocab\]:"):
        read_toml(f)
    f.write_text("max-seq-length = 64\n")
    with pytest.raises(
        UserError, match=r"max-seq-length is .*; put it under \[data\] or \[train\]"
    ):
        read_toml(f)
    f.write_text('output = "work"\n[train]\nlearning-rate = 1e-4\n')  # the command's section first
    with pytest.raises(UserError, match=r"put it under \[run\] or \[vocab\] or \[data\]"):
        read_toml(f, "run")
    with pytest.raises(UserError, match=r"put it under \[train\] or \[vocab\] or \[data\]"):
        read_toml(f, "train")
    f.write_text("frobnicate = 1\n")
    with pytest.raises(UserError, match="frobnicate is outside any section, and no section takes"):
        read_toml(f)
    f.write_text("[vocab\n")
    with pytest.raises(UserError, match="not valid TOML"):
        read_toml(f)
    f.write_bytes(b"[vocab]\n# caf\xe9, written as Latin-1\nvocab_size = 8000\n")
    with pytest.raises(UserError, match=rf"{f}: not valid TOML \('utf-8' codec can't decode"):
        read_toml(f)


def test_an_error_about_a_flag_the_config_file_set_quotes_its_line(tmp_path: Path, capsys):
    """`--vocab-size: must be at least 100.` for a flag never typed sent the user to the
    command line; the error now quotes the --config file's line that set it. A flag given on
    the command line is its own source: nothing is added."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("In the beginning.\n")
    f = tmp_path / "c.toml"
    f.write_text(f'[run]\noutput = "{tmp_path / "work"}"\n[vocab]\nvocab-size = 10\n')
    assert main(["run", str(corpus), "--config", str(f)]) == 2
    assert capsys.readouterr().err == (
        f"bertforge: error: --vocab-size: must be at least 100. (set in {f}: [vocab] "
        "vocab-size = 10)\n"
    )
    f.write_text(f'[data]\nvocab = "{tmp_path / "nowhere"}"\n')
    data = ["data", str(corpus), "--output", str(tmp_path / "d"), "--config", str(f)]
    assert main(data) == 2
    assert capsys.readouterr().err == (
        f"bertforge: error: --vocab: {tmp_path / 'nowhere'} does not exist. (set in {f}: "
        f'[data] vocab = "{tmp_path / "nowhere"}")\n'
    )
    assert main([*data, "--vocab", str(tmp_path / "elsewhere")]) == 2  # the command's own
    assert capsys.readouterr().err == (
        f"bertforge: error: --vocab: {tmp_path / 'elsewhere'} does not exist.\n"
    )
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_cli_unknown_flag_lists_valid_names(capsys):
    assert main(["vocab", "--input", "a", "--output", "o", "--vocab-sise", "5"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "bertforge: error: unknown argument '--vocab-sise'. Did you mean --vocab-size? "
        "(`bertforge vocab --help` describes every flag.)\n"
    )
    # none close: every flag, by its first spelling only (train's list was 130 long)
    assert main(["train", "--data", "d", "--output", "o", "--frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bertforge: error: unknown argument '--frobnicate'. Valid flags: ")
    assert "--learning-rate, " in err and "--learning_rate" not in err and err.count("\n") == 1
    # a data tool's unknown flag is named as its own (argparse printed `bertforge data`'s usage)
    assert main(["data", "inspect", "d", "--count", "1"]) == 2
    assert capsys.readouterr().err == (
        "bertforge: error: unknown argument '--count'. Valid flags: --max-records, --vocab, -h, "
        "-n.\n"
    )


def test_python_m_bertforge_is_the_command():
    """`python -m bertforge` (and so `torchrun -m bertforge`) was "No module named
    bertforge.__main__"; the README's `-m bertforge.cli` works too."""
    import subprocess
    import sys

    for module in ("bertforge", "bertforge.cli"):
        out = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                             text=True, check=True)  # fmt: skip
        assert out.stdout.startswith("bertforge "), module
    bad = subprocess.run(
        [sys.executable, "-m", "bertforge", "train"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "bertforge: error:" in bad.stderr


def test_the_cli_and_the_corpus_stages_do_not_import_torch():
    """torch takes 1 to 2 s to import: `bertforge --help`, and `vocab` and `data`, which do
    not use it, must not pay that (report.py once took a constant from tune.py, and every
    command started 2 s late)."""
    import subprocess
    import sys

    code = (
        "import sys; from bertforge.cli import build_parser; build_parser(); "
        "import bertforge.vocab, bertforge.data, bertforge.datacheck, bertforge.run; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_several_data_files_as_arguments_are_one_comma_list():
    """`bertforge train google/*.tfrecord --output o`: the shell expands an unquoted glob into
    several arguments, which train reads as the comma list Google's --input_file takes; a
    one-file field (embed's text) refuses a second."""
    args = argparse.Namespace(data="a.tfrecord")  # --data a.tfrecord b.tfrecord c.tfrecord
    assert fold_positionals(args, ["b.tfrecord", "c.tfrecord"], TrainConfig) == []
    assert args.data == "a.tfrecord,b.tfrecord,c.tfrecord"
    args = argparse.Namespace()
    assert fold_positionals(args, ["x.tfrecord", "y.tfrecord"], TrainConfig) == []
    assert args.data == "x.tfrecord,y.tfrecord"
    with pytest.raises(UserError, match=r"INPUT is one path, given as an argument or --input; "
                       r"got a\.txt, b\.txt: give one\."):  # fmt: skip
        fold_positionals(argparse.Namespace(), ["a.txt", "b.txt"], EmbedConfig)
    assert fold_positionals(argparse.Namespace(), ["a", "--bogus"], TrainConfig) == ["a", "--bogus"]
