"""`bertforge data`: determinism across workers, formats, resume, refusal, verify, bad input."""

from __future__ import annotations

import collections
import errno
import gzip
import io
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bertforge.cli import main
from bertforge.config import DataConfig
from bertforge.data import create_data, print_summary
from bertforge.datacheck import inspect, read_native, read_tfrecord, verify
from bertforge.errors import UserError
from bertforge.fileio import sha256_file
from bertforge.shards import open_shard, read_header, record_dtype, write_shard
from bertforge.tokenization import read_vocab_file
from tests.conftest import report_of, write_arrow, write_corpus


def cfg(corpus: Path, vocab: Path, out: Path, **kw) -> DataConfig:
    if not kw.get("google_compatible"):  # one unit, as Google's script: the default refused
        kw.setdefault("unit_mb", 0.05)
    kw.setdefault("max_seq_length", 64)
    kw.setdefault("max_predictions_per_seq", 10)
    kw.setdefault("workers", 1)
    return DataConfig(input=(str(corpus),), vocab=str(vocab), output=str(out), progress=False,
                      **kw)  # fmt: skip


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))}


@pytest.mark.parametrize("fmt", ["native", "tfrecord"])
def test_output_bytes_do_not_depend_on_workers(tmp_path, kjv_corpus, kjv_vocab, fmt):
    one = create_data(cfg(kjv_corpus, kjv_vocab, tmp_path / "one", format=fmt, dupe_factor=2))
    two = create_data(cfg(kjv_corpus, kjv_vocab, tmp_path / "two", format=fmt, dupe_factor=2,
                          workers=2))  # fmt: skip
    a, b = shard_bytes(one.output), shard_bytes(two.output)
    assert len(a) >= 5 and a == b
    assert one.manifest["shards"] == two.manifest["shards"]
    other = create_data(cfg(kjv_corpus, kjv_vocab, tmp_path / "seed", format=fmt, dupe_factor=2,
                            random_seed=7))  # fmt: skip
    assert shard_bytes(other.output) != a


def test_native_shards_read_with_numpy_alone(tmp_path, kjv_corpus, kjv_vocab):
    out = create_data(cfg(kjv_corpus, kjv_vocab, tmp_path / "d")).output
    tokens = read_vocab_file(kjv_vocab / "vocab.txt")
    cls_id, sep_id = tokens.index("[CLS]"), tokens.index("[SEP]")
    manifest = json.loads((out / "manifest.json").read_text())
    total = 0
    for shard in manifest["shards"]:
        raw = (out / shard["file"]).read_bytes()
        assert raw[:8] == b"BFSHARD\0"
        version, length = struct.unpack("<II", raw[8:16])
        header = json.loads(raw[16 : 16 + length])
        assert version == 1 and (16 + length) % 64 == 0
        dtype = np.dtype([(n, d, tuple(s)) for n, d, s in header["dtype"]])
        rec = np.memmap(out / shard["file"], dtype=dtype, mode="r", offset=16 + length,
                        shape=(header["num_records"],))  # fmt: skip
        assert rec["input_ids"].dtype == np.uint16 and rec["input_ids"].shape[1] == 64
        for r in rec:
            n, a = int(r["length"]), int(r["sep_a"])
            ids = r["input_ids"]
            assert ids[0] == cls_id and ids[a] == sep_id and ids[n - 1] == sep_id
            assert 2 <= a <= n - 3 and (ids[n:] == 0).all() and n <= 64
            assert sep_id not in ids[1:a] and sep_id not in ids[a + 1 : n - 1]
        total += len(rec)
    assert total == manifest["counts"]["instances"] > 100
    counts = manifest["counts"]
    assert 0.4 < counts["random_next_share"] < 0.7 and counts["masked_share"] is None
    assert manifest["config"]["do_lower_case"] is True and manifest["format"]["kind"] == "native"


def test_static_native_and_tfrecord_hold_the_same_instances(tmp_path, kjv_corpus, kjv_vocab):
    native = create_data(cfg(kjv_corpus, kjv_vocab, tmp_path / "n", static_masking=True,
                             dupe_factor=2, do_whole_word_mask=True)).output  # fmt: skip
    tf = create_data(cfg(kjv_corpus, kjv_vocab, tmp_path / "t", format="tfrecord",
                         dupe_factor=2, do_whole_word_mask=True)).output  # fmt: skip
    for a_path, b_path in zip(sorted(native.glob("shard-*")), sorted(tf.glob("shard-*")),
                              strict=True):  # fmt: skip
        a, b = read_native(a_path), read_tfrecord(b_path)
        for name in ("input_ids", "lengths", "segment_ids", "next_sentence", "positions",
                     "labels", "counts"):  # fmt: skip
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
    m = json.loads((tf / "manifest.json").read_text())["counts"]
    assert 0.12 < m["masked_share"] < 0.18  # 15% of all tokens, of the maskable ones


def test_shard_with_large_vocab_uses_uint32(tmp_path):
    rec = np.zeros(3, dtype=record_dtype(100_000, 16, 3, static_masking=False))
    rec["input_ids"][:, 1] = [70_000, 99_999, 5]
    with open(tmp_path / "s.bin", "wb") as f:
        write_shard(f, rec, {"unit": 0})
    _, back = open_shard(tmp_path / "s.bin")
    assert back["input_ids"].dtype == np.uint32 and back["input_ids"][:, 1].tolist() == [
        70_000, 99_999, 5]  # fmt: skip


def test_resume_after_sigkill_gives_identical_output(tmp_path, demo_path, kjv_vocab):
    args = ["--input", str(demo_path), "--vocab", str(kjv_vocab), "--unit-mb", "0.1",
            "--workers", "1", "--max-seq-length", "64"]  # fmt: skip
    cmd = [sys.executable, "-m", "bertforge.cli", "data", *args]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--output", str(killed)])
    deadline = time.time() + 60
    while not (killed / ".parts" / "unit-00005.json").exists():
        assert time.time() < deadline and proc.poll() is None, "run ended before the kill"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()
    assert subprocess.run([*cmd, "--output", str(killed)], capture_output=True).returncode == 0
    clean = tmp_path / "clean"
    assert subprocess.run([*cmd, "--output", str(clean)], capture_output=True).returncode == 0
    assert shard_bytes(killed) == shard_bytes(clean) and len(shard_bytes(clean)) > 30
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (killed, clean))
    assert a["shards"] == b["shards"] and a["counts"] == b["counts"]
    assert not list(killed.glob(".*.tmp")) and not (killed / ".parts").exists()


