"""`bertforge run`: settings given once, stages skipped or resumed, report.md; recipes parse."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bertforge import cli
from bertforge import corpus as corpus_module
from bertforge.cli import RUNNERS, main
from bertforge.config import RunConfig, read_toml
from bertforge.errors import UserError
from bertforge.fileio import sha256_file
from bertforge.report import write_report
from bertforge.run import (
    DIRS,
    check_stages_agree,
    print_summary,
    run_flags,
    run_many,
    run_pipeline,
    stage_configs,
)
from tests.conftest import ROOT, run_group

FAST = [
    "--vocab-size",
    "1500",
    "--max-seq-length",
    "64",
    "--max-predictions-per-seq",
    "10",
    "--model-size",
    "tiny",
    "--train-batch-size",
    "8",
    "--num-train-steps",
    "6",
    "--eval-records",
    "20",
    "--save-checkpoints-steps",
    "3",
    "--workers",
    "1",
    "--no-progress",
]


def run_cli(corpus: Path, out: Path, *extra: str) -> dict:
    assert main(["run", str(corpus), "--output", str(out), *FAST, *extra]) == 0
    return json.loads((out / "run.json").read_text())


def test_pipeline_runs_then_skips_then_reruns_what_changed(
    tmp_path, kjv_corpus, capsys, monkeypatch
):
    out = tmp_path / "run"
    state = run_cli(kjv_corpus, out)
    for stage, sub in (
        ("vocab", "vocab"),
        ("data", "data"),
        ("train", "train"),
        ("export", "model"),
    ):
        assert state[stage]["done"] and (out / sub / "manifest.json").is_file()
    report = (out / "report.md").read_text()
    assert "masked LM accuracy" in report and "unigram baseline" in report
    assert "fp32 on cpu x 1\n" in report  # a CPU: padded batches, not compiled
    assert f"Corpus: {kjv_corpus.resolve()}  \n" in report
    for stage, sub in (("vocab", "vocab"), ("export", "model")):  # not "0" for a short stage
        seconds = state[stage]["seconds"]
        assert seconds < 10 and f"| {stage} | `{sub}/` | {seconds:.1f} |\n" in report
    assert (out / "plots" / "loss.png").stat().st_size > 1000
    assert (out / "plots" / "accuracy.png").stat().st_size > 1000
    printed = capsys.readouterr()
    assert "held-out masked LM accuracy" in printed.out and "unigram baseline" in printed.out
    assert "MFU" not in report + printed.out  # a CPU: no peak to measure against
    assert "continued from" not in report

    # Trained on a GPU of known peak, the log's MFU is in the report and the summary: the
    # mean of the records after the first (which holds the warm-up).
    metrics = out / "train" / "metrics.jsonl"
    lines = metrics.read_text()
    (first,) = [r for r in map(json.loads, lines.splitlines()) if not r.get("eval")]
    records = [first | {"mfu": m} for m in (0.05, 0.30, 0.34)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = write_report(out, DIRS)
    assert summary.mfu == pytest.approx(0.32)
    assert ", MFU 32.0%\n" in (out / "report.md").read_text()
    print_summary(summary, out)
    assert " tokens/s (MFU 32.0%)\n" in capsys.readouterr().out
    # A masked LM no better than its unigram baseline (within half a point) is said to have
    # learned nothing yet, in the report and the summary; above it, nothing is said.
    evals = [r for r in map(json.loads, lines.splitlines()) if r.get("eval")]
    for gain, said in ((0.004, True), (0.006, False)):
        last = evals[-1] | {"masked_lm_accuracy": evals[-1]["masked_lm_unigram_baseline"] + gain}
        metrics.write_text(lines + json.dumps(last) + "\n")
        summary = write_report(out, DIRS)
        print_summary(summary, out)
        printed_now = capsys.readouterr().out
        assert ("  note: the masked LM guesses no better than always guessing the most frequent "
                "token" in printed_now) is said  # fmt: skip
        report = (out / "report.md").read_text()
        assert ("\nNote: the masked LM guesses no better" in report) is said
    metrics.write_text(lines)
    write_report(out, DIRS)

    # The same command again, from another directory with relative paths (and a peak for
    # the MFU, which changes no output): nothing reruns.
    before = (out / "model" / "model.safetensors").stat().st_mtime_ns
    monkeypatch.chdir(kjv_corpus.parent)
    relative = Path(os.path.relpath(out, kjv_corpus.parent))
    run_cli(Path(kjv_corpus.name), relative, "--peak-tflops", "50")
    assert printed.err.count("running") == 4
    err = capsys.readouterr().err
    assert err.count("unchanged, kept") == 4
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == before

    # More steps: training resumes from its checkpoint, then export reruns; vocab/data kept.
    state = run_cli(kjv_corpus, out, "--num-train-steps", "9")
    err = capsys.readouterr().err
    assert "vocab: unchanged" in err and "data: unchanged" in err and "train: resuming" in err
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["counts"]["steps"] == 9
    metrics = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert min(r["step"] for r in metrics if not r.get("eval")) <= 6  # kept the first 6 steps

    # Another learning rate would train from step 0, deleting the checkpoints (days of
    # training, maybe): refused before anything runs, saying why and what to do. It went
    # ahead silently before; `bertforge train` itself refuses.
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    lr = ("--num-train-steps", "9", "--learning-rate", "3e-4")
    assert main(["run", str(kjv_corpus), "--output", str(out), *FAST, *lr]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"bertforge: error: --output: this run would start the training in {out / 'train'} "
        "over from step 0 and delete its checkpoints (the last: ckpt-00000009.pt), because "
        "--learning-rate was 0.0001, now 0.0003. Nothing was changed."
    )
    assert f"--init-checkpoint {out / 'train' / 'checkpoints' / 'ckpt-00000009.pt'} with" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # with the training directory deleted, as it says: training starts over, export follows
    shutil.rmtree(out / "train")
    run_cli(kjv_corpus, out, *lr)
    err = capsys.readouterr().err
    assert "data: unchanged" in err and "train: running" in err and "export: running" in err

    # A vocabulary setting: everything from the vocabulary on would rerun; refused for the
    # training's sake too, and with --overwrite everything reruns.
    cased = (*lr, "--cased")
    assert main(["run", str(kjv_corpus), "--output", str(out), *FAST, *cased]) == 2
    err = capsys.readouterr().err
    assert (
        "delete its checkpoints (the last: ckpt-00000009.pt), because the vocab stage runs "
        "again (--do-lower-case was True, now False). Nothing was changed."
    ) in err and "--init-checkpoint" not in err
    run_cli(kjv_corpus, out, *cased, "--overwrite")
    err = capsys.readouterr().err
    assert all(f"{s}: running" in err for s in ("vocab", "data", "train", "export"))
    tokenizer_config = json.loads((out / "model" / "tokenizer_config.json").read_text())
    assert tokenizer_config["do_lower_case"] is False


def test_a_moved_run_directory_is_the_same_run(tmp_path, kjv_corpus, capsys):
    """The stages are wired by absolute paths; a run directory moved (another disk, another
    machine) is the same run: its finished stages are kept and its training resumes. Before,
    every stage started over, training from step 0 with its checkpoints deleted; and the data,
    which named its vocabulary by the old path, could not be trained on from the new one."""
    first, moved = tmp_path / "first", tmp_path / "elsewhere" / "moved"
    run_cli(kjv_corpus, first)
    moved.parent.mkdir()
    shutil.move(first, moved)
    capsys.readouterr()
    state = run_cli(kjv_corpus, moved, "--num-train-steps", "9")
    err = capsys.readouterr().err
    assert "vocab: unchanged" in err and "data: unchanged" in err and "train: resuming" in err
    assert (
        f"note: the data was read from {first / 'data'}; the same records are now at "
        f"{moved / 'data'}, and the run goes on with them."
    ) in err
    steps = [
        json.loads(x)["step"] for x in (moved / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    assert min(steps) <= 6 and max(steps) == 9  # the first 6 steps' records kept: resumed
    assert state["train"]["config"]["output"] == str(moved / "train")
    run_cli(kjv_corpus, moved, "--num-train-steps", "9")  # and it is then the run there
    assert capsys.readouterr().err.count("unchanged, kept") == 4


def test_an_upgrade_alone_reruns_no_stage(tmp_path, kjv_corpus, capsys):
    """A run.json written by an older bertforge lacks the options added since: each counts as
    its default, so the same command keeps every stage. The masking cap is recorded resolved
    (20 at length 64, what older versions wrote for the default). A setting missing from the
    record whose value is not the default still reruns the stage."""
    out = tmp_path / "run"
    fast = [a for a in FAST if a not in ("--max-predictions-per-seq", "10")]
    assert main(["run", str(kjv_corpus), "--output", str(out), *fast]) == 0
    state = json.loads((out / "run.json").read_text())
    assert state["data"]["config"]["max_predictions_per_seq"] == 20
    del state["data"]["config"]["split_sentences"]  # new in session 43
    del state["train"]["config"]["google_adam"]  # left at its default (False)
    (out / "run.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["run", str(kjv_corpus), "--output", str(out), *fast]) == 0
    assert capsys.readouterr().err.count("unchanged, kept") == 4
    state = json.loads((out / "run.json").read_text())
    assert "google_adam" not in state["train"]["config"]  # kept stages keep their records
    # more steps: training resumes (the missing key counts as its default there too)
    assert (
        main(["run", str(kjv_corpus), "--output", str(out), *fast, "--num-train-steps", "9"]) == 0
    )
    assert "train: resuming" in capsys.readouterr().err
    state = json.loads((out / "run.json").read_text())
    del state["data"]["config"]["max_seq_length"]  # 64 here, not the default 128
    (out / "run.json").write_text(json.dumps(state))
    nine = ["run", str(kjv_corpus), "--output", str(out), *fast, "--num-train-steps", "9"]
    assert main(nine) == 2  # data would run again, and training with it from step 0
    assert (
        "because the data stage runs again (--max-seq-length was 128, now 64). Nothing was changed."
    ) in capsys.readouterr().err
    shutil.rmtree(out / "train")
    assert main(nine) == 0
    err = capsys.readouterr().err
    assert "vocab: unchanged" in err and "data: running" in err and "train: running" in err


def test_an_output_inside_the_corpus_directory_is_not_read(tmp_path, kjv_corpus, capsys):
    """`bertforge run corpus/ --output corpus/work`: no stage reads the run's own files (its
    vocabulary, manifests and shards would be corpus text, or refused as binary), and the
    same command again keeps every stage."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "kjv.txt").write_bytes(kjv_corpus.read_bytes())
    out = corpus / "work"
    state = run_cli(corpus, out)
    err = capsys.readouterr().err
    assert "warning" not in err
    vocab = json.loads((out / "vocab" / "manifest.json").read_text())
    data = json.loads((out / "data" / "manifest.json").read_text())
    assert [i["path"] for i in vocab["inputs"]] == [str(corpus / "kjv.txt")] == [
        i["path"] for i in data["inputs"]]  # fmt: skip
    assert state["data"]["done"] and data["counts"]["unk_share"] == 0.0
    run_cli(corpus, out)
    assert capsys.readouterr().err.count("unchanged, kept") == 4
    # a stage on its own, after the run (no lock held now): the run's files are still left out
    assert main(["data", "--input", str(corpus), "--vocab", str(out / "vocab"), "--output",
                 str(corpus / "data"), "--max-seq-length", "64", "--no-progress"]) == 0  # fmt: skip
    data = json.loads((corpus / "data" / "manifest.json").read_text())
    assert [i["path"] for i in data["inputs"]] == [str(corpus / "kjv.txt")]
    # an output given as the corpus itself: refused, naming what it is (a vocabulary was
    # trained on a vocabulary's files, with no word)
    for given, what in ((out / "vocab", "a `bertforge vocab` output"),
                        (out / "data", "a `bertforge data` output"),
                        (out, "a `bertforge run` directory")):  # fmt: skip
        assert main(["vocab", str(given), "--output", str(tmp_path / "v")]) == 2
        assert capsys.readouterr().err == (
            f"bertforge: error: --input: {given} is {what}, not a corpus (its files would be "
            "read as text); give the corpus's files or the directory that holds them.\n"
        )
    assert not (tmp_path / "v").exists()