def test_an_input_fixed_after_an_error_costs_only_the_units_it_changed(
    tmp_path, kjv_corpus, kjv_vocab, capsys
):
    """A bad line far into a large input stops the run; the user fixes it and runs the same
    command. The input files have changed, so the run's id has; the units finished before
    are kept where their text is unchanged (here all but the one where a word was also
    changed), and the output is byte for byte a fresh run's on the fixed input. Other
    settings are still refused."""
    docs = [d for d in kjv_corpus.read_text().split("\n\n") if d.strip()]
    lines = [json.dumps({"text": d}) for d in docs]
    bad = len(lines) * 2 // 3
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join([*lines[:bad], '{"text": "cut', *lines[bad:]]) + "\n")
    out = tmp_path / "d"
    with pytest.raises(UserError, match=rf"{corpus}:{bad + 1}: not valid JSON"):
        create_data(cfg(corpus, kjv_vocab, out))
    finished = sorted((out / ".parts").glob("unit-*.json"))
    assert len(finished) >= 4
    unit1 = json.loads(finished[1].read_text())
    assert unit1["settings_id"] and unit1["text_sha256"]
    changed = next(i for i in range(len(docs)) if "LORD" in docs[i] and i > 0)
    lines[changed] = json.dumps({"text": docs[changed].replace("LORD", "Lord", 1)})
    corpus.write_text("\n".join(lines) + "\n")  # the bad line gone, one word changed
    capsys.readouterr()
    again = create_data(cfg(corpus, kjv_vocab, out))
    assert "the input files changed since the unfinished run" in capsys.readouterr().err
    assert again.resumed_units == len(finished) - 1  # the changed word's unit is redone
    fresh = create_data(cfg(corpus, kjv_vocab, tmp_path / "fresh"))
    assert shard_bytes(out) == shard_bytes(fresh.output) and len(shard_bytes(out)) > 5
    assert again.manifest["shards"] == fresh.manifest["shards"]
    # an input cut shorter: the shards of units it no longer has are removed
    corpus.write_text("\n".join([*lines, '{"text": "cut']) + "\n")
    with pytest.raises(UserError, match="not valid JSON"):
        create_data(cfg(corpus, kjv_vocab, tmp_path / "short"))
    corpus.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    short = create_data(cfg(corpus, kjv_vocab, tmp_path / "short"))
    fresh = create_data(cfg(corpus, kjv_vocab, tmp_path / "short_fresh"))
    assert short.resumed_units > 0 and shard_bytes(short.output) == shard_bytes(fresh.output)
    # an unfinished run with other settings is still refused, input change or not
    from bertforge.data import run_settings
    from bertforge.tokenization import load_vocab

    (out / "manifest.json").unlink()
    run = run_settings(cfg(corpus, kjv_vocab, out), load_vocab(kjv_vocab), [])
    (out / ".bertforge-run.json").write_text(json.dumps({**run, "run_id": "x"}))
    with pytest.raises(UserError, match="--max-seq-length was 64, now 32"):
        create_data(cfg(corpus, kjv_vocab, out, max_seq_length=32))


def test_signals_stop_the_workers_at_once_and_the_rerun_finishes(tmp_path, demo_path, kjv_vocab):
    """Ctrl-C reaches the whole process group. The workers must not print tracebacks, nor
    leave the parent waiting for them at exit (it did, about one Ctrl-C in three with units
    of a megabyte: a worker stopped halfway through reading its next unit wedged the queue),
    nor outlive it. SIGTERM to the parent alone stops it as Ctrl-C does; SIGKILL to the parent
    alone takes the workers with it (they used to wait for a task forever). The rerun makes
    what an uninterrupted run makes."""
    corpus = tmp_path / "corpus.txt"
    text = gzip.decompress(demo_path.read_bytes())
    # Units of 0.5 MB: forty. Each round lets at least one more finish (two workers, often
    # three or four): with twenty, a fast CPU finished the run before the last round.
    corpus.write_bytes(text * math.ceil(20e6 / len(text)))
    args = ["--input", str(corpus), "--vocab", str(kjv_vocab), "--unit-mb", "0.5",
            "--workers", "2", "--max-seq-length", "64", "--no-progress"]  # fmt: skip
    cmd = [sys.executable, "-m", "bertforge.cli", "data", *args]
    out = tmp_path / "out"
    said = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}
    for round_, sig in enumerate([signal.SIGINT] * 5 + [signal.SIGTERM, signal.SIGKILL]):
        proc = subprocess.Popen([*cmd, "--output", str(out)], stderr=subprocess.PIPE,
                                text=True, start_new_session=True)  # fmt: skip
        seen = len(list((out / ".parts").glob("unit-*.json")))
        deadline = time.time() + 60
        while len(list((out / ".parts").glob("unit-*.json"))) <= seen:
            assert time.time() < deadline and proc.poll() is None, "run ended before the signal"
            time.sleep(0.01)
        time.sleep(0.02 * round_)  # each round stops the resumed run at another point
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C does
        else:
            proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=60)  # waits for every holder of its stderr
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"round {round_}: still running 60 s after {sig.name}")
        if sig in said:
            code, word = said[sig]
            assert proc.returncode == code, err
            assert err.strip() == f"bertforge: {word}; finished outputs are kept.", err
        with pytest.raises(ProcessLookupError):  # no worker outlives the parent
            for _ in range(100):
                os.killpg(proc.pid, 0)
                time.sleep(0.05)
    done = len(list((out / ".parts").glob("unit-*.json")))
    assert not (out / "manifest.json").exists(), f"all units done after the signals ({done})"
    assert subprocess.run([*cmd, "--output", str(out)], capture_output=True).returncode == 0
    clean = tmp_path / "clean"
    assert subprocess.run([*cmd, "--output", str(clean)], capture_output=True).returncode == 0
    assert shard_bytes(out) == shard_bytes(clean)
    assert not list(out.glob(".*.tmp")) and not (out / ".parts").exists()


def test_finished_output_is_kept_and_other_settings_refused(tmp_path, kjv_corpus, kjv_vocab):
    out = tmp_path / "d"
    first = create_data(cfg(kjv_corpus, kjv_vocab, out))
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    again = create_data(cfg(kjv_corpus, kjv_vocab, out, workers=2))  # workers don't matter
    assert again.resumed_units == len(mtimes) and again.unchanged and not first.unchanged
    printed = io.StringIO()
    print_summary(again, printed)
    assert "  unchanged: made earlier from the same corpus and settings, so nothing was " in (
        printed.getvalue()
    )
    assert "resumed:" not in printed.getvalue()  # it said N shard(s) "were already finished"
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == mtimes
    # only what differs is named: the manifest's vocabulary path and size were once reported
    # as changed ("--vocab was ..., now None; the vocabulary differs")
    with pytest.raises(UserError, match=r"made with other settings \(--max-seq-length was 64, "
                       r"now 128\); use another directory, .* or pass --overwrite\.$"):  # fmt: skip
        create_data(cfg(kjv_corpus, kjv_vocab, out, max_seq_length=128))
    grown = tmp_path / "grown.txt"
    grown.write_bytes(kjv_corpus.read_bytes() + b"One more line.\n")
    size = kjv_corpus.stat().st_size
    with pytest.raises(UserError, match=rf"other settings \(the input files differ \({grown} had "
                       rf"{size:,} bytes, now {size + 15:,}\)\);"):  # fmt: skip
        grown.write_bytes(kjv_corpus.read_bytes())
        create_data(cfg(grown, kjv_vocab, tmp_path / "g"))
        grown.write_bytes(kjv_corpus.read_bytes() + b"One more line.\n")
        create_data(cfg(grown, kjv_vocab, tmp_path / "g"))
    assert verify(str(out))["records"] == first.manifest["counts"]["instances"]
    replaced = create_data(cfg(kjv_corpus, kjv_vocab, out, max_seq_length=128, overwrite=True))
    assert replaced.manifest["config"]["max_seq_length"] == 128