def test_a_changed_corpus_is_not_kept(tmp_path, kjv_corpus, capsys, monkeypatch):
    """Text added to the corpus (same file name) reruns everything; so does a run.json from
    before bertforge recorded the corpus (the stages' manifests say what they read)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(kjv_corpus.read_bytes())
    out = tmp_path / "run"
    run_cli(corpus, out)
    size = corpus.stat().st_size
    with corpus.open("a") as f:
        f.write("\nAnd it came to pass in those days.\nThen the people went home.\n")
    grown = f"the corpus changed ({corpus} had {size:,} bytes, now {corpus.stat().st_size:,})"
    # every stage would run again, training from step 0: refused, its checkpoints kept
    assert main(["run", str(corpus), "--output", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"vocab: {grown}" in err and f"data: {grown}" in err
    assert f"delete its checkpoints (the last: ckpt-00000006.pt), because {grown}." in err
    assert (out / "train" / "checkpoints" / "ckpt-00000006.pt").is_file()
    run_cli(corpus, out, "--overwrite")
    err = capsys.readouterr().err
    assert all(f"{s}: running" in err for s in ("vocab", "data", "train", "export"))
    data = json.loads((out / "data" / "manifest.json").read_text())
    assert data["inputs"] == [{"path": str(corpus), "bytes": corpus.stat().st_size}]

    state = json.loads((out / "run.json").read_text())
    for record in state.values():
        record.pop("corpus", None)
    (out / "run.json").write_text(json.dumps(state))
    run_cli(corpus, out)
    assert capsys.readouterr().err.count("unchanged, kept") == 4
    with corpus.open("a") as f:
        f.write("\nOne more line.\n")
    assert main(["run", str(corpus), "--output", str(out), *FAST]) == 2
    assert "vocab: the corpus changed" in capsys.readouterr().err


def test_an_edit_that_keeps_the_size_is_a_change_and_a_touch_is_not(tmp_path, kjv_corpus, capsys):
    """The corpus lowercased in place (`tr A-Z a-z`: as many bytes) was taken as unchanged,
    and every stage kept: a model of the old text. The files' times tell an edit, their
    sha256 (recorded when a stage starts) whether the text changed: a file touched, or copied
    back as it was, keeps every stage, and is hashed once only."""
    corpus = tmp_path / "corpus.txt"
    text = kjv_corpus.read_bytes()
    corpus.write_bytes(text)
    out = tmp_path / "run"
    state = run_cli(corpus, out)
    (recorded,) = state["vocab"]["corpus"]
    assert recorded["sha256"] == sha256_file(corpus) and recorded["bytes"] == len(text)
    assert state["data"]["corpus"] == state["vocab"]["corpus"]
    time.sleep(0.01)
    corpus.write_bytes(text.lower())
    assert corpus.stat().st_size == len(text)
    lowered = f"the corpus changed ({corpus} has other content, of as many bytes ({len(text):,}))"
    assert main(["run", str(corpus), "--output", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"run: vocab: {lowered}" in err and f"because {lowered}." in err
    time.sleep(0.01)
    corpus.write_bytes(text)  # as it was, at another time
    hashed = []
    real = corpus_module.sha256_file

    def counted(path):
        hashed.append(Path(path).name)
        return real(path)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(corpus_module, "sha256_file", counted)
        m.setattr(corpus_module, "_DIGESTS", {})  # as a new process starts
        run_cli(corpus, out)
    assert capsys.readouterr().err.count("unchanged, kept") == 4
    assert hashed.count(corpus.name) == 1  # for vocab and data, once
    (restamped,) = json.loads((out / "run.json").read_text())["data"]["corpus"]
    assert restamped["mtime_ns"] == corpus.stat().st_mtime_ns != recorded["mtime_ns"]
    hashed.clear()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(corpus_module, "sha256_file", counted)
        m.setattr(corpus_module, "_DIGESTS", {})
        run_cli(corpus, out)
    assert capsys.readouterr().err.count("unchanged, kept") == 4 and corpus.name not in hashed


def test_a_corpus_fixed_after_a_data_error_resumes(tmp_path, kjv_corpus, kjv_vocab, capsys):
    """With a vocabulary given, a bad line in the corpus stops the run in its data stage; fixed,
    the same command resumes the data stage, which keeps the shards it finished."""
    docs = [d for d in kjv_corpus.read_text().split("\n\n") if d.strip()]
    lines = [json.dumps({"text": d}) for d in docs]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join([*lines, '{"text": "cut']) + "\n")
    out = tmp_path / "run"
    argv = ["run", str(corpus), "--output", str(out), "--vocab", str(kjv_vocab), *FAST[2:],
            "--unit-mb", "0.05"]  # fmt: skip
    assert main(argv) == 2
    assert f"{corpus}:{len(lines) + 1}: not valid JSON" in capsys.readouterr().err
    finished = len(list((out / "data" / ".parts").glob("unit-*.json")))
    assert finished >= 3
    corpus.write_text("\n".join(lines) + "\n")
    assert main(argv) == 0
    printed, err = capsys.readouterr()
    assert f"run: data: the corpus changed ({corpus} had " in err
    assert "); its shards whose text is unchanged are kept" in err
    assert f"resumed: {finished} shard(s) were already finished" in printed + err
    report = (out / "report.md").read_text()  # no vocab section: the data section says it
    assert f"- note: read as records: {len(lines):,} from 1 JSON Lines file(s)" in report


def test_stdin_is_refused_by_run_and_never_taken_as_unchanged(
    tmp_path, kjv_corpus, kjv_vocab, monkeypatch, capsys
):
    """run reads the corpus twice and tells it by its files: it refuses stdin. The data stage
    cannot check stdin against an earlier output: it neither keeps nor resumes one."""
    import io
    import sys

    assert main(["run", "-", "--output", str(tmp_path / "r"), *FAST]) == 2
    assert "CORPUS -: bertforge run cannot read the corpus from standard input" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "r").exists()

    def data(*extra: str) -> int:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(kjv_corpus.read_bytes())))
        argv = ["data", "--input", "-", "--vocab", str(kjv_vocab), "--output", str(out)]
        return main([*argv, "--max-seq-length", "64", "--workers", "1", "--no-progress", *extra])

    out = tmp_path / "d"
    assert data() == 0
    manifest = (out / "manifest.json").read_bytes()
    assert data() == 2
    assert "standard input cannot be checked against what it was made from" in (
        capsys.readouterr().err
    )
    assert (out / "manifest.json").read_bytes() == manifest  # nothing touched
    assert data("--overwrite") == 0

    # a pipe likewise, whose path (/dev/fd/63 under bash) says nothing of what comes through it
    from tests.test_corpus import feed_fifo

    fifo = tmp_path / "corpus.fifo"
    feed_fifo(fifo, kjv_corpus.read_bytes())
    assert main(["run", str(fifo), "--output", str(tmp_path / "r"), *FAST]) == 2
    assert f"CORPUS {fifo}: bertforge run cannot read the corpus from a pipe" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "r").exists()
    argv = ["data", str(fifo), "--vocab", str(kjv_vocab), "--output", str(tmp_path / "p")]
    assert main([*argv, "--max-seq-length", "64", "--workers", "1", "--no-progress"]) == 0
    assert (tmp_path / "p" / "manifest.json").is_file()
    assert main([*argv, "--max-seq-length", "64", "--no-progress"]) == 2
    assert f"a pipe ({fifo}) cannot be checked against what it was made from" in (
        capsys.readouterr().err
    )


def test_under_torchrun_only_train_and_run_run(tmp_path, kjv_corpus, monkeypatch, capsys):
    """Each torchrun process would run a stage and write the same files: refused."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["vocab", "--input", str(kjv_corpus), "--output", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "bertforge vocab runs in one process, and torchrun started 2 of them" in err
    assert "`bertforge run` for the whole pipeline" in err and not (tmp_path / "v").exists()


@pytest.mark.slow
def test_run_under_torchrun(tmp_path, kjv_corpus):
    """torchrun with 2 gloo processes: process 0 makes the vocabulary and data while the other
    waits, both train (the one-process losses), process 0 exports; run again, all is kept. A
    stage that fails in process 0 ends the other process too (no hang)."""
    one, two = tmp_path / "one", tmp_path / "two"
    steps = ["--log-every", "1", "--dropout", "0"]  # dropout differs by process
    assert main(["run", str(kjv_corpus), "--output", str(one), *FAST, *steps]) == 0
    steps.extend(["--precision", "fp32"])  # as in this process (conftest.fp32_on_every_cpu)

    def torchrun(corpus: Path, out: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", "29521", "-m", "bertforge.cli", "run", str(corpus),
               "--output", str(out), *FAST, *steps]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return run_group(cmd, env=env, timeout=300, capture_output=True, text=True)

    done = torchrun(kjv_corpus, two)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("run: vocab: running") == 1  # process 0 only
    losses = [[json.loads(x)["loss"] for x in (d / "train" / "metrics.jsonl").read_text()
               .splitlines() if "loss" in json.loads(x) and not json.loads(x).get("eval")]
              for d in (one, two)]  # fmt: skip
    assert len(losses[0]) == len(losses[1]) == 6
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert json.loads((two / "train" / "manifest.json").read_text())["processes"] == 2
    assert (two / "model" / "model.safetensors").is_file() and (two / "report.md").is_file()
    again = torchrun(kjv_corpus, two)
    assert again.returncode == 0 and again.stderr.count("unchanged, kept") == 4

    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    failed = torchrun(binary, tmp_path / "three")
    assert failed.returncode != 0 and "not a text corpus" in failed.stderr