def test_an_edit_that_keeps_the_corpus_size_is_not_taken_as_unchanged(
    tmp_path, kjv_corpus, kjv_vocab
):
    """The corpus lowercased in place (as many bytes) kept a finished output, as made from the
    same text. Its files' times and sha256 are recorded: edited, it is refused; touched, or
    copied back as it was, it is kept."""
    corpus = tmp_path / "c.txt"
    text = kjv_corpus.read_bytes()
    corpus.write_bytes(text)
    out = tmp_path / "d"
    first = create_data(cfg(corpus, kjv_vocab, out))
    (stamp,) = first.manifest["input_stamps"]
    assert stamp["sha256"] == sha256_file(corpus) and stamp["bytes"] == len(text)
    time.sleep(0.01)
    corpus.write_bytes(text.upper())
    said = (
        f"--output: {out} holds data made from other text ({corpus} has other content, of as "
        f"many bytes ({len(text):,})); use another directory, or pass --overwrite"
    )
    with pytest.raises(UserError, match=re.escape(said)):
        create_data(cfg(corpus, kjv_vocab, out))
    time.sleep(0.01)
    corpus.write_bytes(text)
    assert create_data(cfg(corpus, kjv_vocab, out)).unchanged
    corpus.write_bytes(text.upper())
    assert not create_data(cfg(corpus, kjv_vocab, out, overwrite=True)).unchanged


def test_unfinished_run_with_other_settings_is_refused(tmp_path, kjv_corpus, kjv_vocab):
    out = tmp_path / "d"
    create_data(cfg(kjv_corpus, kjv_vocab, out))
    (out / "manifest.json").unlink()  # as if killed before the end
    (out / ".bertforge-run.json").write_text(
        json.dumps({"stage": "data", "run_id": "x", "config": {"dupe_factor": 3},
                    "vocab_sha256": "y", "inputs": []}))  # fmt: skip
    with pytest.raises(UserError, match="unfinished run made with other settings"):
        create_data(cfg(kjv_corpus, kjv_vocab, out))


def test_verify_finds_damage(tmp_path, kjv_corpus, kjv_vocab):
    out = create_data(cfg(kjv_corpus, kjv_vocab, tmp_path / "d", format="tfrecord")).output
    shards = sorted(out.glob("shard-*"))
    data = bytearray(shards[1].read_bytes())
    data[100] ^= 1
    shards[1].write_bytes(bytes(data))
    shards[2].write_bytes(shards[2].read_bytes()[:-10])
    with pytest.raises(UserError, match=r"2 of \d+ shard\(s\) fail.*shard-00001.tfrecord does not"
                       r" match its sha256.*shard-00002.tfrecord has \d+ bytes"):  # fmt: skip
        verify(str(out))


def test_a_data_directory_without_a_manifest_is_named_for_what_it_holds(train_data, tmp_path):
    """--data DIR with no manifest.json: bertforge's own unfinished output is told to rerun
    the data command; a folder of another tool's files (Google's TFRecords) is told to give
    them by glob, which works, where it was told to rerun a data command it never ran; an
    empty folder is called empty, one of folders alone is told to give the data's own."""
    from bertforge.datacheck import data_files

    unfinished = tmp_path / "unfinished"
    shutil.copytree(train_data, unfinished)
    (unfinished / "manifest.json").unlink()
    google = tmp_path / "google"
    google.mkdir()
    for k in range(2):  # any bytes: only the first file's first 8 are read
        (google / f"tf_examples.tfrecord{k}").write_bytes(b"\x00" * 64)
    (tmp_path / "empty").mkdir()
    (tmp_path / "outer" / "inner").mkdir(parents=True)
    for folder, says in (
        (unfinished, "no manifest.json, so not a finished `bertforge data` output (rerun the "
                     "same data command to finish it)."),
        (google, "no manifest.json, so not a `bertforge data` output; give TFRecord files "
                 f"(Google's create_pretraining_data.py) by name or glob: '{google}/*'."),
        (tmp_path / "empty", "an empty directory, not the output of `bertforge data`."),
        (tmp_path / "outer", "no manifest.json, so not a `bertforge data` output (it holds "
                             "folders only; give the data directory itself)."),
    ):  # fmt: skip
        with pytest.raises(UserError) as e:
            data_files(str(folder))
        assert str(e.value) == f"{folder}: {says}"
    (google / "tf_examples.tfrecord1").unlink()
    with pytest.raises(UserError, match=re.escape(f"glob: '{google}/*.tfrecord0'.")):
        data_files(str(google))
    assert data_files(f"{google}/*.tfrecord0") == ([google / "tf_examples.tfrecord0"], None)
    # Paths that are not there: said once each ("X: no such data file(s): X." before)
    gone, none = tmp_path / "gone", f"{google}/*.tfrecord9"
    for path, says in (
        (str(gone), f"{gone} does not exist (give a `bertforge data` directory, or TFRecord "
                    "files)."),
        (none, f"{none} matches no file."),
        (f"{google}/*.tfrecord0,{none}", f"{none} matches no file (in {google}/*.tfrecord0,"
                                         f"{none})."),
        (f"{google}/tf_examples.tfrecord0,{gone}", f"{google}/tf_examples.tfrecord0,{gone}: no "
                                                   f"such data file(s): {gone}."),
    ):  # fmt: skip
        with pytest.raises(UserError) as e:
            data_files(path)
        assert str(e.value) == says


def test_the_data_tools_numbers_out_of_range_name_the_flag(train_data, tmp_path, capsys):
    """`data inspect --max-records 0` stopped with numpy's ValueError, and `data convert
    --workers -1` with the process pool's; each is one error naming the flag now."""
    for argv, says in (
        (["inspect", str(train_data), "--max-records", "0"], "--max-records: must be 1 or more."),
        (["inspect", str(train_data), "-n", "-1"], "-n: must be 0 or more."),
        (["convert", str(train_data / "x.tfrecord"), "--vocab", "v", "--output",
          str(tmp_path / "c"), "--workers", "-1"],
         "--workers: must be 0 or more (0: every usable CPU)."),
    ):  # fmt: skip
        assert main(["data", *argv]) == 2
        assert capsys.readouterr().err == f"bertforge: error: {says}\n"
    assert not (tmp_path / "c").exists()