def test_under_torchrun_a_failed_training_leaves_the_process_group_as_it_is(tmp_path, monkeypatch):
    """`run` under torchrun shuts the process group down after the pipeline only: where
    training fails on one process, the others may wait for it inside a collective, and the
    shutdown could hang (`distributed.leave`; the CLI ends the process instead)."""
    import torch

    from bertforge import distributed

    calls = []
    monkeypatch.setattr(distributed, "setup", lambda device: distributed.Dist(
        1, 2, 1, torch.device("cpu")))  # fmt: skip
    monkeypatch.setattr(distributed, "waiting_group", lambda d: None)
    monkeypatch.setattr(distributed, "broadcast_word", lambda word, d, group: "resume")
    monkeypatch.setattr(distributed, "shutdown", lambda d: calls.append("shutdown"))
    run = RunConfig(input=("corpus.txt",), output=str(tmp_path / "run"), progress=False)
    configs = stage_configs(run, {}, {"vocab_size": 1500, "max_seq_length": 64})

    def failing(cfg):
        calls.append("train")
        raise UserError("the disk is full")

    with pytest.raises(UserError):
        run_many(run, configs, {"train": failing})
    assert calls == ["train"]
    run_many(run, configs, {"train": lambda cfg: calls.append("train")})
    assert calls == ["train", "train", "shutdown"]