def test_inspect_native_and_google_tfrecords(tmp_path, kjv_corpus, kjv_vocab, capsys):
    out = create_data(cfg(kjv_corpus, kjv_vocab, tmp_path / "d")).output
    stats = inspect(str(out), n=2)
    text = capsys.readouterr().out
    assert text.count("tokens: [CLS] ") == 2 and "dynamic masking" in text
    assert "length histogram" in text and 0.4 < stats["random_next_share"] < 0.7
    inspect(str(out), n=1, vocab=str(kjv_vocab))  # its own, named: the same
    assert capsys.readouterr().out.count("tokens: [CLS] ") == 1
    other = tmp_path / "other" / "vocab.txt"  # another, of the same size: other words
    other.parent.mkdir()
    tokens = (kjv_vocab / "vocab.txt").read_text().split("\n")
    other.write_text("\n".join([*tokens[:200], tokens[201], tokens[200], *tokens[202:]]))
    with pytest.raises(UserError, match=rf"--vocab: {other} is not the vocabulary the data in "):
        inspect(str(out), n=1, vocab=str(other))
    tf = create_data(cfg(kjv_corpus, kjv_vocab, tmp_path / "g", google_compatible=True,
                         dupe_factor=1)).output  # fmt: skip
    assert main(["data", "inspect", str(tf / "data.tfrecord"), "-n", "1", "--vocab",
                 str(kjv_vocab)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "masked_lm_labels:" in text and "[MASK]" in text and "masked " in text
    alone = Path(shutil.copy(tf / "data.tfrecord", tmp_path / "alone.tfrecord"))
    assert main(["data", "inspect", str(alone), "-n", "1"]) == 0  # ids: said, and how to see words
    text = capsys.readouterr().out
    assert text.startswith(f"(token ids: {alone} names no vocabulary; --vocab shows them as "
                           "words)\ninstance 0:\n  token ids: 101 ")  # fmt: skip


def test_google_flag_spellings(tmp_path, kjv_corpus, kjv_vocab, capsys):
    rc = main(["data", f"--input_file={kjv_corpus}", f"--vocab_file={kjv_vocab / 'vocab.txt'}",
               "--do_lower_case=True", f"--output_dir={tmp_path / 'd'}", "--max_seq_length=32",
               "--max_predictions_per_seq=5", "--dupe_factor=1",
               "--google-compatible"])  # fmt: skip
    assert rc == 0 and "instances" in capsys.readouterr().out
    assert verify(str(tmp_path / "d"))["shards"] == 1


# ----------------------------------------------------------------------------- bad input


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(["data", *args])
    return rc, capsys.readouterr().err


def test_a_corpus_of_long_lines_is_warned_about(tmp_path, kjv_corpus, kjv_vocab, capsys):
    """One document per line (a common corpus layout) instead of one sentence per line: an
    instance keeps only each line's start, which the summary says (the demo-like corpus with
    a sentence per line holds more than its text: random next sentences repeat some)."""
    text = kjv_corpus.read_text()
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(d.replace("\n", " ") for d in text.split("\n\n")) + "\n")
    base = ["--vocab", str(kjv_vocab), "--max-seq-length", "64"]
    rc, err = run_cli(["--input", str(lines), *base, "--output", str(tmp_path / "l")], capsys)
    assert rc == 0 and "warning: the instances hold only" in err
    assert "expects one sentence per line" in err and "keeps at most 64" in err
    counts = json.loads((tmp_path / "l" / "manifest.json").read_text())["counts"]
    assert counts["text_ratio"] < 0.5
    rc, err = run_cli(["--input", str(kjv_corpus), *base, "--output", str(tmp_path / "s")], capsys)
    assert rc == 0 and "warning" not in err
    counts = json.loads((tmp_path / "s" / "manifest.json").read_text())["counts"]
    assert 1.0 < counts["text_ratio"] < 1.5


def test_split_sentences_keeps_the_text_of_paragraph_lines(tmp_path, kjv_corpus, kjv_vocab, capsys):
    """A corpus with a paragraph per line loses most of its text: a warning names the fix (not
    also the one-sentence-documents warning that follows from it), and where the input holds
    several units the first shard's says so at once. --split-sentences
    keeps it: the instances are those of the corpus split by sentences_documents beforehand,
    in either mode, whatever the workers; the summary says how many lines became how many
    sentences. Without the option the run settings are those of data made before it."""
    from bertforge.data import run_settings, sentence_documents
    from bertforge.tokenization import load_vocab

    docs = [d.split("\n") for d in kjv_corpus.read_text().split("\n\n") if d.strip()]
    paragraphs = write_corpus(tmp_path / "p.txt", [[" ".join(d)] for d in docs])
    split = write_corpus(tmp_path / "s.txt", sentence_documents([[" ".join(d)] for d in docs]))
    base = ["--vocab", str(kjv_vocab), "--max-seq-length", "64", "--unit-mb", "0.05"]
    rc, err = run_cli(["--input", str(paragraphs), *base, "--output", str(tmp_path / "p")],
                      capsys)  # fmt: skip
    early, final = [line for line in err.splitlines() if line.startswith("warning:")]
    assert rc == 0 and "(--split-sentences does" in final
    assert early.endswith("(So far, from the first shard; Ctrl-C stops the run.)")
    assert early.startswith("warning: the instances hold only")  # the same warning, at once
    # an input of under EARLY_WARNING_UNITS units: only the final warning
    rc, err = run_cli(["--input", str(paragraphs), *base[:-1], "1", "--output",
                       str(tmp_path / "p1")], capsys)  # fmt: skip
    assert rc == 0 and err.count("warning:") == 1 and "(--split-sentences does" in err
    said = []
    for workers in ("1", "2"):
        rc = main(["data", "--input", str(paragraphs), *base, "--split-sentences", "--workers",
                   workers, "--output", str(tmp_path / f"w{workers}")])  # fmt: skip
        printed = capsys.readouterr()
        assert rc == 0 and "warning" not in printed.err
        said += [line for line in printed.out.splitlines() if "split:" in line]
    rc, err = run_cli(["--input", str(split), *base, "--output", str(tmp_path / "s")], capsys)
    assert rc == 0
    manifests = {
        k: json.loads((tmp_path / k / "manifest.json").read_text()) for k in ("w1", "w2", "s")
    }
    sentences = manifests["w1"]["counts"]["sentences"]
    assert sentences == manifests["s"]["counts"]["sentences"] > 3 * len(docs)
    assert manifests["w1"]["counts"]["text_ratio"] > 0.9
    split_line = f"split: {len(docs):,} lines into {sentences:,} sentences (--split-sentences)"
    assert said == [f"  {split_line}"] * 2  # a line per document
    assert f"- {split_line}\n" in report_of(tmp_path, data="w1")
    records = {k: [open_shard(tmp_path / k / s["file"])[1] for s in m["shards"]]
               for k, m in manifests.items()}  # fmt: skip
    for k in ("w2", "s"):
        assert len(records[k]) == len(records["w1"]) > 1
        assert all((a == b).all() for a, b in zip(records["w1"], records[k], strict=True))
    google = [*base[:-2], "--google-compatible", "--dupe-factor", "2"]  # one unit: no --unit-mb
    run_cli(["--input", str(paragraphs), *google, "--split-sentences", "--output",
             str(tmp_path / "g1")], capsys)  # fmt: skip
    run_cli(["--input", str(split), *google, "--output", str(tmp_path / "g2")], capsys)
    g1, g2 = (tmp_path / g / "data.tfrecord" for g in ("g1", "g2"))
    assert g1.read_bytes() == g2.read_bytes() and g1.stat().st_size > 0
    for g in ("g1", "g2"):  # sentences, not lines, in Google's mode too
        assert json.loads((tmp_path / g / "manifest.json").read_text())["counts"][
            "sentences"] == sentences  # fmt: skip
    vocab = load_vocab(kjv_vocab)
    off = run_settings(cfg(paragraphs, kjv_vocab, tmp_path / "x"), vocab, [])
    assert "split_sentences" not in off["config"]


def test_wikiextractor_output_gives_its_articles(tmp_path, kjv_corpus, kjv_vocab, capsys):
    """A corpus in WikiExtractor's <doc> markup gives the instances of its articles in
    Google's format (each element a document, the tag lines dropped); the summary says how
    it was read."""
    docs = [d.split("\n") for d in kjv_corpus.read_text().split("\n\n") if d.strip()]
    wiki = tmp_path / "wiki_00"
    wiki.write_text("".join(
        f'<doc id="{i}" url="https://en.wikipedia.org/wiki?curid={i}" title="Part {i}">\n'
        f"Part {i}\n\n" + "\n".join(d) + "\n</doc>\n" for i, d in enumerate(docs)
    ))  # fmt: skip
    plain = write_corpus(tmp_path / "plain.txt", [[f"Part {i}", *d] for i, d in enumerate(docs)])
    for name, corpus in (("w", wiki), ("p", plain)):
        assert main(["data", "--input", str(corpus), "--vocab", str(kjv_vocab), "--output",
                     str(tmp_path / name), "--max-seq-length", "64"]) == 0  # fmt: skip
        printed = capsys.readouterr().out
        said = f"  read as WikiExtractor output: {len(docs):,} <doc> elements"
        assert (said in printed) == (name == "w")
    w, p = (json.loads((tmp_path / k / "manifest.json").read_text()) for k in ("w", "p"))
    assert w["counts"]["documents"] == w["counts"]["corpus"]["doc_elements"] == len(docs)
    assert w["counts"]["sentences"] == p["counts"]["sentences"]
    assert w["counts"]["corpus_tokens"] == p["counts"]["corpus_tokens"]
    records = [[open_shard(tmp_path / k / s["file"])[1] for s in m["shards"]]
               for k, m in (("w", w), ("p", p))]  # fmt: skip
    assert len(records[0]) > 0 and all((a == b).all() for a, b in zip(*records, strict=True))


def test_a_damaged_record_of_an_unfinished_run_is_an_error(tmp_path, kjv_corpus, kjv_vocab):
    """An output directory whose unfinished run's record (.bertforge-run.json) is damaged is
    not taken for a data output: one error saying to pass --overwrite, the directory left as
    it is; --overwrite then makes the data."""
    from bertforge.fileio import RUN_FILE

    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_FILE).write_bytes(b'{"inputs": [\xff')
    with pytest.raises(UserError, match=rf"{out} is not empty and is not a bertforge data"):
        create_data(cfg(kjv_corpus, kjv_vocab, out))
    assert (out / RUN_FILE).read_bytes() == b'{"inputs": [\xff'
    made = create_data(cfg(kjv_corpus, kjv_vocab, out, overwrite=True))
    assert made.manifest["counts"]["instances"] > 0 and not (out / RUN_FILE).exists()