def test_a_vocab_txt_edited_by_hand_is_what_the_stages_after_it_read(tmp_path, kjv_corpus, capsys):
    """Words written into the [unused] slots of a run's vocab.txt by hand (as --num-unused
    means them to be): run saw the vocab stage's manifest unchanged and kept every stage, so
    the data and the model never had them. Now the data stage runs again (its manifest names
    the vocab.txt it was made with), training is refused to start over while it has
    checkpoints, saying that --overwrite would also undo the edit; without them, the model
    has the new word, and the edited vocab.txt is kept."""
    out = tmp_path / "run"
    run_cli(kjv_corpus, out)
    vocab = out / "vocab" / "vocab.txt"
    lines = vocab.read_text(encoding="utf-8").splitlines()
    lines[lines.index("[unused5]")] = "zzzword"
    edited = "".join(f"{line}\n" for line in lines)
    vocab.write_text(edited, encoding="utf-8")
    capsys.readouterr()
    assert main(["run", str(kjv_corpus), "--output", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert (
        "because the data stage runs again (its vocabulary changed: "
        f"{vocab.resolve()} is not the one the data was made with)" in err
    )
    assert "pass --overwrite: every stage runs again, the vocabulary too, without the " in err
    shutil.rmtree(out / "train")
    state = run_cli(kjv_corpus, out)
    err = capsys.readouterr().err
    assert f"run: vocab: kept {out / 'vocab'}, whose vocab.txt is not the one the stage " in err
    assert "run: data: running" in err and state["vocab"]["done"]
    assert vocab.read_text(encoding="utf-8") == edited
    for kept in (out / "data", out / "model"):
        assert "zzzword" in (kept / "vocab.txt").read_text(encoding="utf-8").split()
        tokenizer = json.loads((kept / "tokenizer.json").read_text(encoding="utf-8"))
        assert "zzzword" in tokenizer["model"]["vocab"]
    run_cli(kjv_corpus, out)  # once made with it, the data is kept
    assert "run: data: unchanged, kept" in capsys.readouterr().err
    # A run that would make the vocabulary again (another size) is refused: the edits would go.
    assert main(["run", str(kjv_corpus), "--output", str(out), *FAST, "--vocab-size", "1400"]) == 2
    assert (
        f"this run would write {out / 'vocab'} again, because --vocab-size was 1500, now 1400, "
        "and its vocab.txt changed since the vocab stage wrote it: the changes would be lost. "
        "Nothing was changed. To keep them, copy its directory out of the run and give it with "
        "--vocab; to make it anew, pass --overwrite (every stage runs again)."
        in capsys.readouterr().err
    )
    assert vocab.read_text(encoding="utf-8") == edited
    # A model saved over the export (fine-tuned): a run that would export again is refused.
    weights = out / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    assert (
        main(["run", str(kjv_corpus), "--output", str(out), *FAST, "--num-train-steps", "9"]) == 2
    )
    assert (
        f"this run would write {out / 'model'} again, because the train stage runs again, and "
        "its model.safetensors changed since the export stage wrote it: the changes would be "
        f"lost. Nothing was changed. To keep them, move them out of {out / 'model'}, and rerun."
        in capsys.readouterr().err
    )


def test_an_interrupted_run_resumes(tmp_path, kjv_corpus, capsys):
    out = tmp_path / "run"
    run = RunConfig(input=(str(kjv_corpus),), output=str(out), progress=False)
    flags = {
        "vocab_size": 1500,
        "max_seq_length": 64,
        "max_predictions_per_seq": 10,
        "model_size": "tiny",
        "train_batch_size": 8,
        "num_train_steps": 6,
        "eval_records": 20,
        "save_checkpoints_steps": 3,
        "workers": 1,
    }
    configs = stage_configs(run, {}, flags)

    def crash(cfg):  # the machine dies during export, after writing part of it
        Path(cfg.output).mkdir(parents=True)
        (Path(cfg.output) / "config.json").write_text("{")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(run, configs, {**RUNNERS, "export": crash})
    state = json.loads((out / "run.json").read_text())
    assert state["train"]["done"] and not state["export"]["done"]
    result = run_pipeline(run, configs, RUNNERS)
    assert result.ran == ["export"] and result.skipped == ["vocab", "data", "train"]
    assert json.loads((out / "model" / "config.json").read_text())["vocab_size"] == 1500
    assert "export: running" in capsys.readouterr().err


def test_flags_reach_every_stage_that_uses_them(tmp_path):
    run = RunConfig(input=("corpus.txt",), output=str(tmp_path / "r"))
    configs = stage_configs(
        run,
        {"train": {"learning_rate": 5e-4}},
        {
            "max_seq_length": 256,
            "do_lower_case": False,
            "export_format": "google",
            "format": "tfrecord",
            "random_seed": 7,
        },
    )
    assert configs["vocab"].do_lower_case is False and configs["data"].do_lower_case is False
    assert configs["data"].max_seq_length == 256 and configs["train"].max_seq_length == 256
    assert configs["data"].format == "tfrecord" and configs["export"].format == "google"
    assert configs["data"].random_seed == 7 and configs["train"].random_seed == 7
    assert configs["train"].learning_rate == 5e-4
    assert configs["train"].data == str(tmp_path / "r" / "data")
    assert configs["export"].checkpoint == str(tmp_path / "r" / "train")
    with pytest.raises(UserError, match=r"r.toml \[data\]: output is set by bertforge run"):
        stage_configs(run, {"data": {"output": "elsewhere"}}, {}, "r.toml")
    with pytest.raises(UserError, match=r"resume_google is for `bertforge train` alone"):
        stage_configs(run, {"train": {"resume_google": "model.ckpt-9"}}, {}, "r.toml")
    assert not any("resume" in f.spec.name and "google" in f.spec.name for f in run_flags())


def test_stages_that_share_a_setting_must_agree_before_anything_runs(tmp_path, kjv_corpus, capsys):
    """A config file may set a shared setting in two sections; a clash stopped the run at the
    train stage, after vocab and data had run. Now one error first, naming both sections; the
    data's default masking cap counts, and a run flag (which sets every stage) never clashes."""
    recipe, out = tmp_path / "r.toml", tmp_path / "r"
    cases = [
        ("[data]\nmax_seq_length = 64\n[train]\nmax_seq_length = 128\n",
         "[data] max_seq_length is 64 but [train] max_seq_length is 128; the stages must agree "
         "(train reads what data makes); set it once, in [data] or with --max-seq-length, and "
         "leave it out of [train]."),
        ("[train]\nmax_predictions_per_seq = 30\n",
         "[data] max_predictions_per_seq is 20 but [train] max_predictions_per_seq is 30"),
        ("[vocab]\ndo_lower_case = false\n[data]\ndo_lower_case = true\n",
         "[vocab] do_lower_case is false but [data] do_lower_case is true; the stages"),
    ]  # fmt: skip
    for text, said in cases:
        recipe.write_text(text)
        assert main(["run", str(kjv_corpus), "--output", str(out), "--config", str(recipe)]) == 2
        assert f"bertforge: error: {recipe}: {said}" in capsys.readouterr().err
        assert not out.exists()
    recipe.write_text("[data]\nmax_seq_length = 64\n[train]\nmax_seq_length = 64\n")
    run = RunConfig(input=(str(kjv_corpus),), output=str(out))
    check_stages_agree(stage_configs(run, read_toml(recipe), {}, str(recipe)), True, None)
    flags = {"max_seq_length": 256, "do_lower_case": False}
    check_stages_agree(stage_configs(run, read_toml(recipe), flags, str(recipe)), True, None)


def test_run_refuses_a_foreign_directory(tmp_path, kjv_corpus, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    assert main(["run", str(kjv_corpus), "--output", str(out), *FAST]) == 2
    assert "not a bertforge run" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "keep me" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.stem)
def test_recipes_parse_into_stage_configs(recipe, tmp_path):
    toml = read_toml(recipe)
    run = RunConfig(input=("corpus.txt",), output=str(tmp_path / "r"))
    configs = stage_configs(run, toml, {}, str(recipe))
    assert set(configs) == {"vocab", "data", "train", "export"}
    check_stages_agree(configs, True, str(recipe))
    for stage, section in toml.items():
        for key, value in section.items():
            if stage != "run":
                got = getattr(configs[stage], key)
                assert (list(got) if isinstance(got, tuple) else got) == value
    if configs["train"].bert_config:  # a model shape shipped beside the recipes
        from bertforge.model import BertConfig

        bert = BertConfig.from_json(ROOT / configs["train"].bert_config)
        assert bert.vocab_size == configs["vocab"].vocab_size


@pytest.mark.parametrize("recipe", ["bert-base-from-scratch", "turkish-cased-small"])
def test_recipes_leave_the_masking_cap_to_the_length(recipe, tmp_path):
    """A recipe at length 128 run with --max-seq-length 512 masks 15% of a full instance (77),
    not the 20 a recipe that wrote Google's default down would keep."""
    path = ROOT / "configs" / f"{recipe}.toml"
    run = RunConfig(input=("corpus.txt",), output=str(tmp_path / "r"))
    configs = stage_configs(run, read_toml(path), {"max_seq_length": 512}, str(path))
    assert configs["data"].max_seq_length == 512
    assert configs["data"].resolved_max_predictions == 77


def test_demo_uses_the_repository_recipe():
    assert cli.demo_config().read_text() == (ROOT / "configs" / "demo.toml").read_text()


def test_continued_pretraining_keeps_the_checkpoints_vocabulary(
    tmp_path, kjv_corpus, kjv_vocab, trained_run, capsys
):
    out = tmp_path / "continued"
    assert FAST[:2] == ["--vocab-size", "1500"]  # dropped: the vocabulary is given
    fast = [a for a in FAST[2:] if a not in ("--model-size", "tiny")]
    argv = [
        "run",
        str(kjv_corpus),
        "--output",
        str(out),
        "--vocab",
        str(kjv_vocab),
        "--init-checkpoint",
        str(trained_run),
        "--learning-rate",
        "2e-5",
        *fast,
    ]
    assert main(argv) == 0
    assert "vocab: using" in capsys.readouterr().err and not (out / "vocab").exists()
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["bert_config"]["hidden_size"] == 64  # the checkpoint's size
    assert (out / "model" / "vocab.txt").read_text() == (kjv_vocab / "vocab.txt").read_text()
    report = (out / "report.md").read_text()
    assert "vocabulary given" in report
    assert f"- continued from {trained_run.resolve()}\n" in report
    # A vocabulary that is not the checkpoint's is refused before any stage runs.
    other = tmp_path / "other"
    assert (
        main(
            [
                "vocab",
                "--input",
                str(kjv_corpus),
                "--output",
                str(other),
                "--vocab-size",
                "1200",
                "--no-progress",
            ]
        )
        == 0
    )
    argv[argv.index(str(kjv_vocab))] = str(other)
    assert main([*argv[:3], str(tmp_path / "c2"), *argv[4:]]) == 2
    assert "is not the data's" in capsys.readouterr().err and not (tmp_path / "c2").exists()
    # --transfer-vocab: the run trains its own vocabulary, and train maps the checkpoint's
    # embeddings onto it.
    transfer = [a for a in argv if a not in ("--vocab", str(other))]
    transfer = [*transfer[:3], str(tmp_path / "t"), *transfer[4:], "--vocab-size", "1200"]
    assert main([*transfer, "--transfer-vocab"]) == 0
    assert "--transfer-vocab: of the 1,200 tokens of" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "t" / "train" / "manifest.json").read_text())
    assert manifest["bert_config"]["vocab_size"] == 1200
    e = manifest["embeddings"]
    assert e == {"kept": 1200, "from_pieces": 0, "from_unk": 0}  # the same corpus: all shared
    assert (
        f"(--transfer-vocab: {e['kept']:,} of the 1,200 tokens kept their embeddings, "
        f"{e['from_pieces']:,} started from the mean of their pieces'"
    ) in (tmp_path / "t" / "report.md").read_text()
    assert manifest["bert_config"]["hidden_size"] == 64  # the checkpoint's size

    # Without --vocab the checkpoint's own is used (given as its checkpoints/ directory here).
    at = argv.index("--vocab")
    argv = [*argv[:at], *argv[at + 2 :]]
    argv[argv.index(str(trained_run))] = str(trained_run / "checkpoints")
    assert main([*argv[:3], str(tmp_path / "c3"), *argv[4:]]) == 0
    assert f"vocab: using {trained_run}\n" in capsys.readouterr().err
    data = json.loads((tmp_path / "c3" / "data" / "manifest.json").read_text())
    assert (
        data["vocab"]["sha256"]
        == json.loads((out / "data" / "manifest.json").read_text())["vocab"]["sha256"]
    )
    assert not (tmp_path / "c3" / "vocab").exists()
    # The run's own training directory as the start: refused before anything runs.
    state = (out / "run.json").read_bytes()
    mine = [*argv[:3], str(out), *argv[4:]]
    mine[mine.index("--init-checkpoint") + 1] = str(out / "train")
    assert main(mine) == 2
    assert "is this run's own training directory" in capsys.readouterr().err
    assert (out / "run.json").read_bytes() == state
    # A flag only the vocab stage reads is refused before anything runs.
    assert main([*argv[:3], str(tmp_path / "c4"), *argv[4:], "--vocab-size", "900"]) == 2
    assert "--vocab-size: only the vocab stage reads it" in capsys.readouterr().err
    assert not (tmp_path / "c4").exists()
    # What train refuses of the checkpoint's shape, from the config beside it: before the data
    # stage runs (it ran first, and train refused after it).
    positions = json.loads((trained_run / "bert_config.json").read_text())
    positions = positions["max_position_embeddings"]
    for extra, says in (
        (["--model-size", "mini"], "--model-size mini is not the size of --init-checkpoint (L2 "),
        (["--max-seq-length", str(positions + 1)],
         f"--max-seq-length {positions + 1}: the model of --init-checkpoint "
         f"{trained_run / 'checkpoints'} has {positions} positions; give --max-seq-length "
         f"{positions} or less."),
    ):  # fmt: skip
        assert main([*argv[:3], str(tmp_path / "c4"), *argv[4:], *extra]) == 2
        assert says in capsys.readouterr().err
        assert not (tmp_path / "c4").exists()
    # A checkpoint with no vocabulary beside it: say to give --vocab.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "bert_config.json").write_text((trained_run / "bert_config.json").read_text())
    argv[argv.index(str(trained_run / "checkpoints"))] = str(bare / "bert_model.ckpt")
    (bare / "bert_model.ckpt.index").write_bytes(b"")
    assert main([*argv[:3], str(tmp_path / "c5"), *argv[4:]]) == 2
    err = capsys.readouterr().err
    assert (
        f"--init-checkpoint: no vocab.txt or tokenizer.json beside {bare / 'bert_model.ckpt'}"
        in err
    )
    assert "give it with --vocab" in err and not (tmp_path / "c5").exists()
    # One whose vocab.txt does not say whether it is cased: before anything runs (the data
    # stage said so, once the run had begun).
    (bare / "vocab.txt").write_text((trained_run / "vocab.txt").read_text())
    assert main([*argv[:3], str(tmp_path / "c5"), *argv[4:]]) == 2
    assert "has no manifest saying whether it is cased; pass --cased or --lowercase" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "c5").exists()


def test_demo_runs_the_pipeline_and_shows_guesses(tmp_path, kjv_corpus, monkeypatch, capsys):
    recipe = tmp_path / "demo.toml"
    text = (ROOT / "configs" / "demo.toml").read_text()
    for old, new in (("vocab_size = 8000", "vocab_size = 1500"),
                     ("num_train_steps = 1000", "num_train_steps = 4"),
                     ("eval_records = 500", "eval_records = 20")):  # fmt: skip
        assert old in text, f"update this test: the demo recipe has no {old!r}"
        text = text.replace(old, new)
    recipe.write_text(text)
    monkeypatch.setattr(cli, "demo_config", lambda: recipe)
    monkeypatch.setattr(cli, "demo_corpus", lambda: kjv_corpus)
    assert main(["demo", "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "held-out masked LM accuracy" in out and "unigram baseline" in out
    for prompt in cli.DEMO_PROMPTS:
        assert prompt.split("[MASK]")[0] in out
    assert out.count("[MASK] 1:") == len(cli.DEMO_PROMPTS)
    # a recipe changed (by an upgrade): the demo's throwaway model is trained again, where
    # `bertforge run` would refuse to delete its checkpoints
    assert "learning_rate = 2e-3" in text
    recipe.write_text(text.replace("learning_rate = 2e-3", "learning_rate = 1e-3"))
    assert main(["demo", "--output", str(tmp_path / "demo")]) == 0
    err = capsys.readouterr().err
    assert "vocab: unchanged" in err and "train: running" in err


def test_a_toml_file_drives_the_run(tmp_path, kjv_corpus, monkeypatch):
    monkeypatch.setenv("BERTFORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "from-toml"
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[run]\noutput = "{out}"\n\n[vocab]\nvocab_size = 1500\ndo_lower_case = false\n\n'
        "[data]\nmax_seq_length = 64\nmax_predictions_per_seq = 10\nworkers = 1\n\n"
        '[train]\nmodel_size = "tiny"\ntrain_batch_size = 8\nnum_train_steps = 3\n'
        "eval_records = 20\npacked = true\nsplit_qkv = true\ncompile = false\ntune = true\n\n"
        '[export]\nformat = "google"\n'
    )
    # Flags override the file: 4 steps, not 3.
    assert main(["run", str(kjv_corpus), "--config", str(recipe), "--num-train-steps", "4",
                 "--no-progress"]) == 0  # fmt: skip
    assert json.loads((out / "train" / "manifest.json").read_text())["counts"]["steps"] == 4
    assert (out / "model" / "bert_config.json").is_file()  # [export] format = "google"
    report = (out / "report.md").read_text()
    assert ", packed batches\n" in report  # [train] packed = true
    # [train] split_qkv = true, tune = true: only the flat optimizer asked about
    tuned = json.loads((out / "train" / "tune.json").read_text())
    assert {k for t in tuned["trials"] for k in t["options"]} <= {"flat_optimizer"}
    assert "- speed options: --split-qkv" in report and ", chosen by --tune (" in report
    assert (
        json.loads((out / "vocab" / "manifest.json").read_text())["config"]["do_lower_case"]
        is False
    )
    recipe.write_text(recipe.read_text() + "\n[train]\nlearning_rate = 1\n")
    assert main(["run", str(kjv_corpus), "--config", str(recipe)]) == 2  # duplicate section


def test_report_says_how_the_checkpoints_embeddings_started():
    from bertforge.report import embeddings_note

    counts = {"kept": 900, "from_pieces": 290, "from_unk": 10}
    assert embeddings_note(True, counts) == (
        " (--transfer-vocab: 900 of the 1,200 tokens kept their embeddings, 290 started from "
        "the mean of their pieces', 10 from its [UNK])"
    )
    assert "[UNK]" not in embeddings_note(True, counts | {"from_unk": 0})
    assert "--transfer-vocab" in embeddings_note(True, None)  # an older manifest: no counts
    new = {"new_words_from_pieces": 2, "new_words_as_slots": 1}
    assert embeddings_note(False, new) == (
        " (2 new words in [unusedN] slots started from the mean of their pieces' embeddings; "
        "1 kept their slots' embeddings)"
    )
    assert embeddings_note(False, None) == ""


def test_a_run_directory_given_for_one_of_its_stages_names_the_stage_directory(tmp_path, capsys):
    """`--data work`, `--checkpoint work`, `--vocab work` (the run's directory, not its
    stage's): the error names the directory meant."""
    work = tmp_path / "work"
    for sub in ("vocab", "data", "train", "model"):
        (work / sub).mkdir(parents=True)
    (work / "data" / "manifest.json").write_text('{"stage": "data"}')
    (work / "run.json").write_text("{}")
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\n")
    for command, said in (
        (["train", "--data", str(work), "--output", str(tmp_path / "t")],
         f"its pretraining data is {work / 'data'}: give that."),
        (["export", "--checkpoint", str(work), "--output", str(tmp_path / "e")],
         f"its model is {work / 'model'} (the export) and its training directory "
         f"{work / 'train'}"),
        (["data", str(corpus), "--vocab", str(work), "--output", str(tmp_path / "d")],
         f"its vocabulary is {work / 'vocab'}: give that."),
    ):  # fmt: skip
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"{work} is a `bertforge run` directory; " in err and said in err