def test_json_lines_give_the_instances_of_their_records(tmp_path, kjv_corpus, kjv_vocab, capsys):
    """A JSON Lines corpus (each record's "text" a document, non-ASCII letters as \\u escapes)
    gives the records of the same documents in Google's format, a record without text left
    out with a warning; the summary says how it was read. --text-field enters the run
    settings only when not "text"; --google-compatible reads JSON as text and says so, and
    refuses --text-field."""
    from bertforge.data import run_settings
    from bertforge.tokenization import load_vocab

    docs = [d.split("\n") for d in kjv_corpus.read_text().split("\n\n") if d.strip()]
    docs[0][0] += " Çiçek ışık"
    jsonl = tmp_path / "c.jsonl"
    records = [{"id": i, "text": "\n".join(d)} for i, d in enumerate(docs)]
    records.insert(3, {"id": "x", "text": None})
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "\\u00c7" in jsonl.read_text()
    plain = write_corpus(tmp_path / "plain.txt", docs)
    for name, corpus in (("j", jsonl), ("p", plain)):
        assert main(["data", "--input", str(corpus), "--vocab", str(kjv_vocab), "--output",
                     str(tmp_path / name), "--max-seq-length", "64"]) == 0  # fmt: skip
        out, err = capsys.readouterr()
        said = f'  read as records: {len(records):,} from 1 JSON Lines file(s), the "text" field'
        assert (said in out) == (name == "j")
        assert ('1 record(s) had no string "text" field' in err) == (name == "j")
    j, p = (json.loads((tmp_path / k / "manifest.json").read_text()) for k in ("j", "p"))
    assert j["counts"]["documents"] == p["counts"]["documents"] == len(docs)
    assert j["counts"]["corpus"]["records"] == len(records)
    assert j["counts"]["corpus_tokens"] == p["counts"]["corpus_tokens"]
    shards = [[open_shard(tmp_path / k / s["file"])[1] for s in m["shards"]]
              for k, m in (("j", j), ("p", p))]  # fmt: skip
    assert len(shards[0]) > 0 and all((a == b).all() for a, b in zip(*shards, strict=True))
    assert "text_field" not in j["config"]
    vocab = load_vocab(kjv_vocab)
    named = run_settings(cfg(jsonl, kjv_vocab, tmp_path / "x", text_field="body"), vocab, [])
    assert named["config"]["text_field"] == "body"
    # Google's mode reads the JSON as text, as Google's script, and warns
    assert main(["data", "--input", str(jsonl), "--vocab", str(kjv_vocab), "--output",
                 str(tmp_path / "g"), "--google-compatible"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "1 file(s) are JSON Lines, read as text as Google's script reads them" in err
    g = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert g["counts"]["corpus"]["json_as_text"] == 1
    with pytest.raises(UserError, match="--text-field: --google-compatible reads every file"):
        cfg(jsonl, kjv_vocab, tmp_path / "y", google_compatible=True, text_field="body")


def test_a_datasets_folder_gives_the_instances_of_its_rows(tmp_path, kjv_corpus, kjv_vocab):
    """Hugging Face datasets' save_to_disk folder (Arrow streams of 1,000-row batches, two
    shards, and its JSON metadata) gives the same shards as the JSON Lines of its rows, with
    two workers; the manifest counts the Arrow files and their records."""
    pa = pytest.importorskip("pyarrow")
    docs = [d.split("\n") for d in kjv_corpus.read_text().split("\n\n") if d.strip()]
    texts = ["\n".join(d) for d in docs]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    saved = tmp_path / "saved"
    saved.mkdir()
    half = len(texts) // 2
    for i, part in enumerate((texts[:half], texts[half:])):
        table = pa.table({"id": range(len(part)), "text": part})
        write_arrow(saved / f"data-0000{i}-of-00002.arrow", table, 1000)
    (saved / "state.json").write_text('{\n  "_split": "train"\n}\n')
    (saved / "dataset_info.json").write_text('{"builder_name": "json", "citation": ""}\n')
    for name, corpus in (("j", jsonl), ("a", saved)):
        assert main(["data", "--input", str(corpus), "--vocab", str(kjv_vocab), "--output",
                     str(tmp_path / name), "--unit-mb", "0.2", "--workers", "2"]) == 0  # fmt: skip
    j, a = (json.loads((tmp_path / k / "manifest.json").read_text()) for k in ("j", "a"))
    assert (a["counts"]["corpus"]["arrow_files"], a["counts"]["corpus"]["records"]) == (
        2,
        len(texts),
    )
    assert a["counts"]["corpus"]["text_files"] == 0
    assert j["counts"]["documents"] == a["counts"]["documents"] == len(docs)
    assert len(a["shards"]) == len(j["shards"]) > 1
    for x, y in zip(j["shards"], a["shards"], strict=True):
        assert (tmp_path / "j" / x["file"]).read_bytes() == (
            tmp_path / "a" / y["file"]
        ).read_bytes()


def test_documents_unlike_googles_are_warned_about(tmp_path, kjv_corpus, kjv_vocab, capsys):
    """No blank line anywhere (the corpus one document), or one after every line (documents
    of one sentence, so every pair's next sentence is random): a warning each, in report.md
    too. The corpus as it should be says nothing (test above)."""
    from bertforge.data import document_warning

    text = kjv_corpus.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    one = tmp_path / "one.txt"
    one.write_text("\n".join(lines) + "\n")
    base = ["--vocab", str(kjv_vocab), "--max-seq-length", "64"]
    rc, err = run_cli(["--input", str(one), *base, "--output", str(tmp_path / "one")], capsys)
    assert rc == 0
    assert f"warning: the corpus is one document of {len(lines):,} sentences (no blank " in err
    each = tmp_path / "each.txt"
    each.write_text("\n\n".join(lines[:3000]) + "\n")
    rc, err = run_cli(["--input", str(each), *base, "--output", str(tmp_path / "each")], capsys)
    assert rc == 0
    assert "warning: 100% of the instances pair a random next sentence" in err
    assert "the documents average 1.0 sentences" in err
    assert "where each line is a paragraph, --split-sentences splits it." in err
    assert document_warning({"documents": 1, "sentences": 100}) is None  # a small text
    assert document_warning({"documents": 2, "sentences": 10**6}) is None  # two books
    share = {"documents": 900, "sentences": 1000, "instances": 900}
    assert document_warning({**share, "random_next_share": 0.89}) is None
    assert document_warning({**share, "random_next_share": 0.9}) is not None
    assert "- **warning: the corpus is one document of" in report_of(tmp_path, data="one")


def test_a_masking_cap_below_the_masked_lm_prob_is_warned_about(
    tmp_path, kjv_corpus, kjv_vocab, capsys
):
    """--max-predictions-per-seq under round(max_seq_length x masked_lm_prob) masks the
    longer instances less than asked (Google's default 20 from max_seq_length 137 on): one
    warning with the value to give, before the work; report.md repeats it."""
    from bertforge.data import mask_cap_warning

    assert mask_cap_warning(128, 20, 0.15) is None  # Google's pair: round(19.2) = 19
    assert mask_cap_warning(136, 20, 0.15) is None  # round(20.4)
    assert "Give --max-predictions-per-seq 21 " in (mask_cap_warning(137, 20, 0.15) or "")
    assert "Give --max-predictions-per-seq 77 " in (mask_cap_warning(512, 20, 0.15) or "")
    assert mask_cap_warning(512, 77, 0.15) is None
    assert mask_cap_warning(512, 102, 0.2) is None  # round(102.4)
    assert mask_cap_warning(512, 101, 0.2) is not None
    out = tmp_path / "d"
    rc, err = run_cli(["--input", str(kjv_corpus), "--vocab", str(kjv_vocab), "--output",
                       str(out), "--max-seq-length", "256", "--max-predictions-per-seq", "10"],
                      capsys)  # fmt: skip
    assert rc == 0
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warning.startswith("warning: --max-predictions-per-seq 10 masks at most 10 of an ")
    assert "instance's 256 tokens (3.9%)" in warning and "asks for 38" in warning
    assert f"- **{warning}**\n" in report_of(tmp_path, data="d")


def test_the_masking_cap_follows_the_length_unless_given(tmp_path, kjv_corpus, kjv_vocab, capsys):
    """--max-predictions-per-seq left out is Google's 20, raised to round(max_seq_length x
    masked_lm_prob) where that is more, so it never needs the warning above; given, it is
    kept; --google-compatible keeps Google's 20 (and warns). The data manifest and the
    shards hold the value used, and training reads it from there."""

    def cap(**kw):
        return DataConfig(input=("c",), vocab="v", output="o", **kw).resolved_max_predictions

    assert [cap(max_seq_length=n) for n in (16, 64, 128, 136, 137, 256, 512)] == [
        13, 20, 20, 20, 21, 38, 77]  # fmt: skip
    assert cap(max_seq_length=128, masked_lm_prob=0.2) == 26  # round(25.6)
    assert cap(max_seq_length=512, max_predictions_per_seq=10) == 10
    assert cap(max_seq_length=512, google_compatible=True) == 20
    out = tmp_path / "d"
    rc, err = run_cli(["--input", str(kjv_corpus), "--vocab", str(kjv_vocab), "--output",
                       str(out), "--max-seq-length", "256"], capsys)  # fmt: skip
    assert rc == 0 and "warning" not in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["max_predictions_per_seq"] == 38
    assert read_header(next(out.glob("shard-*.bin"))).meta["max_predictions_per_seq"] == 38
    # output made with Google's 20 (an older bertforge's default) is not this run's: the
    # rerun names the difference
    rc, err = run_cli(["--input", str(kjv_corpus), "--vocab", str(kjv_vocab), "--output",
                       str(out), "--max-seq-length", "256", "--max_predictions_per_seq", "20"],
                      capsys)  # fmt: skip
    assert rc != 0 and "--max-predictions-per-seq was 38, now 20" in err


def test_a_vocabulary_that_leaves_many_unks_is_warned_about(
    tmp_path, kjv_corpus, kjv_vocab, capsys
):
    """The share of the corpus's tokens that became [UNK] goes into the manifest; from 1% on
    a warning names the vocabulary and its casing. The classic case: an uncased vocab.txt
    read as cased (every capitalized word is [UNK])."""
    import transformers

    from bertforge.data import unk_share, unk_warning, unk_words

    rc, err = run_cli(["--input", str(kjv_corpus), "--vocab", str(kjv_vocab), "--output",
                       str(tmp_path / "right")], capsys)  # fmt: skip
    assert rc == 0 and "[UNK]" not in err
    counts = json.loads((tmp_path / "right" / "manifest.json").read_text())["counts"]
    assert counts["unk_share"] == 0.0  # the vocabulary was trained on this corpus
    bare = tmp_path / "bare" / "vocab.txt"
    bare.parent.mkdir()
    bare.write_bytes((kjv_vocab / "vocab.txt").read_bytes())
    rc, err = run_cli(["--input", str(kjv_corpus), "--vocab", str(bare), "--no-do-lower-case",
                       "--output", str(tmp_path / "wrong")], capsys)  # fmt: skip
    assert rc == 0
    manifest = json.loads((tmp_path / "wrong" / "manifest.json").read_text())
    share = manifest["counts"]["unk_share"]
    assert 0.05 < share < 0.5  # "And", "God", "LORD", ...
    # the words named: the corpus's most frequent [UNK]s as transformers' tokenizer finds them
    hf = transformers.BertTokenizerFast(str(bare), do_lower_case=False)
    found: collections.Counter[str] = collections.Counter()
    for line in kjv_corpus.read_text(encoding="utf-8").splitlines():
        enc = hf(line, add_special_tokens=False, return_offsets_mapping=True)
        spans = zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        found.update(line[a:b] for i, (a, b) in spans if i == hf.unk_token_id)
    top = [w for _, w in sorted((-c, w) for w, c in found.items())[:5]]
    assert manifest["counts"]["unk_words"] == top and all(w != w.lower() for w in top)
    named = ", ".join(f'"{w}"' for w in top)
    said = (f"warning: {share:.1%} of the corpus's tokens are [UNK] (most often {named}): the "
            f"vocabulary ({bare}, read as cased)")  # fmt: skip
    assert said in err
    assert (
        f"the vocabulary {bare} is read cased (--cased), but none of its" in err
    )  # said first too
    assert unk_warning({"unk_share": 0.0099}, True, "v") is None
    assert "read as uncased" in (unk_warning({"unk_share": 0.01}, True, "v") or "")
    assert unk_warning({"unk_share": None}, True, "v") is None  # Google's mode: not counted
    parts = [{"unk_tokens": 1, "corpus_tokens": 30}, {"unk_tokens": 2, "corpus_tokens": 70}]
    assert unk_share(parts) == 0.03
    assert unk_share([*parts, {"corpus_tokens": 5}]) is None  # a part from an older run
    kept = [{"unk_examples": [["a", 3], ["b", 2]]}, {}, {"unk_examples": [["b", 2], ["c", 1]]}]
    assert unk_words(kept) == ["b", "a", "c"]  # summed over the units that kept examples
    report = report_of(tmp_path, data="wrong")
    assert f"of the corpus's tokens are [UNK] (most often {named}): the vocabulary" in report
    # in units of a twentieth of the corpus, the first shard warns before the run goes on
    rc, err = run_cli(["--input", str(kjv_corpus), "--vocab", str(bare), "--no-do-lower-case",
                       "--unit-mb", "0.015", "--output", str(tmp_path / "u")], capsys)  # fmt: skip
    early, final = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert early.startswith("warning: ") and "read as cased" in early and "most often" in early
    assert early.endswith("(So far, from the first shard; Ctrl-C stops the run.)")
    assert final.startswith(f"warning: {share:.1%} of the corpus's tokens are [UNK] (most")


def test_a_bare_vocabulary_read_with_the_other_casing_is_warned_about_first(
    tmp_path, kjv_corpus, kjv_vocab, mixed_corpus, capsys
):
    """A bare vocab.txt's casing is the flag's; its tokens tell which it was made with. Read
    lowercased, a cased one (mBERT's, a Turkish model's) never uses its capitalized tokens and
    loses its accents; read cased, an uncased one turns capitalized words into [UNK]. Both are
    warned about before any work (the [UNK] warning comes only at the end), naming the file,
    the flag to pass and the tokens that tell."""
    from bertforge.config import VocabConfig
    from bertforge.vocab import train_vocab

    cased = tmp_path / "cased"
    train_vocab(VocabConfig(input=(str(kjv_corpus),), output=str(cased), vocab_size=1500,
                            do_lower_case=False, progress=False))  # fmt: skip
    bare = {}
    for name, source in (("cased", cased), ("uncased", kjv_vocab)):
        bare[name] = tmp_path / f"bare_{name}" / "vocab.txt"
        bare[name].parent.mkdir()
        bare[name].write_bytes((source / "vocab.txt").read_bytes())
    base = ["--input", str(mixed_corpus), "--max-seq-length", "32", "--workers", "1"]

    def data(vocab: Path, casing: str, out: str) -> list[str]:
        rc, err = run_cli([*base, "--vocab", str(vocab), casing, "--output",
                           str(tmp_path / out)], capsys)  # fmt: skip
        assert rc == 0, err
        return [line for line in err.splitlines() if "looks " in line]

    (line,) = data(bare["cased"], "--lowercase", "a")
    capitals = [t for t in bare["cased"].read_text().split() if t != t.lower() and t[0] != "["]
    assert line.startswith(
        f"bertforge: warning: the vocabulary {bare['cased']} is read lowercased (--lowercase), "
        "but "
        f"{len(capitals):,} of its "
    )
    assert "tokens hold capital letters (" in line and "it looks cased" in line
    assert line.endswith("Pass --cased if it was made from cased text.")
    (line,) = data(bare["uncased"], "--cased", "b")
    assert line.startswith(
        f"bertforge: warning: the vocabulary {bare['uncased']} is read cased (--cased), but none "
        "of its "
    )
    assert "it looks uncased. Read so, every word with a capital letter becomes [UNK]" in line
    assert data(bare["cased"], "--cased", "c") == []
    assert data(bare["uncased"], "--lowercase", "d") == []
    assert data(cased, "--cased", "e") == []  # its casing recorded (manifest): not a guess


def test_a_disk_too_small_for_the_shards_is_warned_about_at_the_first(
    tmp_path, kjv_corpus, kjv_vocab, monkeypatch, capsys
):
    """A long run (four units or more) says after its first shard, from that shard's bytes
    per byte of text, when the shards to come will not fit on the disk."""
    from bertforge import data as data_module
    from bertforge.data import expanded_size, space_warning

    free = {"bytes": 0}
    real = shutil.disk_usage
    monkeypatch.setattr(data_module.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=free["bytes"]))  # fmt: skip
    base = ["--input", str(kjv_corpus), "--vocab", str(kjv_vocab), "--unit-mb", "0.015"]
    rc, err = run_cli([*base, "--output", str(tmp_path / "a")], capsys)
    (early,) = [line for line in err.splitlines() if "disk" in line]
    assert rc == 0 and early.startswith(f"warning: {tmp_path / 'a'}: its disk has 0.0 MB free")
    assert early.endswith("(So far, from the first shard; Ctrl-C stops the run.)")
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    shards = sum(s["bytes"] for s in m["shards"])
    free["bytes"] = shards  # room for them all
    rc, err = run_cli([*base, "--output", str(tmp_path / "b")], capsys)
    assert rc == 0 and "disk" not in err
    # gzip'd (the text 3.3 times its size on disk): the text's size is what is compared, not
    # the file's (taken before, it gave a third of the need, and no warning)
    packed = tmp_path / "kjv.txt.gz"
    packed.write_bytes(gzip.compress(kjv_corpus.read_bytes()))
    assert packed.stat().st_size * 3 < kjv_corpus.stat().st_size
    free["bytes"] = shards // 2
    gz = ["--input", str(packed), *base[2:]]
    rc, err = run_cli([*gz, "--output", str(tmp_path / "c")], capsys)
    (early,) = [line for line in err.splitlines() if "disk" in line]
    text = re.search(r"of the corpus's ([0-9.]+) MB of text\)", early)
    assert rc == 0 and text and abs(float(text[1]) - kjv_corpus.stat().st_size / 1e6) <= 0.05
    # The estimate: the first shard's bytes per byte of text, times the text still to come.
    first = {"bytes": 100, "text_bytes": 1000}
    free["bytes"] = 899
    assert "about 0.0 MB" in (space_warning(first, tmp_path, 10_000, [first]) or "")
    free["bytes"] = 900
    assert space_warning(first, tmp_path, 10_000, [first]) is None
    assert space_warning(first, tmp_path, 10_000, [first, {"text_bytes": 5000}]) is None
    assert space_warning(first, tmp_path, None, [first]) is None  # a pipe: size unknown
    assert space_warning({"bytes": 100}, tmp_path, 10_000, []) is None  # an older part
    assert expanded_size(1000, 3300, 1000) == 3300 and expanded_size(1000, 0, 0) == 1000
    assert expanded_size(None, 5, 1) is None and expanded_size(1000, 990, 1000) == 1000


def test_bad_inputs_give_one_clear_error(tmp_path, kjv_corpus, kjv_vocab, capsys):
    base = ["--vocab", str(kjv_vocab), "--output", str(tmp_path / "o")]
    empty = write_corpus(tmp_path / "empty.txt", [[" "]])
    rc, err = run_cli(["--input", str(empty), *base], capsys)
    assert rc == 2 and "contains no text" in err
    assert not (tmp_path / "o").exists()  # it made the directory: not left behind, empty
    nothing = write_corpus(tmp_path / "ctl.txt", [["\x07\x07", "\x00"], ["\u200b"]])
    rc, err = run_cli(["--input", str(nothing), *base, "--overwrite"], capsys)
    assert rc == 2 and "gave no instance" in err
    rc, err = run_cli(["--input", str(kjv_corpus), "--vocab", str(kjv_vocab / "vocab.txt"),
                       "--output", str(tmp_path / "bare")], capsys)  # fmt: skip
    assert rc == 0  # vocab.txt beside its manifest-less tokenizer_config: casing found there
    bare = tmp_path / "bare_vocab" / "vocab.txt"
    bare.parent.mkdir()
    bare.write_text((kjv_vocab / "vocab.txt").read_text())
    rc, err = run_cli(["--input", str(kjv_corpus), "--vocab", str(bare), "--output",
                       str(tmp_path / "b2")], capsys)  # fmt: skip
    assert rc == 2 and "--do-lower-case" in err and str(bare) in err
    no_mask = tmp_path / "nomask.txt"
    no_mask.write_text(bare.read_text().replace("[MASK]\n", "[MASKX]\n"))
    rc, err = run_cli(["--input", str(kjv_corpus), "--vocab", str(no_mask),
                       "--do-lower-case", "--output", str(tmp_path / "b3")], capsys)  # fmt: skip
    assert rc == 2 and "[MASK]" in err and "nomask.txt" in err
    dupes = tmp_path / "dupes.txt"
    dupes.write_text(bare.read_text() + "the\n")
    rc, err = run_cli(["--input", str(kjv_corpus), "--vocab", str(dupes),
                       "--do-lower-case", "--output", str(tmp_path / "b4")], capsys)  # fmt: skip
    assert rc == 2 and "dupes.txt" in err and "the" in err
    rc, err = run_cli(["--input", str(kjv_corpus), *base, "--max-seq-length", "16",
                       "--max-predictions-per-seq", "20"], capsys)  # fmt: skip
    assert rc == 2 and "--max-predictions-per-seq" in err and "13" in err
    assert err.count("\n") == 1


def test_short_documents_and_long_sentences(tmp_path, kjv_vocab):
    long_sentence = " ".join(["and the earth was without form"] * 60)
    docs = [["In the beginning."]] * 30 + [[long_sentence, "Void."], [long_sentence]] * 10
    corpus = write_corpus(tmp_path / "c.txt", docs)
    result = create_data(cfg(corpus, kjv_vocab, tmp_path / "d", format="tfrecord",
                             dupe_factor=3))  # fmt: skip
    batch = read_tfrecord(next(result.output.glob("shard-*")))
    assert len(batch) > 50 and batch.lengths.max() == 64 and batch.next_sentence.any()


def test_full_disk_leaves_no_complete_looking_shard(tmp_path, kjv_corpus, kjv_vocab, monkeypatch):
    import bertforge.fileio as fileio

    real_fsync = os.fsync
    calls = {"n": 0}

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", failing_fsync)
    out = tmp_path / "d"
    with pytest.raises(UserError, match=r"no space left.*run the same command again"):
        create_data(cfg(kjv_corpus, kjv_vocab, out))
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp"))
    for part in (out / ".parts").glob("*.json"):  # every finished unit's shard is whole
        shard = json.loads(part.read_text())
        assert (out / shard["file"]).stat().st_size == shard["bytes"]
    monkeypatch.setattr(fileio.os, "fsync", real_fsync)
    result = create_data(cfg(kjv_corpus, kjv_vocab, out))
    assert result.resumed_units >= 1
    assert verify(str(out))["shards"] == len(result.manifest["shards"])
