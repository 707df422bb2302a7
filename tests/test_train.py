"""`bertforge train` on CPU: learning, exact resume, micro-batching, OOM and NaN handling,
checks against the data, TFRecord input, other optimizers, init checkpoints, two processes."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import errno
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bertforge import batches, hardware
from bertforge import train as train_module
from bertforge.batches import Order, PretrainingData, Split, step_rows
from bertforge.checkpoint import (
    checkpoint_bytes,
    list_checkpoints,
    read_init_checkpoint,
    saves_left,
)
from bertforge.cli import main
from bertforge.config import DataConfig, TrainConfig
from bertforge.data import create_data
from bertforge.distributed import Dist
from bertforge.errors import UserError
from bertforge.fileio import size_text
from bertforge.model import BertConfig, BertForPretraining, Layer, from_hf, to_hf
from bertforge.optim import GoogleAdamW, learning_rate
from bertforge.shards import read_header
from bertforge.tfrecord import decode_example, encode_example, frame, read_records
from bertforge.tokenization import wordpiece_tokenizer
from bertforge.train import train
from tests.conftest import FullDisk, run_group, vocab_head

LOSSES = ("loss", "masked_lm_loss", "next_sentence_loss", "masked_lm_accuracy")
# For bertforge in a subprocess: fp32 as in this process (conftest.fp32_on_every_cpu).
FP32 = ("--precision", "fp32")


def metrics(out: Path, evals: bool = False) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if bool(r.get("eval")) == evals]


def args(data: Path, out: Path, bert: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--output",
        str(out),
        "--bert-config",
        str(bert),
        "--train-batch-size",
        "16",
        "--log-every",
        "1",
        "--no-progress",
        *extra,
    ]


def test_tiny_model_learns(tmp_path, train_data, tiny_bert_config):
    out = tmp_path / "run"
    assert (
        main(
            args(
                train_data,
                out,
                tiny_bert_config,
                "--num-train-steps",
                "300",
                "--learning-rate",
                "2e-3",
                "--save-checkpoints-steps",
                "150",
            )
        )
        == 0
    )
    first = metrics(out)[0]  # step 1: the random model
    final = metrics(out, evals=True)[-1]
    assert first["masked_lm_accuracy"] < 0.01
    assert final["masked_lm_accuracy"] > 0.05
    assert final["loss"] < first["loss"] - 1.5
    text = (out / "eval_results.txt").read_text().splitlines()
    assert [line.split(" = ")[0] for line in text] == sorted(train_module.EVAL_KEYS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "train" and manifest["counts"]["steps"] == 300
    assert {"vocab.txt", "bert_config.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert [p.name for p in list_checkpoints(out)] == ["ckpt-00000150.pt", "ckpt-00000300.pt"]


def test_the_eval_line_gives_the_unigram_baseline(tmp_path, capsys):
    """An accuracy means little without the best constant guess beside it (the report and
    `bertforge run`'s summary have it too)."""
    result = {k: 0.25 for k in train_module.EVAL_KEYS}
    result |= {"global_step": 7, "masked_lm_accuracy": 0.0874, "masked_lm_unigram_baseline": 0.0858}
    train_module.report_eval(tmp_path, result, progress=True)
    assert capsys.readouterr().err == (
        "eval at step 7: loss 0.2500, masked LM accuracy 0.0874 (unigram baseline 0.0858), next "
        "sentence accuracy 0.2500\n"
    )
    assert "global_step = 7\n" in (tmp_path / "eval_results.txt").read_text()


def test_data_too_small_to_hold_out_says_what_to_do(tmp_path, kjv_vocab, tiny_bert_config,
                                                    capsys):  # fmt: skip
    """One record (a one-line corpus): the held-out set would take it, so the run stops with
    what to do; --no-do-eval trains on it."""
    corpus = tmp_path / "one.txt"
    corpus.write_text("In the beginning God created the heaven and the earth.\n")
    data = tmp_path / "data"
    made = ["data", "--input", str(corpus), "--vocab", str(kjv_vocab), "--output", str(data)]
    assert main([*made, "--max-seq-length", "64", "--max-predictions-per-seq", "10"]) == 0
    run = args(data, tmp_path / "run", tiny_bert_config, "--num-train-steps", "2")
    capsys.readouterr()
    assert main(run) == 2
    assert capsys.readouterr().err == (
        f"bertforge: error: --data {data} holds 1 record(s), and the held-out set "
        "(--eval-records 1) takes them all, leaving none to train on; give more text, or "
        "--no-do-eval to train on every record.\n"
    )
    assert main([*run, "--no-do-eval"]) == 0  # 2 steps of 16: 32 passes over the record
    assert "passes over" not in capsys.readouterr().err
    again = [*run, "--no-do-eval", "--num-train-steps", "7", "--output", str(tmp_path / "more")]
    assert main(again) == 0
    assert (
        f"bertforge: warning: 7 steps of 16 instances are 112 passes over the 1 training "
        f"instances of {data}: the model will learn them by heart"
    ) in capsys.readouterr().err


def test_the_trained_length_is_the_longest_any_run_of_the_model_trained_at():
    """From scratch: the data's length; from a checkpoint that records its own, the longer of
    the two; from one that does not (Google's), every position it has."""
    c = BertConfig(vocab_size=100, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=512)  # fmt: skip
    init = train_module.InitWeights({}, c, None, "bertforge", Path("x"), 1, 128)
    assert train_module.trained_length(None, 128) == 128
    assert train_module.trained_length(init, 64) == 128
    assert train_module.trained_length(init, 512) == 512
    google = dataclasses.replace(init, kind="google", trained_length=None)
    assert train_module.trained_length(google, 128) == 512


def test_a_damaged_last_checkpoint_names_the_one_before(
    tmp_path, train_data, tiny_bert_config, capsys
):
    """The newest checkpoint cut short (a copy or a disk gone wrong; bertforge's own writes
    are atomic): resuming stops with one error naming the readable one before it and how to
    go on from it; doing so resumes there. A lone damaged file gets no such advice."""
    out = tmp_path / "run"
    run = args(train_data, out, tiny_bert_config, "--save-checkpoints-steps", "2", "--no-do-eval")
    assert main([*run, "--num-train-steps", "4"]) == 0
    last = out / "checkpoints" / "ckpt-00000004.pt"
    os.truncate(last, last.stat().st_size // 2)
    assert main([*run, "--num-train-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bertforge: error: {last}: not a readable bertforge checkpoint (")
    assert err.endswith(f"); move it out of {last.parent} to go on from ckpt-00000002.pt, the "
                        "one before.\n")  # fmt: skip
    assert err.count("\n") == 1 and "miniz" not in err  # torch's first sentence only
    aside = tmp_path / "aside.pt"
    last.rename(aside)
    assert main([*run, "--num-train-steps", "6"]) == 0
    assert [r["step"] for r in metrics(out)][-4:] == [3, 4, 5, 6]
    assert main(["export", "--checkpoint", str(aside), "--output", str(tmp_path / "x")]) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"bertforge: error: {aside}: not a readable bertforge checkpoint (")
    assert line.endswith(").")  # no checkpoint before it to name


def test_sigkill_and_resume_give_the_same_losses_bit_for_bit(tmp_path, train_data, kjv_vocab):
    # Dropout on (a preset), so the RNG state must be restored too.
    common = [
        "--model-size",
        "tiny",
        "--num-train-steps",
        "14",
        "--save-checkpoints-steps",
        "4",
        "--learning-rate",
        "1e-3",
    ]
    full = tmp_path / "full"
    cli = [sys.executable, "-m", "bertforge.cli"]
    base = [
        "train",
        "--data",
        str(train_data),
        "--train-batch-size",
        "16",
        "--log-every",
        "1",
        "--no-progress",
        *common,
    ]
    subprocess.run([*cli, *base, "--output", str(full)], check=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*cli, *base, "--output", str(cut)])
    deadline = time.time() + 120
    while not (cut / "checkpoints" / "ckpt-00000008.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (cut / "checkpoints" / "ckpt-00000008.pt").exists()
    assert not (cut / "manifest.json").exists()
    subprocess.run([*cli, *base, "--output", str(cut)], check=True)
    a, b = metrics(full), metrics(cut)
    assert [r["step"] for r in b] == list(range(1, 15))
    assert [[r[k] for k in LOSSES] for r in a] == [[r[k] for k in LOSSES] for r in b]
    assert metrics(full, True) == metrics(cut, True)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_saves_a_checkpoint_and_the_rerun_finishes(
    tmp_path, train_data, tiny_bert_config, sig, code, capsys
):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "bertforge.cli",
        *args(
            train_data,
            out,
            tiny_bert_config,
            "--num-train-steps",
            "100000",
            "--save-checkpoints-steps",
            "100000",
        ),
    ]
    # Its own process group, as a terminal's job: Ctrl-C and a batch system's SIGTERM reach
    # every process of it, the batch loader's worker too.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while (
        not (out / "metrics.jsonl").exists() or len(metrics(out)) < 3
    ) and time.time() < deadline:
        time.sleep(0.05)
    # A second run into the same directory (a job started twice) is refused, naming the first.
    assert main(args(train_data, out, tiny_bert_config, "--num-train-steps", "5")) == 2
    assert f"being written by another bertforge (train, pid {proc.pid} " in capsys.readouterr().err
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "checkpoint saved" in err
    with pytest.raises(ProcessLookupError):  # the worker went with the trainer
        os.killpg(proc.pid, 0)
    (ckpt,) = list_checkpoints(out)
    step = int(ckpt.stem.split("-")[1])
    assert step == metrics(out)[-1]["step"] >= 3
    assert main(args(train_data, out, tiny_bert_config, "--num-train-steps", str(step + 2))) == 0
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 3))


def test_a_full_disk_keeps_the_last_checkpoint_and_the_rerun_finishes(
    tmp_path, train_data, tiny_bert_config, monkeypatch, capsys
):
    out = tmp_path / "run"
    run = args(train_data, out, tiny_bert_config, "--save-checkpoints-steps", "2")
    assert main([*run, "--num-train-steps", "2"]) == 0
    (first,) = list_checkpoints(out)
    rewritten = sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".json", ".txt"))
    # Resumed, the run rewrites its small files, then the disk fills in the next checkpoint.
    disk = FullDisk(monkeypatch, rewritten + first.stat().st_size // 2)
    assert main([*run, "--num-train-steps", "6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bertforge: error: ") and "Traceback" not in "".join(err)
    assert "no space left on the device while writing ckpt-00000004.pt" in err[-1]
    assert list_checkpoints(out) == [first] and not list(out.rglob(".*.tmp"))
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 7.1')  # what a full disk leaves of an appended line
    disk.room = None
    assert main([*run, "--num-train-steps", "6"]) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in list_checkpoints(out)][-1] == "ckpt-00000006.pt"


def test_a_disk_without_room_for_the_checkpoints_is_found_before_step_1(
    tmp_path, train_data, tiny_bert_config, monkeypatch, capsys
):
    out = tmp_path / "run"
    run = args(train_data, out, tiny_bert_config, "--save-checkpoints-steps", "2",
               "--num-train-steps", "5", "--keep-checkpoints", "2")  # fmt: skip
    size = checkpoint_bytes(BertConfig.from_json(tiny_bert_config))
    free = {"bytes": size - 1}
    real = shutil.disk_usage
    monkeypatch.setattr(train_module.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=free["bytes"]))  # fmt: skip
    assert main(run) == 2
    err = capsys.readouterr().err
    assert f"{out}: its disk has" in err and "one checkpoint of this model takes" in err
    assert not (out / "metrics.jsonl").exists() and not list_checkpoints(out)
    # Room for two, not for the three on disk at once (two kept, the next written first).
    free["bytes"] = 2 * size
    assert main(run) == 0
    err = capsys.readouterr().err
    assert "warning" in err and f"need {train_module.size_text(3 * size)} more" in err
    assert "--keep-checkpoints 2" in err
    written = list_checkpoints(out)
    assert [p.name for p in written] == ["ckpt-00000004.pt", "ckpt-00000005.pt"]
    assert 0 <= size - written[-1].stat().st_size < 1.1 * (1 << 20)  # the estimate covers it
    # Resumed with room for what is left (one more, then the oldest goes): no warning.
    free["bytes"] = size
    assert main([*run[:-4], "--num-train-steps", "6", "--keep-checkpoints", "2"]) == 0
    assert "disk" not in capsys.readouterr().err


def test_the_checkpoints_a_run_still_writes():
    assert saves_left(0, 10, 5) == 2  # steps 5, 10
    assert saves_left(0, 11, 5) == 3  # 5, 10 and the last, 11
    assert saves_left(5, 11, 5) == 2
    assert saves_left(10, 11, 5) == 1
    assert saves_left(11, 11, 5) == 0
    assert saves_left(0, 3, 5) == 1


def test_micro_batches_and_packing_do_not_change_the_losses(
    tmp_path, train_data, tiny_bert_config, monkeypatch
):
    """Micro-batches of 5, packed batches (no padding), the flat optimizer with gradients
    accumulated in its buffer, q/k/v as three matmuls, batches made in a thread instead of
    the worker process, and the last layer computing every row instead of the heads' rows
    only train as the plain padded run (the CPU default) does."""
    projected = {}  # run: the layers' split_qkv at each q/k/v projection
    project = Layer.project_qkv
    pruned = {}  # run: how the training steps' last layers were called (rows given or not)
    forward = Layer.forward

    def spy(layer, x):
        projected.setdefault(name, set()).add(layer.split_qkv)
        return project(layer, x)

    def spy_forward(layer, x, layout, rows=None):
        if layer.training and layer is layer_of[name]:
            pruned.setdefault(name, set()).add(rows is not None)
        return forward(layer, x, layout, rows)

    layer_of = {}
    init = BertForPretraining.__init__

    def keep_last(model, c):
        init(model, c)
        layer_of[name] = model.layers[-1]

    monkeypatch.setattr(Layer, "project_qkv", spy)
    monkeypatch.setattr(Layer, "forward", spy_forward)
    monkeypatch.setattr(BertForPretraining, "__init__", keep_last)
    runs = {
        "one": [],
        "four": ["--micro-batch-size", "5"],
        "packed": ["--packed"],
        "flat": ["--flat-optimizer", "--micro-batch-size", "5"],
        "split": ["--split-qkv"],
        "thread": ["--loader", "thread"],
        "full": ["--no-prune-last-layer"],
    }
    for name, extra in runs.items():
        steps = ["--num-train-steps", "4", "--eval-every", "2", "--eval-batch-size", "8"]
        main(args(train_data, tmp_path / name, tiny_bert_config, *steps, *extra))
    assert projected == {name: {name == "split"} for name in runs}
    assert pruned == {name: {name != "full"} for name in runs}
    for name in ("four", "packed", "flat", "split", "thread", "full"):
        for evals in (False, True):
            got, want = metrics(tmp_path / name, evals), metrics(tmp_path / "one", evals)
            assert len(got) == len(want) > 0
            for a, b in zip(want, got, strict=True):
                for key in LOSSES:
                    assert a[key] == pytest.approx(b[key], abs=1e-5), (name, evals, key)
    assert metrics(tmp_path / "four")[0]["micro_batch_size"] == 5
    layout = {n: json.loads((tmp_path / n / "manifest.json").read_text())["packed"] for n in runs}
    assert layout == {
        "one": False, "four": False, "packed": True, "flat": False, "split": False, "thread": False,
        "full": False,
    }  # fmt: skip


def test_the_flat_optimizer_resumes_either_way(tmp_path, train_data, tiny_bert_config, capsys):
    """Checkpoints hold AdamW's state dict with and without --flat-optimizer: a run resumed
    with the flag switched goes on as the run that never stopped."""
    steps = ["--num-train-steps", "4", "--save-checkpoints-steps", "2", "--no-do-eval"]
    for name, flag in (("plain", []), ("flat", ["--flat-optimizer"])):
        assert main(args(train_data, tmp_path / name, tiny_bert_config, *steps, *flag)) == 0
    capsys.readouterr()
    for a, b in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "flat"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    flags = {"plain": [], "flat": ["--flat-optimizer"]}
    for first, then in (("plain", "flat"), ("flat", "plain")):
        out = tmp_path / f"{first}-then-{then}"
        assert main(args(train_data, out, tiny_bert_config, *steps, *flags[first])) == 0
        # As if stopped before step 4's checkpoint: the rerun resumes from step 2's (not
        # started over, which needs --overwrite), with the other flag.
        (out / "checkpoints" / "ckpt-00000004.pt").unlink()
        assert main(args(train_data, out, tiny_bert_config, *steps, *flags[then])) == 0
        got, want = metrics(out), metrics(tmp_path / "plain")
        assert [r["step"] for r in got] == [1, 2, 3, 4]
        for a, b in zip(want, got, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), first
    for other in (["--optimizer", "lamb"], ["--google-adam"]):
        out = tmp_path / "refused"
        assert (
            main(args(train_data, out, tiny_bert_config, *steps, "--flat-optimizer", *other)) == 2
        )
        assert f"it does not apply to {other[0]}" in capsys.readouterr().err
        assert not out.exists()


def test_out_of_memory_halves_the_micro_batch(
    tmp_path, train_data, tiny_bert_config, monkeypatch, capsys
):
    real = BertForPretraining.pretraining_logits

    def small_memory(self, input_ids, token_type_ids, lengths, masked_positions, *rest, **kw):
        if masked_positions.shape[0] > 4:  # instances, padded or packed
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, input_ids, token_type_ids, lengths, masked_positions, *rest, **kw)

    monkeypatch.setattr(BertForPretraining, "pretraining_logits", small_memory)
    out = tmp_path / "oom"
    assert (
        main(args(train_data, out, tiny_bert_config, "--num-train-steps", "3", "--no-do-eval")) == 0
    )
    err = capsys.readouterr().err
    assert (
        "out of memory at step 0 with micro-batch 16; retrying the step with micro-batch 8" in err
    )
    assert "micro-batch 8; retrying the step with micro-batch 4" in err
    assert [r["micro_batch_size"] for r in metrics(out)] == [4, 4, 4]
    monkeypatch.setattr(BertForPretraining, "pretraining_logits", real)
    ref = tmp_path / "ref"
    main(args(train_data, ref, tiny_bert_config, "--num-train-steps", "3", "--no-do-eval"))
    for a, b in zip(metrics(out), metrics(ref), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.mark.parametrize("error", [
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 25165824 bytes. Error code 12 (Cannot allocate memory)",
    "could not create a primitive",  # oneDNN's, out of memory in a matmul's backward
], ids=["allocator", "onednn"])  # fmt: skip
def test_out_of_cpu_memory_stops_saying_what_micro_batch_to_rerun_with(
    tmp_path, train_data, tiny_bert_config, monkeypatch, capsys, error
):
    """torch raises the CPU's failed allocations (under ulimit -v or a container's limit) as
    plain RuntimeErrors, and the process does not recover from them: one clear stop, no
    traceback, and the rerun it names trains. Other RuntimeErrors are not taken for it."""
    real = BertForPretraining.pretraining_logits

    def small_memory(self, input_ids, token_type_ids, lengths, masked_positions, *rest, **kw):
        if masked_positions.shape[0] > 4:
            raise RuntimeError(error)
        return real(self, input_ids, token_type_ids, lengths, masked_positions, *rest, **kw)

    monkeypatch.setattr(BertForPretraining, "pretraining_logits", small_memory)
    out = tmp_path / "oom"
    run = args(train_data, out, tiny_bert_config, "--num-train-steps", "2", "--no-do-eval")
    assert main(run) == 2
    err = capsys.readouterr().err.strip()
    said = next(m for m in train_module.CPU_OUT_OF_MEMORY if m in error)
    assert err == (
        f"bertforge: error: CPU out of memory ({said}) at step 0 with micro-batch 16: a process "
        "does not get its memory back after a failed allocation on the CPU; rerun with "
        "--micro-batch-size 8 (or less: the batch stays --train-batch-size, by gradient "
        "accumulation; training resumes from the last checkpoint)."
    )
    assert main([*run, "--micro-batch-size", "4"]) == 0
    assert [r["micro_batch_size"] for r in metrics(out)] == [4, 4]

    def broken(self, *a, **kw):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(BertForPretraining, "pretraining_logits", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main([*run[:-3], "--num-train-steps", "3", "--no-do-eval"])


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory (simulated)"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
], ids=["gpu", "cpu"])  # fmt: skip
def test_out_of_memory_in_the_evaluation_saves_the_step_and_names_the_eval_batch(
    tmp_path, train_data, tiny_bert_config, monkeypatch, capsys, error
):
    """A --eval-batch-size too large for memory stopped with a traceback, at a step after the
    last checkpoint: the steps since were lost. Now the step's checkpoint is saved first (at
    a saving step or not), the stop names the batch to rerun with, and the rerun resumes at
    that step with the same losses as a run that never stopped."""
    real = BertForPretraining.pretraining_logits

    def small_memory(self, input_ids, token_type_ids, lengths, masked_positions, *rest, **kw):
        if not self.training and masked_positions.shape[0] > 4:
            raise error
        return real(self, input_ids, token_type_ids, lengths, masked_positions, *rest, **kw)

    steps = ("--num-train-steps", "6", "--save-checkpoints-steps", "4", "--eval-records", "40")
    ref = tmp_path / "ref"
    assert main(args(train_data, ref, tiny_bert_config, *steps, "--eval-batch-size", "4")) == 0
    monkeypatch.setattr(BertForPretraining, "pretraining_logits", small_memory)
    where = "CUDA" if isinstance(error, torch.OutOfMemoryError) else "CPU"
    said = "" if where == "CUDA" else " (DefaultCPUAllocator: can't allocate memory)"
    for every in (3, 4):  # a step that saves no checkpoint, and one that does
        out = tmp_path / f"every{every}"
        run = args(train_data, out, tiny_bert_config, *steps, "--eval-every", str(every))
        capsys.readouterr()
        assert main([*run, "--eval-batch-size", "16"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == (
            f"bertforge: error: CPU out of memory{said} in the evaluation at step {every}, 16 "
            "instances per forward pass: rerun with --eval-batch-size 8 (or less); the "
            f"checkpoint of step {every} is saved, and the rerun resumes there."
        ), where
        assert list_checkpoints(out)[-1].name == f"ckpt-{every:08d}.pt"
        assert main([*run, "--eval-batch-size", "4", "--eval-every", "4"]) == 0
        assert [r["step"] for r in metrics(out)] == list(range(1, 7))
        for x, y in zip(metrics(ref), metrics(out), strict=True):
            assert [x[k] for k in LOSSES] == [y[k] for k in LOSSES]
        assert metrics(ref, True)[-1] == metrics(out, True)[-1]

    only = ("--no-do-train", "--init-checkpoint", str(ref), "--eval-records", "40")
    alone = args(train_data, tmp_path / "alone", tiny_bert_config, *only, "--eval-batch-size", "16")
    capsys.readouterr()
    assert main(alone) == 2  # an evaluation alone: nothing to resume
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith(
            "in the evaluation at step 0, 16 instances per forward pass: rerun with "
            "--eval-batch-size 8 (or less)."
        )
    )

    def no_memory(self, *a, **kw):
        if not self.training:
            raise error
        return real(self, *a, **kw)

    monkeypatch.setattr(BertForPretraining, "pretraining_logits", no_memory)
    capsys.readouterr()
    one = args(train_data, tmp_path / "one", tiny_bert_config, *steps, "--eval-batch-size", "1")
    assert main(one) == 2
    assert "at step 4, 1 instances per forward pass: even one instance at a time does not fit" in (
        capsys.readouterr().err
    )


def test_the_data_and_the_checkpoint_as_arguments(tmp_path, train_data, tiny_bert_config, capsys):
    """`bertforge train DATA --output DIR` and `bertforge export DIR --output MODEL`, as data
    verify and inspect take their directory; one checkpoint, one data directory."""
    out = tmp_path / "t"
    argv = args(train_data, out, tiny_bert_config, "--num-train-steps", "1", "--no-do-eval")
    argv.remove("--data")
    assert main(argv) == 0 and list_checkpoints(out)
    assert main(["export", str(out), "--output", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main([*argv, str(train_data)]) == 2  # two data directories: one comma list
    assert f"{train_data} is a directory, which is read alone (a `bertforge data` output: one " in (
        capsys.readouterr().err
    )
    assert (
        main(["export", str(out), "--checkpoint", str(out), "--output", str(tmp_path / "n")]) == 2
    )
    assert "CHECKPOINT is one path, given as an argument or --checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_a_trial_step_leaves_no_trace():
    """What a multi-process run tries before its first step: it changes no gradient, optimizer
    state or random number generator, and leaves no gradients when out of memory either."""
    from bertforge.train import Objective, make_optimizer, trial_rows, trial_step

    cpu = torch.device("cpu")
    model = BertForPretraining(BertConfig.preset("tiny", 300))  # dropout 0.1
    optimizer = make_optimizer(TrainConfig(data="d", output="o"), model)
    d = Dist(0, 1, 0, cpu)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step_args = (contextlib.nullcontext(), scaler, True, False)
    rows = trial_rows(3, 64, 10)
    assert rows.lengths.tolist() == [64, 64, 63] and rows.positions.shape == (3, 10)
    rng = torch.get_rng_state()
    trial_step(Objective(model), None, model, optimizer, rows, d, step_args)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters()) and not optimizer.state

    def out_of_memory(*a, **kw):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError):
        trial_step(out_of_memory, None, model, optimizer, rows, d, step_args)
    assert all(p.grad is None for p in model.parameters())


def test_one_process_finds_the_micro_batch_that_fits(capsys):
    from bertforge.train import fit_micro_batch

    tried = []

    def trial(n: int) -> None:
        tried.append(n)
        if n > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    d = Dist(0, 1, 0, torch.device("cpu"))
    assert fit_micro_batch(32, d, trial) == 4 and tried == [32, 16, 8, 4]
    assert "all 1 processes train with micro-batch 4 (gradient accumulation x8" in (
        capsys.readouterr().err
    )
    assert fit_micro_batch(4, d, trial) == 4 and capsys.readouterr().err == ""
    with pytest.raises(UserError, match=r"process\(es\) 0 before the first step: even one"):
        fit_micro_batch(4, d, lambda n: out_of_memory())


def out_of_memory() -> None:
    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


def bare_config(**kw) -> TrainConfig:
    return TrainConfig(data="d", output="o", **kw)


def test_compile_is_on_by_default_only_for_long_gpu_runs(monkeypatch):
    cfg = bare_config
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    long = train_module.AUTO_COMPILE_STEPS
    assert train_module.use_compile(cfg(), cuda, long)
    assert not train_module.use_compile(cfg(), cuda, long - 1)  # e.g. resumed near the end
    assert train_module.use_compile(cfg(compile=True), cpu, 1)
    assert not train_module.use_compile(cfg(compile=False), cuda, long)
    for bf16 in (True, False):  # eager measured faster on a CPU, in bf16 or fp32
        monkeypatch.setattr(hardware, "cpu_has_bf16", lambda bf16=bf16: bf16)
        assert not train_module.use_compile(cfg(), cpu, 10 * long)


def test_auto_precision_is_bf16_on_a_cpu_that_multiplies_bf16_in_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    assert hardware.resolve_precision("auto", cpu) == torch.bfloat16
    assert hardware.resolve_precision("fp32", cpu) == torch.float32
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    assert hardware.resolve_precision("auto", cpu) == torch.float32
    assert hardware.resolve_precision("bf16", cpu) == torch.bfloat16
    # in hardware: Intel's AMX tiles, or AVX512-BF16 (AMD's Zen 4, Intel's Cooper Lake)
    for amx, avx512_bf16 in itertools.product((True, False), repeat=2):
        cpu = types.SimpleNamespace(
            _is_amx_tile_supported=lambda v=amx: v,
            _is_avx512_bf16_supported=lambda v=avx512_bf16: v,
        )
        assert hardware.bf16_in_hardware(cpu) == (amx or avx512_bf16)
    assert not hardware.bf16_in_hardware(types.SimpleNamespace())  # a torch without probes
    assert hardware.bf16_in_hardware(torch.cpu) in (True, False)  # torch's own probes run


def test_bf16_on_a_cpu_learns_as_fp32_does(tmp_path, train_data, tiny_bert_config):
    """80 steps in bf16 on the CPU, eager and compiled (what a CPU with bf16 in hardware
    chooses by default, the compile for long runs): the loss falls as in fp32, its last 30
    steps' loss within 0.03 of the fp32 run's (on this data they differ by about 1e-4; a run
    that stopped learning stays about 1 higher)."""
    late = {}
    for name, precision, *compiled in (("fp32", "fp32"), ("bf16", "bf16"),
                                       ("compiled", "bf16", "--compile")):  # fmt: skip
        out = tmp_path / name
        extra = ("--num-train-steps", "80", "--log-every", "10", "--learning-rate", "2e-3")
        assert main(args(train_data, out, tiny_bert_config, *extra, "--precision", precision,
                         "--no-do-eval", *compiled)) == 0  # fmt: skip
        losses = [r["loss"] for r in metrics(out)]
        assert losses[-1] < losses[0] - 0.8, losses
        late[name] = float(np.mean(losses[-3:]))
        manifest = json.loads((out / "manifest.json").read_text())
        assert (manifest["precision"], manifest["compiled"]) == (precision, bool(compiled))
    assert late["bf16"] == pytest.approx(late["fp32"], abs=0.03)
    assert late["compiled"] == pytest.approx(late["fp32"], abs=0.03)


def test_batches_are_packed_by_default_on_a_gpu_up_to_seq_128_and_padded_on_a_cpu():
    cfg = bare_config
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not train_module.use_packed(cfg(), cpu, 128, False)  # a new shape every step
    assert not train_module.use_packed(cfg(), cpu, 128, True)
    assert train_module.use_packed(cfg(packed=True), cpu, 128, False)
    assert train_module.use_packed(cfg(), cuda, 128, True)
    assert not train_module.use_packed(cfg(), cuda, 129, True)
    assert not train_module.use_packed(cfg(), cuda, 128, False)  # e.g. a T4, or fp32
    # bertforge's attention kernels take packed fp32 batches, and any GPU Triton runs on
    assert train_module.use_packed(cfg(fused_attention=True), cuda, 128, False)
    assert not train_module.use_packed(cfg(fused_attention=True), cuda, 129, False)
    assert not train_module.use_packed(cfg(fused_attention=True, packed=False), cuda, 128, True)
    assert not train_module.use_packed(cfg(packed=False), cpu, 64, False)
    assert train_module.use_packed(cfg(packed=True), cuda, 512, False)
    fits = train_module.flash_varlen_fits
    assert fits(torch.bfloat16, 64) and fits(torch.float16, 256)
    assert not fits(torch.float32, 64) and not fits(torch.bfloat16, 12)


def test_a_failed_automatic_compile_trains_on_uncompiled(
    tmp_path, train_data, tiny_bert_config, monkeypatch, capsys
):
    """When the default compile fails (no C++ compiler, an old GPU), the step is redone
    uncompiled with a warning and the run is the uncompiled run; an asked-for --compile
    that fails stops with torch's error."""

    def broken(gm, example_inputs):
        raise RuntimeError("no working C++ compiler found (simulated)")

    real_compile, real_use = torch.compile, train_module.use_compile
    monkeypatch.setattr(torch, "compile", lambda f, **kw: real_compile(f, backend=broken))
    monkeypatch.setattr(
        train_module, "use_compile", lambda cfg, device, left: cfg.compile is not False
    )
    run = ["--num-train-steps", "3", "--no-do-eval", "--micro-batch-size", "8"]
    out = tmp_path / "auto"
    try:
        assert main(args(train_data, out, tiny_bert_config, *run)) == 0
        err = capsys.readouterr().err
        assert err.count("torch.compile failed") == 1
        assert "failed at step 0 (RuntimeError: no working C++ compiler found (simulated))" in err
        assert not json.loads((out / "manifest.json").read_text())["compiled"]
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):
            main(args(train_data, tmp_path / "asked", tiny_bert_config, *run, "--compile"))
    finally:
        torch._dynamo.reset()
    monkeypatch.setattr(train_module, "use_compile", real_use)
    ref = tmp_path / "ref"
    main(args(train_data, ref, tiny_bert_config, *run, "--no-compile"))
    assert len(metrics(out)) == 3
    for a, b in zip(metrics(out), metrics(ref), strict=True):
        for key in LOSSES:
            assert a[key] == b[key], key


def test_a_failed_automatic_compile_stops_a_run_of_several_processes():
    """With several processes a failed compile cannot fall back alone (the others would wait
    in the all-reduce forever): one clear error naming the process and the flag."""

    def broken(gm, example_inputs):
        raise RuntimeError("ptxas: unsupported GPU (simulated)")

    try:
        torch.compile(lambda x: x * 2, backend=broken)(torch.ones(2))
    except torch._dynamo.exc.TorchDynamoException as e:
        failed = e
    finally:
        torch._dynamo.reset()
    cfg = TrainConfig(data="d", output="o")
    one = Dist(0, 1, 0, torch.device("cpu"))
    warning = train_module.compile_failure(failed, cfg, one, 7)
    assert "failed at step 7 (RuntimeError: ptxas: unsupported GPU (simulated))" in warning
    with pytest.raises(UserError, match=r"step 7 in process 1 \(RuntimeError: ptxas.*--no-compile"):
        train_module.compile_failure(failed, cfg, Dist(1, 2, 1, torch.device("cpu")), 7)
    for asked in ({"compile": True}, {"cuda_graphs": True}):  # the user's flag: torch's error
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):
            train_module.compile_failure(failed, dataclasses.replace(cfg, **asked), one, 7)


def test_nan_steps_are_skipped_then_stop_the_run(
    tmp_path, train_data, tiny_bert_config, monkeypatch, capsys
):
    real = train_module.pretraining_sums
    calls = {"n": 0}
    bad = {2, 5, 6, 7}  # forward passes (= steps here) whose loss is NaN

    def flaky(*a):
        mlm, nsp, correct = real(*a)
        calls["n"] += 1
        return (mlm * float("nan") if calls["n"] - 1 in bad else mlm), nsp, correct

    monkeypatch.setattr(train_module, "pretraining_sums", flaky)
    out = tmp_path / "nan"
    rc = main(
        args(
            train_data,
            out,
            tiny_bert_config,
            "--num-train-steps",
            "20",
            "--no-do-eval",
            "--max-bad-steps",
            "3",
            "--save-checkpoints-steps",
            "4",
        )
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "step 2: loss is nan; step skipped (1 in a row)" in err
    assert "NaN/inf for 3 steps in a row (last at step 7)" in err
    assert [p.name for p in list_checkpoints(out)] == ["ckpt-00000004.pt"]
    logged = metrics(out)
    assert all(np.isfinite(r["loss"]) for r in logged)
    assert logged[-1]["skipped_steps"] == 1 and logged[-1]["step"] == 5


def test_bad_steps_skipped_on_the_device_match_host_decisions(
    tmp_path, train_data, tiny_bert_config, monkeypatch, capsys
):
    """With fused AdamW the trainer reads the step sums back only every READ_EVERY steps (and
    at logs/saves): bad steps are skipped on the device, reported when read, and the weights
    are exactly those of the per-step host decision."""
    real_sums, real_read = train_module.pretraining_sums, train_module.Ledger.read
    state = {"calls": 0, "reads": 0}

    def flaky(*a):
        mlm, nsp, correct = real_sums(*a)
        state["calls"] += 1
        return (mlm * float("nan") if state["calls"] - 1 in (2, 3) else mlm), nsp, correct

    def counted(self, *a):
        state["reads"] += 1
        return real_read(self, *a)

    monkeypatch.setattr(train_module, "pretraining_sums", flaky)
    monkeypatch.setattr(train_module.Ledger, "read", counted)
    runs = {}
    for name, on_device in (("device", True), ("host", False)):
        state.update(calls=0, reads=0)
        monkeypatch.setattr(train_module, "device_skip", lambda o, s, v=on_device: v)
        out = tmp_path / name
        extra = ("--num-train-steps", "10", "--no-do-eval", "--log-every", "10")
        assert main(args(train_data, out, tiny_bert_config, *extra)) == 0
        err = capsys.readouterr().err
        assert "step 2: loss is nan; step skipped (1 in a row)" in err
        assert "step 3: loss is nan; step skipped (2 in a row)" in err
        assert metrics(out)[-1]["skipped_steps"] == 2
        runs[name] = (torch.load(list_checkpoints(out)[-1], weights_only=False), state["reads"])
    (device_ckpt, device_reads), (host_ckpt, host_reads) = runs["device"], runs["host"]
    assert (device_reads, host_reads) == (2, 10)  # steps 8 and 10, against every step
    for name, t in host_ckpt["model"].items():
        torch.testing.assert_close(device_ckpt["model"][name], t, rtol=0, atol=0)
    assert device_ckpt["skipped_steps"] == host_ckpt["skipped_steps"] == 2


def test_settings_that_contradict_the_data_are_refused(
    tmp_path, train_data, tiny_bert_config, capsys
):
    def error(*extra: str, bert: Path = tiny_bert_config) -> str:
        rc = main(args(train_data, tmp_path / "x", bert, "--num-train-steps", "1", *extra))
        assert rc == 2
        return capsys.readouterr().err

    assert "--max-seq-length 128 does not match the data" in error("--max-seq-length", "128")
    assert "--max-predictions-per-seq 20 does not match" in error("--max-predictions-per-seq", "20")
    assert "--do-lower-case False does not match" in error("--no-do-lower-case")
    wrong = tmp_path / "bert_config.json"
    wrong.write_text(
        tiny_bert_config.read_text().replace('"vocab_size": 1500', '"vocab_size": 30522')
    )
    assert "vocab_size 30522 but the vocabulary" in error(bert=wrong)
    short = tmp_path / "short_config.json"
    short.write_text(
        tiny_bert_config.read_text().replace(
            '"max_position_embeddings": 128', '"max_position_embeddings": 16'
        )
    )
    assert "max_position_embeddings 16 is below the data's max_seq_length" in (
        message := error(bert=short)
    )
    assert "--max-seq-length 16` or less" in message
    assert "give either --model-size or --bert-config" in error("--model-size", "tiny")
    other = tmp_path / "other_vocab.txt"
    other.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")
    assert "is not the vocabulary the data" in error("--vocab", str(other), "--do-lower-case")


def test_data_that_is_not_pretraining_data_is_refused(
    tmp_path, kjv_vocab, tiny_bert_config, capsys
):
    assert main(args(kjv_vocab, tmp_path / "x", tiny_bert_config, "--num-train-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "is a `bertforge vocab` output; give the directory `bertforge data` wrote" in err
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_resume_with_other_settings_is_refused(tmp_path, train_data, tiny_bert_config, capsys):
    out = tmp_path / "run"
    assert main(args(train_data, out, tiny_bert_config, "--num-train-steps", "2")) == 0
    assert (
        main(
            args(
                train_data,
                out,
                tiny_bert_config,
                "--num-train-steps",
                "3",
                "--learning-rate",
                "3e-4",
            )
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "(--learning-rate was 0.0001, now 0.0003); resume with the same settings" in err
    # what it says to do for the new settings from the run's weights
    ckpt = out / "checkpoints" / "ckpt-00000002.pt"
    assert f"--init-checkpoint {ckpt} --output OTHER (the optimizer and learning" in err
    other = args(train_data, tmp_path / "other", tiny_bert_config, "--num-train-steps", "3",
                 "--learning-rate", "3e-4", "--init-checkpoint", str(ckpt))  # fmt: skip
    assert main(other) == 0
    assert (
        main(
            args(
                train_data,
                out,
                tiny_bert_config,
                "--num-train-steps",
                "3",
                "--learning-rate",
                "3e-4",
                "--overwrite",
            )
        )
        == 0
    )
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert main(args(tmp_path, tmp_path / "y", tiny_bert_config)) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_a_checkpoint_of_an_older_bertforge_resumes(tmp_path, train_data, tiny_bert_config):
    """A checkpoint written before an option existed lacks it in its settings; the option at
    its default counts as unchanged, so the run resumes after an upgrade."""
    out = tmp_path / "run"
    assert main(args(train_data, out, tiny_bert_config, "--num-train-steps", "2")) == 0
    (latest,) = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1:]
    state = torch.load(latest, map_location="cpu", weights_only=False)
    del state["config"]["google_adam"]  # as if the option came later (default False)
    torch.save(state, latest)
    assert main(args(train_data, out, tiny_bert_config, "--num-train-steps", "3")) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_a_moved_run_resumes_and_other_data_is_refused(
    tmp_path, kjv_corpus, kjv_vocab, tiny_bert_config, monkeypatch, capsys
):
    """A training directory moved elsewhere resumes (its --output, a path, was compared as a
    setting); data made from a vocabulary named by a relative path keeps a copy of it, so it
    is trained on from any directory, even after the vocabulary is gone; data with other
    records at the old path is still another run's."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(kjv_vocab, "v")
    make = ["data", str(kjv_corpus), "--vocab", "v", "--max-seq-length", "64", "--no-progress"]
    assert main([*make, "--output", "d"]) == 0
    manifest = json.loads(Path("d/manifest.json").read_text())
    assert manifest["vocab"]["path"] == str(tmp_path / "v" / "vocab.txt")  # not "v/vocab.txt"
    assert Path("d/vocab.txt").read_bytes() == Path("v/vocab.txt").read_bytes()
    shutil.rmtree("v")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    data, first = tmp_path / "d", tmp_path / "first"
    assert main(args(data, first, tiny_bert_config, "--num-train-steps", "2")) == 0
    shutil.move(first, tmp_path / "moved")
    assert main(args(data, tmp_path / "moved", tiny_bert_config, "--num-train-steps", "3")) == 0
    assert "the new schedule from step 2 on" in capsys.readouterr().err  # resumed there
    assert [r["step"] for r in metrics(tmp_path / "moved")] == [1, 2, 3]
    # A vocabulary trained again at the named path: the copy is read; named, it is refused
    (tmp_path / "v").mkdir()
    tokens = (kjv_vocab / "vocab.txt").read_text().split("\n")
    tokens[200], tokens[201] = tokens[201], tokens[200]
    (tmp_path / "v" / "vocab.txt").write_text("\n".join(tokens))
    assert main(args(data, tmp_path / "third", tiny_bert_config, "--num-train-steps", "1")) == 0
    bare = tmp_path / "v" / "vocab.txt"
    assert main(args(data, tmp_path / "fourth", tiny_bert_config, "--vocab", str(bare),
                     "--lowercase")) == 2  # fmt: skip
    assert f"made with ({bare}); leave --vocab out to use it ({data / 'vocab.txt'})." in (
        capsys.readouterr().err
    )
    shutil.rmtree(tmp_path / "v")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(kjv_vocab, "v")
    assert main([*make, "--output", "d", "--overwrite", "--random-seed", "7"]) == 0
    assert main(args(data, tmp_path / "moved", tiny_bert_config, "--num-train-steps", "4")) == 2
    assert f"belongs to a run with other settings (the records of {data} (made again))" in (
        capsys.readouterr().err
    )
    assert main([*make, "--output", "d2", "--random-seed", "8"]) == 0
    assert main(args(tmp_path / "d2", tmp_path / "moved", tiny_bert_config)) == 2
    assert f"other settings (--data was {data}, now {tmp_path / 'd2'})" in (capsys.readouterr().err)


def test_a_resumed_run_with_more_steps_says_where_its_learning_rate_jumps(
    tmp_path, train_data, tiny_bert_config, capsys
):
    """--num-train-steps may change on resume; the schedule then decays to the new total from
    the resumed step, so the learning rate jumps there (from 0 here): the run says so, with the
    figures it then logs."""
    out = tmp_path / "run"
    assert main(args(train_data, out, tiny_bert_config, "--num-train-steps", "2")) == 0
    assert "--num-train-steps" not in capsys.readouterr().err
    assert main(args(train_data, out, tiny_bert_config, "--num-train-steps", "4")) == 0
    err = capsys.readouterr().err
    assert (
        "bertforge: note: --num-train-steps 2 -> 4: the learning rate follows the new schedule "
        "from step 2 on, so it goes from 0 to 5e-05 there"
    ) in err
    # each step logs the rate it took: the schedule's at the step before it
    assert [(r["step"], r["learning_rate"]) for r in metrics(out)] == [
        (1, 1e-4), (2, 1e-4 * (1 - 1 / 2)), (3, 1e-4 * (1 - 2 / 4)), (4, 1e-4 * (1 - 3 / 4))
    ]  # fmt: skip
    assert main(args(train_data, out, tiny_bert_config, "--num-train-steps", "4")) == 0
    assert "note: --num-train-steps" not in capsys.readouterr().err  # the same schedule
    # fewer steps than the run has made: nothing to train, and it says so (it said only "done")
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("ckpt-*.pt"))
    assert main(args(train_data, out, tiny_bert_config, "--num-train-steps", "3")) == 0
    assert (
        "bertforge: note: --num-train-steps 3: the run is at step 4 already (its last "
        "checkpoint), so there is nothing to train and its model stays at that step."
    ) in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt-*.pt")) == ckpts
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def test_a_resumed_run_does_not_read_the_whole_data_again(
    tmp_path, train_data, tiny_bert_config, monkeypatch, capsys
):
    """The start-up check of the data (largest token id, damaged records: a pass over all of
    it) is kept in the output (data_check.json); a resumed run takes it from there while the
    shards are unchanged instead of reading them all again. With --progress, a check of more
    than ANNOUNCED_CHECK_BYTES (here lowered to 0) is announced before it reads; a resumed
    run's, which does not read, is not."""
    from bertforge.shards import ShardSet

    monkeypatch.setattr(train_module, "ANNOUNCED_CHECK_BYTES", 0)
    out = tmp_path / "run"
    two = args(train_data, out, tiny_bert_config, "--num-train-steps", "2", "--progress")
    assert main(two) == 0
    data = PretrainingData(str(train_data))
    size = len(data) * data.native.dtype.itemsize
    announced = (f"train: checking every record of {train_data} ({size / 1e9:.1f} GB, "
                 f"{len(data.files)} shards) before the first step\n")  # fmt: skip
    assert announced in capsys.readouterr().err
    kept = json.loads((out / "data_check.json").read_text())
    assert kept["max_token_id"] == data.max_token_id()

    def no_pass(self, k):
        raise AssertionError("read the whole data again")

    monkeypatch.setattr(ShardSet, "blocks", no_pass)
    assert main([*two[:-3], "--num-train-steps", "3", "--progress"]) == 0
    assert metrics(out)[-1]["step"] == 3
    assert "train: checking every record" not in capsys.readouterr().err


def test_a_warmup_as_long_as_the_run_is_warned_about(
    tmp_path, train_data, tiny_bert_config, capsys
):
    """--num-warmup-steps at or past --num-train-steps: the rate only rises; the warning gives
    the rate of the last step, the one the log then shows. Below it, nothing is said. The
    start line (with --progress) gives how many epochs the steps make."""
    steps = ["--num-train-steps", "3", "--no-do-eval"]
    assert main(args(train_data, tmp_path / "a", tiny_bert_config, *steps,
                     "--num-warmup-steps", "3")) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert (
        "warning: --num-warmup-steps 3 is not below --num-train-steps 3: the learning rate "
        "rises for the whole run, to 6.67e-05 at its last step (--learning-rate 0.0001)"
    ) in err
    assert metrics(tmp_path / "a")[-1]["learning_rate"] == pytest.approx(1e-4 * 2 / 3)
    assert main(args(train_data, tmp_path / "b", tiny_bert_config, *steps,
                     "--num-warmup-steps", "2", "--progress")) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "--num-warmup-steps" not in err
    # the start line says how many times the run goes over its training instances
    found = re.search(
        r"; ([\d,]+) training / .* tokens, 3 steps: ([\d.]+) epochs; batch (\d+)", err
    )
    assert found is not None, err
    train, epochs, batch = int(found[1].replace(",", "")), float(found[2]), int(found[3])
    assert epochs == round(3 * batch / train, 2) and epochs > 0


def test_cuda_graphs_plumbing_on_a_cpu(tmp_path, train_data, tiny_bert_config, monkeypatch):
    """--cuda-graphs as the trainer runs it (reduce-overhead compile, a replay begun per
    micro-batch, packed micro-batches rounded up by filler, gradients into FlatAdamW's
    buffer) with its CUDA check lifted: on a CPU inductor runs the graphs' kernels without
    recording them, so this checks everything around them: the same losses as the plain run."""
    steps = ["--num-train-steps", "3", "--no-do-eval", "--packed", "--micro-batch-size", "5"]
    main(args(train_data, tmp_path / "plain", tiny_bert_config, *steps))
    began, buckets = [], []
    real_batch = train_module.model_batch

    def model_batch(rows, device, packed, trim=True, bucket=0):
        buckets.append(bucket)
        return real_batch(rows, device, packed, trim, bucket)

    flats = []

    class Flat(train_module.FlatAdamW):
        def __init__(self, *a, **k):
            flats.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(train_module, "check_graphs", lambda cfg, device: None)
    monkeypatch.setattr(train_module, "model_batch", model_batch)
    monkeypatch.setattr(train_module, "FlatAdamW", Flat)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: began.append(1))
    graphs = tmp_path / "graphs"
    assert main(args(train_data, graphs, tiny_bert_config, *steps, "--cuda-graphs")) == 0
    assert flats == [1]  # --cuda-graphs brings the flat optimizer it needs
    assert len(began) == len(buckets) == 3 * 4  # 16 instances in micro-batches of 5
    assert set(buckets) == {train_module.graph_bucket(64, 5)} == {64}
    manifest = json.loads((graphs / "manifest.json").read_text())
    assert manifest["compiled"] is True and manifest["config"]["cuda_graphs"] is True
    for a, b in zip(metrics(tmp_path / "plain"), metrics(graphs), strict=True):
        for key in LOSSES:
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_cuda_graphs_are_refused_where_they_cannot_run(tmp_path, train_data, tiny_bert_config,
                                                       capsys, monkeypatch):  # fmt: skip
    out = tmp_path / "run"
    extra = ["--num-train-steps", "2", "--cuda-graphs"]
    assert main(args(train_data, out, tiny_bert_config, *extra)) == 2
    assert "--cuda-graphs replays the step's GPU kernels; training is on cpu" in (
        capsys.readouterr().err
    )
    assert not out.exists()
    cuda = torch.device("cuda")
    cfg = TrainConfig(data="d", output="o", cuda_graphs=True)
    for can in (cfg, dataclasses.replace(cfg, flat_optimizer=True)):  # what can run
        train_module.check_graphs(can, cuda)
        assert train_module.use_flat(can)
    assert not train_module.use_flat(dataclasses.replace(cfg, cuda_graphs=False))
    for settings, message in (
        ({"compile": False}, "does not go with --no-compile"),
        ({"flat_optimizer": False}, "needs the flat optimizer.*leave --no-flat-optimizer out"),
    ):
        with pytest.raises(UserError, match=message):
            train_module.check_graphs(dataclasses.replace(cfg, **settings), cuda)
    # the flat optimizer that --cuda-graphs brings is AdamW's: lamb is refused, naming both
    monkeypatch.setattr(train_module, "check_graphs", lambda cfg, device: None)
    assert main(args(train_data, out, tiny_bert_config, *extra, "--optimizer", "lamb")) == 2
    err = capsys.readouterr().err
    assert (
        "--cuda-graphs lays out torch's AdamW (--flat-optimizer); it does not apply to "
        "--optimizer lamb" in err
    ), err
    assert not out.exists()


@pytest.fixture(scope="module")
def google_tfrecords(tmp_path_factory, kjv_corpus, kjv_vocab) -> Path:
    out = tmp_path_factory.mktemp("tf")
    create_data(
        DataConfig(
            input=(str(kjv_corpus),),
            vocab=str(kjv_vocab / "vocab.txt"),
            do_lower_case=True,
            output=str(out),
            max_seq_length=64,
            max_predictions_per_seq=10,
            dupe_factor=1,
            google_compatible=True,
            progress=False,
        )
    )
    return out / "data.tfrecord"


def test_records_by_glob_from_a_data_output_are_read_with_its_vocabulary_only(
    tmp_path, kjv_corpus, kjv_vocab, tiny_bert_config, capsys
):
    """TFRecords hold token ids only: read with another vocabulary of the same size they are
    other words, silently. Given by glob from a `bertforge data` output, whose manifest names
    the vocabulary, train, data convert and data inspect refuse any other one."""
    data = tmp_path / "d"
    assert main(["data", str(kjv_corpus), "--vocab", str(kjv_vocab), "--output", str(data),
                 "--format", "tfrecord", "--dupe-factor", "1", "--max-seq-length", "64",
                 "--no-progress"]) == 0  # fmt: skip
    tokens = (kjv_vocab / "vocab.txt").read_text().split("\n")
    tokens[200], tokens[201] = tokens[201], tokens[200]  # the same size, other words
    (tmp_path / "other").mkdir()
    other = tmp_path / "other" / "vocab.txt"
    other.write_text("\n".join(tokens))
    records = str(data / "*.tfrecord")
    refused = (f"--vocab: {other} is not the vocabulary the records in {data} were made with: "
               f"its manifest.json names {kjv_vocab / 'vocab.txt'}; give that one")  # fmt: skip
    for argv in (
        args(Path(records), tmp_path / "t", tiny_bert_config, "--vocab", str(other), "--lowercase"),
        ["data", "convert", records, "--vocab", str(other), "--output", str(tmp_path / "c")],
        ["data", "inspect", records, "--vocab", str(other)],
    ):
        assert main([*argv, "--lowercase"] if "convert" in argv else argv) == 2, argv
        assert refused in capsys.readouterr().err
    assert not (tmp_path / "t").exists() and not (tmp_path / "c").exists()
    right = ["data", "convert", records, "--vocab", str(kjv_vocab), "--output", str(tmp_path / "c")]
    assert main(right) == 0
    bare = tmp_path / "bare" / "vocab.txt"  # its very file, bare: its casing from the flag
    bare.parent.mkdir()
    shutil.copy(kjv_vocab / "vocab.txt", bare)
    capsys.readouterr()
    assert main([*right[:4], str(bare), "--cased", "--output", str(tmp_path / "c2")]) == 0
    said = f"the vocabulary {bare} is read cased (--cased), but none of its"
    assert said in capsys.readouterr().err
    short = ("--vocab", str(bare), "--cased", "--num-train-steps", "1", "--no-do-eval")
    assert main(args(Path(records), tmp_path / "t2", tiny_bert_config, *short)) == 0
    assert said in capsys.readouterr().err  # train on the TFRecords with it: the same warning


def test_converted_tfrecords_train_as_the_tfrecords(
    tmp_path, google_tfrecords, kjv_vocab, tiny_bert_config, capsys, monkeypatch
):
    """`bertforge data convert`: Google's TFRecords -> native shards (streamed in chunks): the
    same instances with the same masks, hence the same training losses."""
    from bertforge import datacheck

    monkeypatch.setattr(datacheck, "SHARD_RECORDS", 200)  # several shards, chunks across them
    monkeypatch.setattr(datacheck, "CONVERT_CHUNK", 300)
    out = tmp_path / "converted"
    argv = ["data", "convert", str(google_tfrecords), "--vocab", str(kjv_vocab), "--output"]
    assert main([*argv, str(out), "--workers", "1"]) == 0
    assert main(["data", "verify", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) > 1 and manifest["format"]["static_masking"]
    assert main([*argv, str(tmp_path / "parallel"), "--workers", "2"]) == 0  # the same bytes
    parallel = json.loads((tmp_path / "parallel" / "manifest.json").read_text())
    assert [s["sha256"] for s in parallel["shards"]] == [s["sha256"] for s in manifest["shards"]]
    a, b = PretrainingData(str(google_tfrecords)), PretrainingData(str(out))
    assert len(a) == len(b) and b.tf_rows is None
    everything = np.arange(len(a))
    ra, rb = a.rows(everything), b.rows(everything)
    for field in ("input_ids", "lengths", "token_type_ids", "next_sentence", "positions",
                  "labels"):  # fmt: skip
        assert np.array_equal(getattr(ra, field), getattr(rb, field)), field
    run = ("--num-train-steps", "3", "--no-do-eval", "--vocab", str(kjv_vocab / "vocab.txt"))
    assert main(args(google_tfrecords, tmp_path / "tf", tiny_bert_config, *run)) == 0
    assert main(args(out, tmp_path / "native", tiny_bert_config, "--num-train-steps", "3",
                     "--no-do-eval")) == 0  # fmt: skip
    for x, y in zip(metrics(tmp_path / "tf"), metrics(tmp_path / "native"), strict=True):
        assert x["loss"] == y["loss"]

    # Several files, as the shell expands an unquoted glob: one comma list
    two = Path(shutil.copy(google_tfrecords, tmp_path / "two.tfrecord"))
    capsys.readouterr()
    assert main(["data", "inspect", str(google_tfrecords), str(two), "-n", "0", "--vocab",
                 str(kjv_vocab)]) == 0  # fmt: skip
    assert f"statistics over all {2 * len(a):,} instances in 2 file(s)" in capsys.readouterr().out
    assert main(["data", "verify", str(out), str(two)]) == 2
    assert f"data verify takes one data directory; got {out}, {two}." in capsys.readouterr().err
    # Errors name the file and records; nothing is taken as data without a manifest. (Alone,
    # as Google's are: beside their data manifest, its vocabulary is checked first.)
    small = vocab_head(kjv_vocab, 300, tmp_path / "small")
    (tmp_path / "alone").mkdir()
    alone = shutil.copy(google_tfrecords, tmp_path / "alone")
    convert = ["data", "convert", str(alone), "--vocab", str(small), "--output"]
    assert main([*convert, str(tmp_path / "x"), "--lowercase"]) == 2
    err = capsys.readouterr().err
    assert f"{alone}, records 0-" in err and "beyond" in err and "300 tokens" in err
    assert not (tmp_path / "x" / "manifest.json").exists()
    assert main([*argv, str(out)]) == 2  # an earlier conversion is kept unless --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, str(out), "--overwrite"]) == 0


def test_tfrecords_are_held_narrow_read_in_parts_and_warned_of_before(
    tmp_path, google_tfrecords, tiny_bert_config, kjv_vocab, monkeypatch, capsys
):
    """Google's TFRecords are read into memory in parts of TF_CHUNK records, each narrowed
    as it comes (ids and positions int32, segment ids int8: a third of int64's memory), then
    joined; a step's rows are int64 and the same wherever the parts fall. Files made with
    another max_seq_length among them are refused, naming both. Where the TFRecords will not
    fit in the memory available, the warning comes before they are read."""
    whole = PretrainingData(str(google_tfrecords))
    held = whole.tf_rows
    assert held is not None
    narrow = ("input_ids", "token_type_ids", "positions", "labels")
    assert [getattr(held, f).dtype for f in narrow] == [np.int32, np.int8, np.int32, np.int32]
    copy = Path(shutil.copy(google_tfrecords, tmp_path / "copy.tfrecord"))
    monkeypatch.setattr(batches, "TF_CHUNK", 7)
    two = PretrainingData(f"{google_tfrecords},{copy}")
    n = len(whole)
    assert len(two) == 2 * n and two.tf_sizes == [n, n] and n % 7
    ours, theirs = two.rows(np.arange(2 * n)), whole.rows(np.arange(n))
    for field in ("input_ids", "lengths", "token_type_ids", "next_sentence", "positions",
                  "labels"):  # fmt: skip
        assert getattr(ours, field).dtype == np.int64, field
        once = getattr(theirs, field)
        assert np.array_equal(getattr(ours, field), np.concatenate([once, once])), field

    with google_tfrecords.open("rb") as f:
        records = list(read_records(f))[:3]
    shorter = []
    for record in records:  # the same instances cut to 32 tokens
        example = decode_example(record)
        for name in ("input_ids", "input_mask", "segment_ids"):
            example[name] = example[name][:32]
        shorter.append(encode_example(example, {"masked_lm_weights"}))
    short = tmp_path / "short.tfrecord"
    short.write_bytes(b"".join(frame(r) for r in shorter))
    with pytest.raises(UserError, match=re.escape(
            f"--data: {google_tfrecords} was made with max_seq_length 64, {short} with 32; "
            "train on files made with one max_seq_length.")):  # fmt: skip
        PretrainingData(f"{google_tfrecords},{short}")

    size = google_tfrecords.stat().st_size
    assert train_module.tfrecord_memory_warning(str(google_tfrecords), 1, None) is None
    assert train_module.tfrecord_memory_warning(str(google_tfrecords), 1, 2 * size) is None
    peak = batches.tfrecord_peak([google_tfrecords])  # one decode for all the processes
    warning = (
        f"bertforge: warning: {size_text(size)} of TFRecords are read into memory at every "
        f"start (once for the 2 processes on this machine), about {size_text(peak)} at the "
        f"peak, and this machine has {size_text(peak - 1)} available: the system may stop "
        "training for lack of memory; `bertforge data convert` turns them once into shards "
        "that training reads as it goes."
    )
    assert train_module.tfrecord_memory_warning(str(google_tfrecords), 2, peak - 1) == warning
    assert train_module.tfrecord_memory_warning(str(google_tfrecords), 2, peak) is None
    monkeypatch.setattr(train_module, "available_memory", lambda: size)
    said_before = []

    def loading(files):
        said_before.append(capsys.readouterr().err)
        return real_load(files)

    real_load = batches.load_tfrecords
    monkeypatch.setattr(batches, "load_tfrecords", loading)
    capsys.readouterr()
    run = ("--num-train-steps", "1", "--no-do-eval", "--vocab", str(kjv_vocab / "vocab.txt"))
    assert main(args(google_tfrecords, tmp_path / "tf", tiny_bert_config, *run)) == 0
    first = said_before[0].splitlines()[0]
    assert first.startswith(f"bertforge: warning: {size_text(size)} of TFRecords are read into "
                            "memory at every start, about ")  # fmt: skip
    assert first.endswith(f"this machine has {size_text(size)} available: the system may stop "
                          "training for lack of memory; `bertforge data convert` turns them "
                          "once into shards that training reads as it goes.")  # fmt: skip


def test_the_processes_of_a_machine_share_one_decoded_copy_of_the_tfrecords(
    tmp_path, google_tfrecords, monkeypatch
):
    """Under torchrun every process held its own copy of the TFRecords (8 GPUs: 8 copies).
    `shared_tfrecords`: process 0 of the machine decodes them once and writes the arrays to
    TMPDIR, the others map them (here 3 processes as threads), then the files go; all see the
    very arrays one process decodes. Where they cannot be written (a full TMPDIR), each
    process decodes its own copy, with a warning, and nothing is left behind either."""
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    whole, sizes = batches.load_tfrecords([google_tfrecords])
    decoded = []
    real_load = batches.load_tfrecords

    def load(files):
        decoded.append(files)
        return real_load(files)

    monkeypatch.setattr(batches, "load_tfrecords", load)

    def three() -> list[tuple[Any, list[int], str | None]]:
        with cf.ThreadPoolExecutor(3) as pool:
            return list(pool.map(lambda r: batches.shared_tfrecords([google_tfrecords], r, 3),
                                 range(3)))  # fmt: skip

    held = sum(
        getattr(whole, f).nbytes for f in batches.ROW_FIELDS if getattr(whole, f) is not None
    )
    for (rows, got, note), rank in zip(three(), range(3), strict=True):
        assert got == sizes
        for field in batches.ROW_FIELDS:
            a, b = getattr(whole, field), getattr(rows, field)
            assert (a is None and b is None) or (isinstance(b, np.memmap) and np.array_equal(a, b))
        assert note == (None if rank else (
            "train: the TFRecords were decoded once on this machine and are shared by its 3 "
            f"processes through {tmp} ({held / 1e6:,.0f} MB, deleted once mapped)"))  # fmt: skip
    assert len(decoded) == 1 and list(tmp.iterdir()) == []
    # Process 0 stopped while it waits for the others to map them (one failed, and torchrun
    # stops the rest): the folder goes all the same.
    real_sleep = batches.time.sleep

    def stopped(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(batches.time, "sleep", stopped)
    with pytest.raises(KeyboardInterrupt):
        batches.shared_tfrecords([google_tfrecords], 0, 2)
    monkeypatch.setattr(batches.time, "sleep", real_sleep)
    assert len(decoded) == 2 and list(tmp.iterdir()) == []

    def full(rows, sizes, folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batches, "write_arrays", full)
    decoded.clear()
    for (rows, got, note), rank in zip(three(), range(3), strict=True):
        assert got == sizes and not isinstance(rows.input_ids, np.memmap)
        assert np.array_equal(rows.input_ids, whole.input_ids)
        assert note == (None if rank else (
            "bertforge: warning: the TFRecords' arrays could not be written for the 3 processes "
            f"on this machine to share ({tmp}: No space left on device), so each holds its own "
            "copy; set TMPDIR to a directory with room for them."))  # fmt: skip
    assert len(decoded) == 3 and list(tmp.iterdir()) == []
    data = PretrainingData(str(google_tfrecords), (0, 1))  # one process: nothing to share
    assert data.tf_shared is None and len(decoded) == 4
    monkeypatch.undo()  # the real write_arrays again
    batches.write_arrays(whole, sizes, tmp / "theirs")  # a folder of another user's: refused
    assert (tmp / "theirs").stat().st_mode & 0o777 == 0o700
    monkeypatch.setattr(batches.os, "getuid", lambda: os.stat(tmp / "theirs").st_uid + 1)
    with pytest.raises(UserError, match=f"{tmp / 'theirs'} belongs to another user; "):
        batches.map_arrays(tmp / "theirs")


@pytest.mark.parametrize("ids", ["kjv", "under 128", "over 16384"])
def test_the_tfrecords_peak_is_told_from_their_first_records(
    tmp_path, google_tfrecords, monkeypatch, ids
):
    """The warning's peak (`tfrecord_peak`): what `load_tfrecords` holds and the widest field
    joined beside it, from a sample of the first file. A token id's varint takes one byte
    under 128, two under 16,384 and three above: bytes of file per record vary with the
    vocabulary, which a fixed ratio to the files' size (1.8) did not see."""
    from bertforge.tfrecord import bert_example

    monkeypatch.setattr(batches, "TF_CHUNK", 40)  # a sample of 40 records, then extrapolated
    files = [google_tfrecords]
    if ids != "kjv":
        low, high = (5, 128) if ids == "under 128" else (16384, 30000)
        rng = np.random.default_rng(0)
        records = []
        for _ in range(400):
            n = int(rng.integers(8, 65))
            tokens = [101, *rng.integers(low, high, n - 3).tolist(), 102, 102]
            where = sorted(rng.choice(np.arange(1, n - 1), 5, replace=False).tolist())
            labels = [tokens[p] for p in where]
            segments = [0] * (n - 2) + [1] * 2
            records.append(frame(bert_example(tokens, segments, where, labels, False, 64, 10)))
        files = [tmp_path / "a.tfrecord", tmp_path / "b.tfrecord"]
        files[0].write_bytes(b"".join(records[:150]))
        files[1].write_bytes(b"".join(records[150:]))
    rows, _ = batches.load_tfrecords(files)
    fields = [a.nbytes for a in vars(rows).values() if a is not None]
    peak = batches.TF_HEAP * (sum(fields) + max(fields))
    assert batches.tfrecord_peak(files) == pytest.approx(peak, rel=0.08)
    empty = tmp_path / "empty.tfrecord"  # no sample there: the next file's
    empty.write_bytes(b"")
    assert batches.tfrecord_peak([empty, *files]) == batches.tfrecord_peak(files)


def test_token_ids_beyond_the_vocabulary_say_which_of_two_causes(
    tmp_path, google_tfrecords, train_data, kjv_vocab, tiny_bert_config, capsys
):
    """Ids beyond --vocab: Google's TFRecords do not name their vocabulary, so another one is
    the likely cause; native shards whose manifest names this very vocabulary are damaged,
    and the error says how to check them, not to look for another vocabulary."""
    small = vocab_head(kjv_vocab, 300, tmp_path / "small")
    steps = ("--num-train-steps", "1", "--no-do-eval")
    (tmp_path / "alone").mkdir()  # as Google's are: beside their data manifest, it names one
    alone = Path(shutil.copy(google_tfrecords, tmp_path / "alone"))
    argv = args(alone, tmp_path / "tf", tiny_bert_config, *steps)
    assert main([*argv, "--vocab", str(small), "--do-lower-case"]) == 2
    err = capsys.readouterr().err
    assert "beyond the vocabulary" in err and "(300 tokens)" in err
    assert err.strip().endswith("the data was made with another vocabulary.")
    damaged = tmp_path / "damaged"
    shutil.copytree(train_data, damaged)
    shard = sorted(damaged.glob("shard-*"))[0]
    with shard.open("r+b") as f:  # a run of id 0xFFFF halfway into the records
        f.seek(shard.stat().st_size // 2)
        f.write(b"\xff" * 64)
    assert main(args(damaged, tmp_path / "out", tiny_bert_config, *steps)) == 2
    err = capsys.readouterr().err
    assert "holds token id 65535, beyond the vocabulary" in err and "(1500 tokens)" in err
    assert f"the shards are damaged: `bertforge data verify {damaged}`" in err
    assert "another vocabulary" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert main(["data", "verify", str(damaged)]) == 2  # which says so
    assert "does not match its sha256" in capsys.readouterr().err


def damage(data: Path, out: Path, record: int, **fields: object) -> Path:
    """A copy of a data directory with fields of one record of its first shard overwritten."""
    shutil.copytree(data, out)
    shard = sorted(out.glob("shard-*"))[0]
    header = read_header(shard)
    mapped = np.memmap(shard, header.dtype, "r+", header.offset, (header.num_records,))
    for name, value in fields.items():
        mapped[name][record] = value
    mapped.flush()
    return out


def test_records_whose_fields_contradict_each_other_stop_training_naming_the_record(
    tmp_path, train_data, google_tfrecords, kjv_vocab, tiny_bert_config, capsys
):
    """A damaged native shard whose token ids stay inside the vocabulary (a length, the first
    [SEP], a label, masked positions) trained on silently before, or failed deep in a step:
    the run stops before it starts, naming the shard, the record and the field, and says how
    to check and what to do; nothing is written. bertforge's own data passes, both kinds.
    Rows read from TFRecords are checked for the fields they hold (segment ids, label, masked
    positions), naming the file and the record in it."""
    assert PretrainingData(str(train_data)).damaged_record() is None
    static = tmp_path / "static"  # Google's TFRecords converted: static masks stored
    assert main(["data", "convert", str(google_tfrecords), "--vocab", str(kjv_vocab), "--output",
                 str(static), "--lowercase"]) == 0  # fmt: skip
    assert PretrainingData(str(static)).damaged_record() is None
    seq = PretrainingData(str(train_data)).info.max_seq_length
    cases = [
        (train_data, {"length": seq + 1}, f"length {seq + 1}, beyond max_seq_length {seq}"),
        (train_data, {"length": 1}, "length 1, shorter than [CLS] [SEP]"),
        (train_data, {"sep_a": 0}, "its first [SEP] at 0, outside the instance"),
        (train_data, {"length": 20, "sep_a": 20}, "its first [SEP] at 20, outside the instance"),
        (train_data, {"next_sentence_label": 2}, "next-sentence label 2, not 0 or 1"),
        (static, {"num_masked": 11}, "11 masked positions, beyond the 10 slots"),
        (static, {"length": 20, "sep_a": 5, "num_masked": 2,
                  "masked_lm_positions": [3, 30] + [0] * 8},
         "masked positions [30] outside the instance"),
    ]  # fmt: skip
    for k, (data, fields, what) in enumerate(cases):
        bad = damage(data, tmp_path / f"bad{k}", 7, **fields)
        shard = sorted(bad.glob("shard-*"))[0]
        assert PretrainingData(str(bad)).damaged_record() == f"{shard}: record 7: {what}"
        if k in (0, len(cases) - 1):  # the command line: one error, nothing written
            out = tmp_path / f"out{k}"
            assert main(args(bad, out, tiny_bert_config, "--num-train-steps", "1")) == 2
            err = capsys.readouterr().err
            assert err == (
                f"bertforge: error: {shard}: record 7: {what}; the shard is damaged. `bertforge "
                f"data verify {bad}` checks the shards against their sha256; recreate the data "
                "(bertforge data ... --overwrite).\n"
            )
            assert not out.exists() or not any(out.iterdir())
    # Google's TFRecords (written by other tools too): the same, for the fields they hold
    with google_tfrecords.open("rb") as f:
        records = list(read_records(f))
    cases = [  # (field, its entry, the value; None: one past the instance's length)
        ("segment_ids", 3, 2, "segment ids [2], not 0 or 1"),
        ("segment_ids", 3, 300, "segment ids [300], not 0 or 1"),  # beyond int8: held as read
        ("next_sentence_labels", 0, 3, "next-sentence label 3, not 0 or 1"),
        ("masked_lm_positions", 0, None, "masked positions [{}] outside the instance"),
        ("masked_lm_positions", 0, 5 << 30, f"masked positions [{5 << 30}] outside the instance"),
    ]
    for k, (field, entry, value, what) in enumerate(cases):
        example = decode_example(records[7])
        beyond = sum(example["input_mask"]) + 1
        example[field][entry] = beyond if value is None else value
        tf = tmp_path / f"tf{k}" / "data.tfrecord"
        tf.parent.mkdir()
        damaged = [*records[:7], encode_example(example, {"masked_lm_weights"}), *records[8:]]
        tf.write_bytes(b"".join(frame(r) for r in damaged))
        assert PretrainingData(str(tf)).damaged_record() == f"{tf}: record 7: " + what.format(
            beyond
        )
    assert main(args(tf, tmp_path / "out-tf", tiny_bert_config, "--vocab", str(kjv_vocab))) == 2
    assert capsys.readouterr().err.endswith(
        "outside the instance; the TFRecords are not valid BERT pretraining data: make them "
        "again (with Google's create_pretraining_data.py, or bertforge data --format tfrecord).\n"
    )
    assert PretrainingData(str(google_tfrecords)).damaged_record() is None
    # a stored masked-LM label beyond the vocabulary, the input ids untouched
    bad = damage(static, tmp_path / "label", 7, num_masked=1, masked_lm_ids=[65535] * 10)
    assert main(args(bad, tmp_path / "out", tiny_bert_config, "--num-train-steps", "1")) == 2
    assert "holds token id 65535, beyond the vocabulary" in capsys.readouterr().err


def test_an_output_over_another_stages_output_is_refused_even_with_overwrite(
    tmp_path, train_data, tiny_bert_config, capsys
):
    """--output DATA --overwrite: training wrote its manifest.json over the data's, and the
    data could no longer be read. Another stage's output is refused, --overwrite or not, and
    left as it was; the same holds for `bertforge run`."""
    data = tmp_path / "data"
    shutil.copytree(train_data, data)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    extra = ("--num-train-steps", "1", "--overwrite")
    assert main(args(data, data, tiny_bert_config, *extra)) == 2
    assert capsys.readouterr().err == (
        f"bertforge: error: --output: {data} holds a bertforge data output, which a train "
        "output written there would damage; choose another directory (--overwrite replaces "
        "only an earlier train output).\n"
    )
    assert (
        main(["run", str(train_data / "manifest.json"), "--output", str(data), "--overwrite"]) == 2
    )
    assert f"{data} holds a bertforge data output, which a run output" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before


def test_shard_files_named_one_by_one(
    tmp_path, train_data, google_tfrecords, kjv_vocab, tiny_bert_config, capsys
):
    """--data as a glob of native shards: those with dynamic masks need their directory's
    manifest (the masking settings are there), so the glob is one error pointing to it, where
    an assertion's traceback came before; nothing is written. Shards with stored masks train
    from a glob with --vocab, and without it are told to give it (not that they are Google's
    TFRecords, as the message said before)."""
    out = tmp_path / "run"
    shards = str(train_data / "shard-*.bin")
    assert main(args(Path(shards), out, tiny_bert_config, "--num-train-steps", "1")) == 2
    assert capsys.readouterr().err == (
        f"bertforge: error: --data {shards}: these shards are masked as training reads them, "
        "with the settings (masked_lm_prob, whole-word masking) that their data directory's "
        "manifest.json holds, and shard files named one by one leave it out; give the "
        f"directory: --data {train_data}.\n"
    )
    assert not out.exists()
    static = tmp_path / "static"  # Google's TFRecords converted: static masks stored
    assert main(["data", "convert", str(google_tfrecords), "--vocab", str(kjv_vocab), "--output",
                 str(static), "--lowercase"]) == 0  # fmt: skip
    files = Path(str(static / "shard-*.bin"))
    assert main(args(files, out, tiny_bert_config, "--num-train-steps", "1")) == 2
    assert capsys.readouterr().err == (
        f"bertforge: error: {files}: shard files do not name their vocabulary; give --vocab "
        f"(the vocab.txt the data was made with), or --data {static} (its manifest.json "
        "names it).\n"
    )
    vocab = ("--vocab", str(kjv_vocab), "--no-do-eval")
    assert main(args(files, out, tiny_bert_config, "--num-train-steps", "2", *vocab)) == 0
    assert [m["step"] for m in metrics(out)] == [1, 2]


@pytest.mark.parametrize(
    "extra",
    [["--google-adam", "--learning_rate=2e-3"], ["--optimizer", "lamb", "--learning_rate=2e-2"]],
)
def test_google_tfrecords_and_other_optimizers(
    tmp_path, google_tfrecords, kjv_vocab, tiny_bert_config, extra, capsys
):
    out = tmp_path / "run"
    glob = str(google_tfrecords.parent / "*.tfrecord")
    assert main(args(google_tfrecords, out, tiny_bert_config, "--num-train-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "do not name their vocabulary; give --vocab" in err
    assert f"or --data {google_tfrecords.parent} (its manifest.json names it)." in err
    alone = tmp_path / "alone" / "data.tfrecord"  # a TFRecord without a bertforge manifest
    alone.parent.mkdir()
    alone.write_bytes(google_tfrecords.read_bytes())
    assert main(args(alone, out, tiny_bert_config, "--num-train-steps", "1")) == 2
    assert "(the vocab.txt the data was made with).\n" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--input_file",
                glob,
                "--output_dir",
                str(out),
                "--bert_config_file",
                str(tiny_bert_config),
                "--vocab_file",
                str(kjv_vocab / "vocab.txt"),
                "--do_lower_case=True",
                "--max_seq_length=64",
                "--max_predictions_per_seq=10",
                "--train_batch_size=16",
                "--num_train_steps=30",
                "--log-every=1",
                *extra,
            ]
        )
        == 0
    )
    m = metrics(out)
    assert m[-1]["loss"] < m[0]["loss"] - 0.5
    assert json.loads((out / "manifest.json").read_text())["data"]["static_masking"] is True


@pytest.mark.parametrize("kind", ["fused", "host", "flat"])
def test_gradients_are_clipped_to_the_global_norm(kind):
    """update() clips as Google's clip_by_global_norm (and torch's clip_grad_norm_): folded
    into fused AdamW's grad_scale when the optimizer skips bad steps on the device (also
    FlatAdamW's, the norm over its gradient buffers), divided on the host otherwise. Gradient
    norms 40, 0.3, 12 against max 1.0: clipping changes Adam's moments, so a step that did not
    clip would differ."""
    from bertforge.optim import FlatAdamW
    from bertforge.train import SUMS, Ledger, update

    def run(clip: str) -> tuple[list[torch.Tensor], list[float]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
        on_device = clip == "update" and kind != "host"
        if clip == "update" and kind == "flat":
            opt = FlatAdamW(model.parameters(), lr=0.1, eps=1e-8, weight_decay=0.01)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=on_device)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        ledger = Ledger(device_skip=on_device, skipped=0)
        norms = []
        for target in (40.0, 0.3, 12.0):
            grads = [torch.randn_like(p) for p in model.parameters()]
            total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            for p, g in zip(model.parameters(), grads, strict=True):
                if isinstance(opt, FlatAdamW):
                    p.grad.copy_(g * (target / total))
                else:
                    p.grad = g * (target / total)
            if clip == "update":
                _, norm = update(model, opt, scaler, torch.zeros(len(SUMS)), 1.0, ledger)
            else:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0 if clip else 1e9)
                opt.step()
            norms.append(float(norm))
        return [p.detach().clone() for p in model.parameters()], norms

    (ours, norms), (want, want_norms), (unclipped, _) = run("update"), run("torch"), run("")
    assert norms == pytest.approx([40.0, 0.3, 12.0], rel=1e-5) == want_norms
    for a, b, c in zip(ours, want, unclipped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a, c, rtol=1e-3, atol=1e-4)


def test_google_adam_has_no_bias_correction():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = GoogleAdamW([{"params": [p], "weight_decay": 0.1}], lr=0.5, eps=1e-6)
    g = torch.tensor([0.3, -0.1])
    p.grad = g.clone()
    opt.step()
    m, v = 0.1 * g, 0.001 * g * g
    want = torch.tensor([1.0, -2.0]) - 0.5 * (
        m / (v.sqrt() + 1e-6) + 0.1 * torch.tensor([1.0, -2.0])
    )
    torch.testing.assert_close(p.detach(), want)


def test_learning_rate_schedule_is_googles():
    assert learning_rate(0, 1e-4, 10, 100) == 0.0
    assert learning_rate(5, 1e-4, 10, 100) == pytest.approx(5e-5)
    assert learning_rate(10, 1e-4, 10, 100) == pytest.approx(9e-5)  # decay counts from step 0
    assert learning_rate(100, 1e-4, 10, 100) == 0.0
    assert TrainConfig(data="d", output="o", num_train_steps=500_000).warmup_steps == 5000


def test_init_from_a_model_saved_with_a_tokenizer_json_alone(
    tmp_path, train_data, kjv_corpus, kjv_vocab, tiny_bert_config, capsys
):
    """transformers 5 saves a model's tokenizer as tokenizer.json without vocab.txt: that file
    is the checkpoint's vocabulary, for continued pretraining and for loading the model."""
    transformers = pytest.importorskip("transformers")
    from bertforge.config import RunConfig
    from bertforge.inference import load_model
    from bertforge.run import plan

    c = BertConfig.from_json(tiny_bert_config)
    hf_dir = tmp_path / "hf"
    transformers.BertForPreTraining(transformers.BertConfig(**c.to_dict())).save_pretrained(hf_dir)
    transformers.BertTokenizerFast(str(kjv_vocab / "vocab.txt")).save_pretrained(hf_dir)
    (hf_dir / "vocab.txt").unlink(missing_ok=True)  # transformers 4 writes it beside
    assert read_init_checkpoint(str(hf_dir)).vocab_file == hf_dir / "tokenizer.json"
    own = tmp_path / "data"  # made with the checkpoint's vocabulary, as `bertforge run` does
    create_data(DataConfig(input=(str(kjv_corpus),), vocab=str(hf_dir), output=str(own),
                           max_seq_length=64, max_predictions_per_seq=10, workers=1,
                           progress=False))  # fmt: skip
    cont = ["train", "--init-checkpoint", str(hf_dir), "--train-batch-size", "16",
            "--num-train-steps", "1", "--no-progress"]  # fmt: skip
    assert main([*cont, "--data", str(own), "--output", str(tmp_path / "cont")]) == 0
    kept = (tmp_path / "cont" / "vocab.txt").read_text(encoding="utf-8")
    assert kept == (kjv_vocab / "vocab.txt").read_text(encoding="utf-8")
    loaded = load_model(str(hf_dir), "cpu")
    assert loaded.vocab.path == hf_dir / "tokenizer.json" and loaded.vocab.do_lower_case
    assert list(loaded.vocab.tokens) == kept.splitlines()
    model = tmp_path / "model"  # exported with the tokenizer files it was trained with
    assert main(["export", "--checkpoint", str(tmp_path / "cont"), "--output", str(model)]) == 0
    text = "And GOD said, Let there be light: and there was light."
    again = transformers.AutoTokenizer.from_pretrained(model)(text)["input_ids"]
    assert again == transformers.AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"]
    run, configs = plan(RunConfig(input=("corpus.txt",), output=str(tmp_path / "r")), {},
                        {"init_checkpoint": str(hf_dir)})  # fmt: skip
    assert run.vocab == configs["data"].vocab == str(hf_dir)  # `bertforge run`: the data's
    # a token that is not an [unusedN] slot changed: refused, naming its id in the file
    spec = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab["zzqx"] = vocab.pop(kept.splitlines()[702])
    (hf_dir / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    capsys.readouterr()
    assert main([*cont, "--data", str(train_data), "--output", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert f"its vocabulary {hf_dir / 'tokenizer.json'} (1500 tokens)" in err
    assert "first difference at id 702, not an [unusedN] slot" in err
    # no vocabulary beside it at all: nothing to check against, and the run says so
    (hf_dir / "tokenizer.json").unlink()
    assert main([*cont, "--data", str(train_data), "--output", str(tmp_path / "bare")]) == 0
    err = capsys.readouterr().err
    assert f"warning: no vocab.txt or tokenizer.json beside {hf_dir}, so nothing checks" in err


def test_batches_are_a_function_of_seed_and_step(train_data):
    data = PretrainingData(str(train_data))
    split = Split.of(len(data), 15)
    order = Order(split.num_train, 7)
    seen = np.concatenate([order.indices(s, 16) for s in range(len(data) // 16 - 1)])
    assert len(set(seen.tolist())) == len(seen) and seen.max() < split.num_train  # one epoch
    from bertforge.tokenization import load_vocab
    from bertforge.train import mask_spec

    spec = mask_spec(data, load_vocab(data.info.vocab_path))
    a = step_rows(data, order, spec, 7, 3, 16)
    b = step_rows(data, Order(split.num_train, 7), spec, 7, 3, 16)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
    c = step_rows(data, order, spec, 7, 4, 16)
    assert not np.array_equal(a.input_ids, c.input_ids)
    # Each process reads and masks only its share: the shares are the whole batch's rows.
    for lo, hi in ((0, 5), (5, 8), (8, 16)):
        part = step_rows(data, order, spec, 7, 3, 16, (lo, hi))
        for name in ("input_ids", "lengths", "token_type_ids", "next_sentence", "positions",
                     "labels"):  # fmt: skip
            assert np.array_equal(getattr(part, name), getattr(a, name)[lo:hi]), name


def test_heads_a_checkpoint_lacks_are_named_as_starting_fresh(
    tmp_path, train_data, kjv_vocab, tiny_bert_config, capsys
):
    """A bare encoder (transformers' BertModel) trains from its encoder with fresh heads, and
    says so; BertForMaskedLM lacks the pooler and the next-sentence head; a whole
    BertForPreTraining checkpoint lacks nothing, and nothing is said."""
    transformers = pytest.importorskip("transformers")
    c = transformers.BertConfig(**BertConfig.from_json(tiny_bert_config).to_dict())
    kinds = {"bare": transformers.BertModel, "mlm": transformers.BertForMaskedLM,
             "whole": transformers.BertForPreTraining}  # fmt: skip
    said = {}
    for name, kind in kinds.items():
        kind(c).save_pretrained(tmp_path / name)
        shutil.copy(kjv_vocab / "vocab.txt", tmp_path / name)
        run = args(train_data, tmp_path / f"{name}-run", tiny_bert_config, "--num-train-steps",
                   "1", "--init-checkpoint", str(tmp_path / name))  # fmt: skip
        run.remove("--bert-config")
        run.remove(str(tiny_bert_config))
        assert main(run) == 0
        said[name] = [x for x in capsys.readouterr().err.splitlines() if "no weights for" in x]
    (bare,) = said["bare"]
    assert "no weights for the masked-LM head or the next-sentence head (a bare encoder" in bare
    (mlm,) = said["mlm"]
    assert "no weights for the pooler or the next-sentence head: they start from fresh" in mlm
    assert said["whole"] == []


def test_init_from_hugging_face_and_bertforge_checkpoints(
    tmp_path, train_data, kjv_vocab, tiny_bert_config, capsys
):
    transformers = pytest.importorskip("transformers")
    c = BertConfig.from_json(tiny_bert_config)
    hf = transformers.BertForPreTraining(transformers.BertConfig(**c.to_dict()))
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    (hf_dir / "vocab.txt").write_text((kjv_vocab / "vocab.txt").read_text())
    init = read_init_checkpoint(str(hf_dir))
    assert init.kind == "huggingface"
    want = from_hf(hf.state_dict(), c, "hf")
    for k, v in want.items():
        torch.testing.assert_close(init.weights[k], v, rtol=0, atol=0)
    out = tmp_path / "cont"
    assert (
        main(
            [
                "train",
                "--data",
                str(train_data),
                "--output",
                str(out),
                "--init-checkpoint",
                str(hf_dir),
                "--train-batch-size",
                "16",
                "--num-train-steps",
                "2",
                "--learning-rate",
                "2e-5",
                "--no-progress",
            ]
        )
        == 0
    )
    again = read_init_checkpoint(str(out))
    assert again.kind == "bertforge" and again.config == c
    # eval only, from the bertforge checkpoint
    assert (
        main(
            [
                "train",
                "--data",
                str(train_data),
                "--output",
                str(tmp_path / "ev"),
                "--init-checkpoint",
                str(out),
                "--no-do-train",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "global_step = 0" in (tmp_path / "ev" / "eval_results.txt").read_text()
    # a checkpoint whose vocabulary is not the data's
    (hf_dir / "vocab.txt").write_text((kjv_vocab / "vocab.txt").read_text().replace("the", "teh"))
    assert (
        main(
            [
                "train",
                "--data",
                str(train_data),
                "--output",
                str(tmp_path / "z"),
                "--init-checkpoint",
                str(hf_dir),
            ]
        )
        == 2
    )
    assert "is not the data's" in capsys.readouterr().err
    # Google's way to add words: a copy of the checkpoint's vocab.txt with new words written
    # over [unusedN] lines. Here the checkpoint's has slots where the data's has words.
    # Each new word starts from the mean of its pieces' rows (embedding and masked-LM bias).
    tokens = (kjv_vocab / "vocab.txt").read_text().splitlines()
    slots = tokens[:]
    slots[700], slots[701] = "[unused900]", "[unused901]"
    (hf_dir / "vocab.txt").write_text("\n".join(slots) + "\n")
    # lr 0 at step 0 (warmup): the step-1 checkpoint holds the weights training started from
    cont = ["train", "--data", str(train_data), "--init-checkpoint", str(hf_dir),
            "--train-batch-size", "16", "--num-train-steps", "1", "--num-warmup-steps", "1",
            "--no-progress"]  # fmt: skip
    assert main([*cont, "--output", str(tmp_path / "slots")]) == 0
    err = capsys.readouterr().err
    assert f"2 [unusedN] slot(s) of {hf_dir / 'vocab.txt'} are new words in " in err
    assert f"(line 701: [unused900] -> {tokens[700]})" in err
    assert "2 start from the mean of their pieces' embeddings" in err
    manifest = json.loads((tmp_path / "slots" / "manifest.json").read_text())
    assert manifest["embeddings"] == {"new_words_from_pieces": 2, "new_words_as_slots": 0}
    started = torch.load(list_checkpoints(tmp_path / "slots")[-1], weights_only=False)["model"]
    split = wordpiece_tokenizer({t: i for i, t in enumerate(slots)})
    for i in (700, 701):
        word = tokens[i]
        if word.startswith("##"):  # as the continuation of a word starting with "a"
            ids = split.encode("a" + word[2:]).ids
            assert ids[0] == slots.index("a")
            ids = ids[1:]
        else:
            ids = split.encode(word).ids
        assert len(ids) > 1 and slots.index("[UNK]") not in ids
        for name, hf_name in (("word_embeddings.weight", "bert.embeddings.word_embeddings.weight"),
                              ("mlm_bias", "cls.predictions.bias")):  # fmt: skip
            theirs = hf.state_dict()[hf_name]
            torch.testing.assert_close(started[name][i], theirs[ids].mean(0))
            kept = [j for j in range(len(slots)) if j not in (700, 701)]
            torch.testing.assert_close(started[name][kept], theirs[kept], rtol=0, atol=0)
    slots[702] = "zzqx"  # a word that is not a slot changed: refused, naming its line
    (hf_dir / "vocab.txt").write_text("\n".join(slots) + "\n")
    assert main([*cont, "--output", str(tmp_path / "other")]) == 2
    assert "first difference at line 703, not an [unusedN] slot" in capsys.readouterr().err
    state = dict(to_hf(BertForPretraining(c).state_dict(), c))
    assert "cls.predictions.decoder.weight" in state


def test_continuing_a_checkpoint_of_other_casing_is_warned_about(
    tmp_path, train_data, exported_model, capsys
):
    """mBERT is cased; data made with --lowercase on its vocab.txt (the same tokens) trained
    it on text unlike its pretraining's without a word. A warning now names both casings."""
    cased = Path(shutil.copytree(exported_model, tmp_path / "cased"))
    config = json.loads((cased / "tokenizer_config.json").read_text())
    (cased / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    run = ["train", str(train_data), "--num-train-steps", "1", "--no-do-eval", "--no-progress",
           "--init-checkpoint"]  # fmt: skip
    capsys.readouterr()
    assert main([*run, str(cased), "--output", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert (
        f"bertforge: warning: the tokenizer of --init-checkpoint {cased} keeps case and keeps "
        f"accents ({cased / 'tokenizer_config.json'}); the data's lowercases and strips accents ("
    ) in err
    assert "Make the data with the checkpoint's casing (--cased or --lowercase)" in err
    assert main([*run, str(exported_model), "--output", str(tmp_path / "b")]) == 0
    assert "tokenizer of --init-checkpoint" not in capsys.readouterr().err  # the same casing
    slots = ("--transfer-vocab",)  # a vocabulary of its own: its casing is the user's choice
    assert main([*run, str(cased), *slots, "--output", str(tmp_path / "c")]) == 0
    assert "tokenizer of --init-checkpoint" not in capsys.readouterr().err


def test_continuing_a_google_checkpoint_of_other_casing_is_warned_about(
    tmp_path, train_data, trained_run, kjv_corpus, kjv_vocab, capsys
):
    """Google's checkpoints record no casing (a bare vocab.txt beside them): their tokens
    tell it (`token_casing`). Data made cased on an uncased checkpoint's vocab.txt is warned
    about in train as well as in data (made long before, it may come from someone else)."""
    google = tmp_path / "uncased_L-2_H-64"
    cfg = TrainConfig(data=str(train_data), output="x")
    google_run_checkpoint(list_checkpoints(trained_run)[-1], google / "bert_model.ckpt", cfg)
    shutil.copy(trained_run / "bert_config.json", google)
    shutil.copy(kjv_vocab / "vocab.txt", google)
    cased = tmp_path / "cased_data"
    assert main(["data", "--input", str(kjv_corpus), "--vocab", str(google / "vocab.txt"),
                 "--cased", "--max-seq-length", "64", "--output", str(cased)]) == 0  # fmt: skip
    assert "is read cased (--cased), but none of its" in capsys.readouterr().err
    run = ["train", "--num-train-steps", "1", "--no-do-eval", "--no-progress", "--init-checkpoint",
           str(google / "bert_model.ckpt")]  # fmt: skip
    assert main([*run, "--data", str(cased), "--output", str(tmp_path / "a")]) == 0
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "the tokenizer of" in x]
    assert line.startswith(
        f"bertforge: warning: the tokenizer of --init-checkpoint {google / 'bert_model.ckpt'} "
        "looks uncased (none of its "
    )
    assert "tokens holds a capital letter); the data's keeps case and keeps accents (" in line
    assert main([*run, "--data", str(train_data), "--output", str(tmp_path / "b")]) == 0
    assert "looks" not in capsys.readouterr().err  # lowercased data: as the checkpoint was


def test_transfer_vocab_starts_each_token_from_the_checkpoints_rows(
    tmp_path, train_data, kjv_vocab, tiny_bert_config, capsys
):
    """--transfer-vocab: data made with another vocabulary than the checkpoint's trains from
    it. Matched by token, not by id: a token the checkpoint has keeps its rows (embedding and
    masked-LM bias), another starts from the mean of its pieces' rows under the checkpoint's
    WordPiece (Hugging Face's, as the independent split), one with a character the checkpoint
    lacks from its [UNK] row; the vocab padding stays zero. Without the flag it is refused."""
    transformers = pytest.importorskip("transformers")
    tokens = (kjv_vocab / "vocab.txt").read_text().splitlines()
    words = [t for t in tokens[110:] if len(t.lstrip("#")) > 3 and "z" not in t]
    dropped = set(words[::7])  # words the checkpoint lacks: split into pieces
    theirs = tokens[:105] + sorted(
        {t for t in tokens[105:] if t not in dropped and "z" not in t} | {"[extra]", "##qq"},
        reverse=True,  # another order: other ids
    )
    c = dataclasses.replace(BertConfig.from_json(tiny_bert_config), vocab_size=len(theirs))
    hf = transformers.BertForPreTraining(transformers.BertConfig(**c.to_dict()))
    with torch.no_grad():
        hf.cls.predictions.bias.normal_()  # zeros at init: give the mean something to show
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    (hf_dir / "vocab.txt").write_text("\n".join(theirs) + "\n")
    cont = ["train", "--data", str(train_data), "--init-checkpoint", str(hf_dir),
            "--train-batch-size", "16", "--num-train-steps", "1", "--num-warmup-steps", "1",
            "--no-progress"]  # fmt: skip
    assert main([*cont, "--output", str(tmp_path / "refused")]) == 2
    assert "--transfer-vocab" in capsys.readouterr().err

    assert main([*cont, "--output", str(tmp_path / "t"), "--transfer-vocab"]) == 0
    err = capsys.readouterr().err
    kept = [i for i, t in enumerate(tokens) if t in theirs]
    unknown = [i for i, t in enumerate(tokens) if "z" in t]
    pieces = [i for i in range(len(tokens)) if i not in kept and i not in unknown]
    assert unknown and len(pieces) >= len(dropped) > 10
    assert (
        f"--transfer-vocab: of the {len(tokens):,} tokens of {kjv_vocab / 'vocab.txt'}, "
        f"{len(kept):,} are in {hf_dir / 'vocab.txt'} ({len(theirs):,} tokens) and keep their "
        f"embeddings; {len(pieces):,} start from the mean of their pieces' embeddings; "
        f"{len(unknown):,} have characters it lacks (the first: {tokens[unknown[0]]!r})"
    ) in err
    state = torch.load(list_checkpoints(tmp_path / "t")[-1], weights_only=False)
    assert state["bert_config"]["vocab_size"] == len(tokens)
    counts = {"kept": len(kept), "from_pieces": len(pieces), "from_unk": len(unknown)}
    assert state["embeddings"] == counts  # kept for a resumed run's manifest
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["embeddings"] == counts
    longer = [*cont, "--output", str(tmp_path / "t"), "--transfer-vocab"]
    longer[longer.index("--num-train-steps") + 1] = "2"
    assert main(longer) == 0  # resumed from step 1: the counts come from the checkpoint
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["embeddings"] == counts
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["counts"]["steps"] == 2
    split = wordpiece_tokenizer({t: i for i, t in enumerate(theirs)})
    for name, hf_name in (("word_embeddings.weight", "bert.embeddings.word_embeddings.weight"),
                          ("mlm_bias", "cls.predictions.bias")):  # fmt: skip
        old, new = hf.state_dict()[hf_name], state["model"][name]
        assert (new[len(tokens) :] == 0).all()
        for i in kept:
            assert torch.equal(new[i], old[theirs.index(tokens[i])]), tokens[i]
        for i in unknown:
            assert torch.equal(new[i], old[theirs.index("[UNK]")]), tokens[i]
        for i in pieces:
            word = tokens[i]
            ids = split.encode(word).ids
            if word.startswith("##"):  # as the continuation of a one-letter word before it
                letters = set("abcdefghijklmnopqrstuvwxy")
                first = (split.encode(c + word[2:]).ids for c in sorted(letters))
                ids = next(x[1:] for x in first if theirs[x[0]] in letters)
            assert len(ids) > 1 and theirs.index("[UNK]") not in ids, word
            torch.testing.assert_close(new[i], old[ids].mean(0))
    (hf_dir / "vocab.txt").unlink()  # nothing to match the rows by: refused
    assert main([*cont, "--output", str(tmp_path / "t2"), "--transfer-vocab"]) == 2
    assert "--transfer-vocab: no vocab.txt or tokenizer.json beside" in capsys.readouterr().err


def test_transfer_vocab_reads_an_uncased_checkpoint_for_a_cased_vocabulary():
    from bertforge.checkpoint import transfer_vocab

    theirs = ["[PAD]", "[UNK]", "apple", "##s", "ol", "##e"]
    weights = {"word_embeddings.weight": torch.arange(6.0)[:, None].repeat(1, 2)}
    out, t = transfer_vocab(
        weights, ["[PAD]", "[UNK]", "Apples", "Olé", "##s", "##S", "x"], theirs, 8
    )
    emb = out["word_embeddings.weight"]
    assert emb.shape == (8, 2) and (emb[7:] == 0).all()
    # Apples -> apple ##s, Olé -> ol ##e, ##S -> ##s (lowercased, accents stripped); x: [UNK]
    assert emb[:, 0].tolist() == [0, 1, 2.5, 4.5, 3, 3, 1, 0]
    assert (t.kept, t.pieces, t.unknown) == ([0, 1, 4], [2, 3, 5], [6])
    with pytest.raises(UserError, match="--transfer-vocab"):
        TrainConfig(data="d", output="o", transfer_vocab=True)


def google_run_checkpoint(pt: Path, prefix: Path, cfg: TrainConfig) -> None:
    """A bertforge checkpoint written as run_pretraining.py writes its checkpoints: weights,
    WEIGHT/adam_m and WEIGHT/adam_v per weight, global_step (Google's names and layouts)."""
    from bertforge.tfcheckpoint import google_tensors, write_checkpoint
    from bertforge.train import make_optimizer

    state = torch.load(pt, weights_only=False)
    c = BertConfig.from_dict(state["bert_config"], "ckpt")
    model = BertForPretraining(c)
    model.load_state_dict(state["model"])
    optimizer = make_optimizer(cfg, model)
    optimizer.load_state_dict(state["optimizer"])
    params = dict(model.named_parameters())
    tensors: dict[str, np.ndarray] = {"global_step": np.array(state["step"], dtype=np.int64)}
    for suffix, values in (
        ("", params),
        ("/adam_m", {n: optimizer.state[p]["exp_avg"] for n, p in params.items()}),
        ("/adam_v", {n: optimizer.state[p]["exp_avg_sq"] for n, p in params.items()}),
    ):
        hf = {k: v.detach().numpy() for k, v in to_hf(values, c)}
        for name, arr in google_tensors(hf).items():
            tensors[name + suffix] = np.ascontiguousarray(arr)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(prefix, tensors)
    (prefix.parent / "checkpoint").write_text(f'model_checkpoint_path: "{prefix.name}"\n')


def test_a_checkpoint_of_other_names_is_refused_naming_what_it_holds(
    tmp_path, train_data, tiny_bert_config, capsys
):
    """--init-checkpoint with a TF checkpoint that is not Google's BERT: a TensorFlow 2 one
    (object paths) is told apart, with what to do; any other says which variables it holds."""
    from bertforge.tfcheckpoint import write_checkpoint

    for name, names, expected in (
        ("tf2", ["_CHECKPOINTABLE_OBJECT_GRAPH",
                 "encoder/layer_with_weights-0/embeddings/.ATTRIBUTES/VARIABLE_VALUE"],
         "--init-checkpoint: {p}: a TensorFlow 2 checkpoint (object paths such as "
         "encoder/layer_with_weights-0/embeddings/.ATTRIBUTES/VARIABLE_VALUE), not one of "
         "Google's BERT checkpoints (names such as bert/embeddings/word_embeddings"),
        ("other", ["a", "b", "c", "d"],
         "--init-checkpoint: {p}: no bert/embeddings/word_embeddings; not a BERT checkpoint "
         "(its variables: a, b, c, ...)."),
    ):  # fmt: skip
        prefix = tmp_path / name / "model.ckpt"
        prefix.parent.mkdir()
        write_checkpoint(prefix, {n: np.zeros(2, dtype=np.float32) for n in names})
        shutil.copy(tiny_bert_config, prefix.parent / "bert_config.json")
        argv = args(train_data, tmp_path / f"out-{name}", tiny_bert_config)
        assert main([*argv, "--init-checkpoint", str(prefix), "--num-train-steps", "1"]) == 2
        err = capsys.readouterr().err
        assert expected.format(p=prefix) in err, err
        assert not (tmp_path / f"out-{name}").exists()


def test_a_damaged_tf_checkpoint_index_is_an_error_naming_it(tmp_path):
    """Every block of a TF checkpoint's index that is read is checked against its crc32c
    (TensorFlow writes one, as `write_checkpoint` does): a flipped byte anywhere in them, or a
    cut, is one error naming the index; before, a flip raised whatever the parser met
    (UnicodeDecodeError, IndexError, struct.error, "protobuf wire type 7") or read a wrong
    shape."""
    from bertforge.tfcheckpoint import read_checkpoint, write_checkpoint
    from bertforge.tfrecord import _read_varint

    prefix = tmp_path / "model.ckpt"
    names = [f"bert/encoder/layer_{i}/output/dense/kernel" for i in range(20)]
    write_checkpoint(prefix, {n: np.zeros((2, 3), dtype=np.float32) for n in names})
    index = prefix.with_name("model.ckpt.index")
    whole = index.read_bytes()
    assert sorted(read_checkpoint(prefix)) == sorted(names)
    footer = whole[-48:]  # its first handle: the metaindex block, which nothing reads
    meta_offset, pos = _read_varint(footer, 0)
    meta_size, _ = _read_varint(footer, pos)
    read = set(range(len(whole) - 48)) - set(range(meta_offset, meta_offset + meta_size + 5))
    assert len(read) > 1000
    for at in sorted(read):  # every byte of the blocks read
        damaged = bytearray(whole)
        damaged[at] ^= 0x10
        index.write_bytes(bytes(damaged))
        with pytest.raises(UserError, match=rf"{index}: the checkpoint index is damaged \("):
            read_checkpoint(prefix)
    index.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=rf"{index}: not a TensorFlow checkpoint index"):
        read_checkpoint(prefix)


@pytest.mark.parametrize("google_adam", [True, False])
def test_a_google_run_continues_where_it_stopped(
    tmp_path, train_data, tiny_bert_config, capsys, google_adam
):
    """--resume-google takes over a run_pretraining.py checkpoint's weights, Adam moments and
    step: 2 steps from Google's step 2 give the weights of 4 uninterrupted steps (no dropout:
    data order and masks are functions of the step). With torch's AdamW, whose bias
    correction reads the optimizer's step count, as well as with Google's optimizer."""
    same = ("--dropout", "0", "--no-do-eval", "--save-checkpoints-steps", "2",
            "--num-train-steps", "4")  # fmt: skip
    same = ("--google-adam", *same) if google_adam else same
    whole = tmp_path / "whole"
    assert main(args(train_data, whole, tiny_bert_config, *same)) == 0
    cfg = TrainConfig(data=str(train_data), output="x", google_adam=google_adam)
    run = tmp_path / "pretraining_output"
    google_run_checkpoint(list_checkpoints(whole)[0], run / "model.ckpt-2", cfg)

    taken = tmp_path / "taken"
    argv = args(train_data, taken, tiny_bert_config, *same, "--resume-google", str(run))
    argv.remove("--no-progress")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"continuing {run / 'model.ckpt-2'} at its step 2" in err
    assert ("--google-adam updates exactly as Google's" in err) != google_adam
    assert [m["step"] for m in metrics(taken)] == [3, 4]
    want = torch.load(list_checkpoints(whole)[-1], weights_only=False)["model"]
    got = torch.load(list_checkpoints(taken)[-1], weights_only=False)["model"]
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-7, msg=name)
    fresh = tmp_path / "fresh"  # the same weights with a fresh optimizer and schedule differ
    assert main([*args(train_data, fresh, tiny_bert_config, *same[:-2]), "--num-train-steps",
                 "2", "--init-checkpoint", str(run)]) == 0  # fmt: skip
    assert "`bertforge train --resume-google` continues that run" in capsys.readouterr().err
    fresh_weights = torch.load(list_checkpoints(fresh)[-1], weights_only=False)["model"]
    assert not torch.allclose(fresh_weights["layers.0.qkv.weight"], want["layers.0.qkv.weight"])

    # The same command again: resumed from the output's own checkpoint, nothing left to do.
    assert main(argv) == 0
    assert "resuming at step 4" in capsys.readouterr().err
    # A total the run has already reached, and checkpoints that are not a run's: refused.
    short = [*argv[:-2], "--num-train-steps", "2", "--resume-google", str(run)]
    short[short.index(str(taken))] = str(tmp_path / "short")
    assert main(short) == 2
    assert "--num-train-steps 2: " in capsys.readouterr().err
    released = tmp_path / "released"
    assert main(["export", "--checkpoint", str(whole), "--output", str(released),
                 "--format", "google"]) == 0  # fmt: skip
    for source, says in ((released / "bert_model.ckpt", "has no global_step"),
                         (whole, "is not a TensorFlow checkpoint")):  # fmt: skip
        other = [*argv[:-1], str(source)]
        other[other.index(str(taken))] = str(tmp_path / "other")
        assert main(other) == 2
        assert says in capsys.readouterr().err


@pytest.mark.slow
def test_processes_that_would_start_apart_are_stopped(tmp_path, monkeypatch):
    """A machine that does not see --output's checkpoints would start at step 0 while the
    others resume; one with other data would read other batches: every process stops."""
    d = Dist(rank=1, world=2, local_rank=1, device=torch.device("cpu"))
    seen = {}
    monkeypatch.setattr(train_module.distributed, "gather_objects",
                        lambda obj, d: [seen["first"], obj])  # fmt: skip
    seen["first"] = (40, 1000, "id-a", "node-a")
    train_module.check_one_start(d, tmp_path, 40, 1000, "id-a")  # the same start: nothing said
    with pytest.raises(UserError, match=r"process 1 \(on .*\) would start at step 0, process 0 "
                       r"\(on node-a\) at step 40: .*a shared file system"):  # fmt: skip
        train_module.check_one_start(d, tmp_path, 0, 1000, "id-a")
    with pytest.raises(UserError, match=r"--data: process 1 .* reads 999 records, process 0"):
        train_module.check_one_start(d, tmp_path, 40, 999, "id-a")
    other = r"--data: process 1 \(on .*\) reads other records than process 0 \(on node-a\), as "
    with pytest.raises(UserError, match=other + r"many \(1,000\): other shards or files"):
        train_module.check_one_start(d, tmp_path, 40, 1000, "id-b")
    one = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    train_module.check_one_start(one, tmp_path, 0, 5, "id-a")  # one process: nothing to compare


def test_two_processes_match_one(tmp_path, train_data, tiny_bert_config):
    """torchrun with 2 gloo processes, padded and packed, eager and compiled (DDP around the
    compiled step, its layers one nested region), and with the flat optimizer (DDP writing
    into its gradient buffer) and q/k/v split (one parameter used in three matmuls): same
    per-step losses as 1 process, same global batch. Each layout is asked for, not left to
    the default (on a CPU padded, on a GPU packed up to seq 128), and the manifest says which
    ran: the packed variant once ran padded unnoticed after the CPU default changed."""
    one = tmp_path / "one"
    steps = ("--num-train-steps", "4", "--no-do-eval")
    main(args(train_data, one, tiny_bert_config, *steps))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flat = ("--flat-optimizer", "--micro-batch-size", "4", "--split-qkv")
    variants = (  # (name, packed, compiled, flags)
        ("two", False, False, ("--no-packed", "--no-compile")),
        ("two-packed", True, False, ("--packed", "--no-compile")),
        ("two-packed-compiled", True, True, ("--packed", "--compile")),
        ("two-flat", False, True, ("--no-packed", "--compile", *flat)),
    )
    for name, packed, compiled, extra in variants:
        two = tmp_path / name
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            "-m",
            "bertforge.cli",
            *args(train_data, two, tiny_bert_config, *steps, *extra, *FP32),
        ]
        run_group(cmd, check=True, env=env, timeout=300)
        a, b = metrics(one), metrics(two)
        assert len(a) == len(b) == 4
        for x, y in zip(a, b, strict=True):
            for k in LOSSES:
                assert x[k] == pytest.approx(y[k], abs=1e-5), (name, k)
        manifest = json.loads((two / "manifest.json").read_text())
        assert manifest["processes"] == 2
        assert (manifest["packed"], manifest["compiled"]) == (packed, compiled), name


@pytest.mark.slow
def test_two_processes_train_on_one_shared_copy_of_the_tfrecords(
    tmp_path, google_tfrecords, kjv_vocab, tiny_bert_config
):
    """torchrun with 2 gloo processes on Google's TFRecords: process 0 decodes them and both
    map its arrays (`shared_tfrecords`), which it deletes once both have them; the losses are
    one process's."""
    steps = ("--num-train-steps", "3", "--no-do-eval", "--vocab", str(kjv_vocab / "vocab.txt"))
    one = tmp_path / "one"
    assert main(args(google_tfrecords, one, tiny_bert_config, *steps)) == 0
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    argv = args(google_tfrecords, tmp_path / "two", tiny_bert_config, *steps, *FP32)
    argv.remove("--no-progress")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29527", "-m", "bertforge.cli", *argv]  # fmt: skip
    done = run_group(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (
        "train: the TFRecords were decoded once on this machine and are shared by its 2 "
        f"processes through {tmp} ("
    ) in done.stderr
    assert list(tmp.glob("bertforge*")) == []  # (torchrun leaves a folder of its own)
    for x, y in zip(metrics(one), metrics(tmp_path / "two"), strict=True):
        for k in LOSSES:
            assert x[k] == pytest.approx(y[k], abs=1e-5), (x["step"], k)


@pytest.mark.slow
def test_two_processes_agree_on_a_micro_batch_that_fits_before_the_first_step(
    tmp_path, train_data, tiny_bert_config
):
    """torchrun with 2 gloo processes, process 1 out of memory above 2 instances (simulated):
    both take micro-batch 2 before the first step (a process cannot halve mid-step while the
    other waits in DDP's all-reduce), and the losses are those of one process without the
    trial. With even one instance too many, both stop with one clear error."""
    one = tmp_path / "one"
    steps = ("--num-train-steps", "3", "--no-do-eval")
    main(args(train_data, one, tiny_bert_config, *steps))
    helper = Path(__file__).with_name("simulated_faults.py")

    def torchrun(out: Path, above: int, *extra: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SIMULATED_OOM_RANK": "1",
               "SIMULATED_OOM_ABOVE": str(above)}  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", "29518", str(helper), *args(train_data, out, tiny_bert_config,
               *steps, *extra, *FP32)]  # fmt: skip
        return run_group(cmd, env=env, timeout=300, capture_output=True, text=True)

    done = torchrun(tmp_path / "two", 2)
    assert done.returncode == 0, done.stderr
    assert (
        "micro-batch 8 does not fit in memory on process(es) 1 (out of memory in a trial step "
        "before the first); all 2 processes train with micro-batch 2 (gradient accumulation x4"
    ) in done.stderr
    assert "retrying" not in done.stderr and "rerun with" not in done.stderr
    assert [r["micro_batch_size"] for r in metrics(tmp_path / "two")] == [2, 2, 2]
    for x, y in zip(metrics(one), metrics(tmp_path / "two"), strict=True):
        for k in LOSSES:
            assert x[k] == pytest.approx(y[k], abs=1e-5), k

    failed = torchrun(tmp_path / "three", 0, "--no-packed")
    assert failed.returncode != 0
    says = "out of memory on process(es) 1 before the first step: even one instance"
    assert failed.stderr.count(says) == 2  # each process says it, neither hangs
    assert not (tmp_path / "three" / "checkpoints").exists() or not list(
        (tmp_path / "three" / "checkpoints").iterdir()
    )


@pytest.mark.slow
def test_two_processes_out_of_memory_in_an_evaluation_save_the_step_together(
    tmp_path, train_data, tiny_bert_config
):
    """torchrun with 2 gloo processes, process 1 out of memory in evaluations of more than 4
    instances (simulated). Process 0 waited in the evaluation's all-reduce and nothing was
    saved: the steps since the last checkpoint were lost. Now both hear of it there, save the
    step's checkpoint together and stop with one clear error each; the rerun with a smaller
    --eval-batch-size resumes at that step and ends as an unbroken run does."""
    helper = Path(__file__).with_name("simulated_faults.py")
    steps = ("--num-train-steps", "6", "--save-checkpoints-steps", "4", "--eval-records", "40",
             "--eval-every", "3")  # fmt: skip

    def torchrun(out: Path, eval_batch: int) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SIMULATED_OOM_RANK": "1",
               "SIMULATED_OOM_ABOVE": "4", "SIMULATED_OOM_EVAL": "1"}  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", "29525", str(helper), *args(train_data, out, tiny_bert_config,
               *steps, "--eval-batch-size", str(eval_batch), *FP32)]  # fmt: skip
        return run_group(cmd, env=env, timeout=300, capture_output=True, text=True)

    ref, out = tmp_path / "ref", tmp_path / "out"
    done = torchrun(ref, 4)
    assert done.returncode == 0, done.stderr
    failed = torchrun(out, 16)
    assert failed.returncode != 0
    says = (
        "bertforge: error: CPU out of memory on process(es) 1 in the evaluation at step 3, 16 "
        "instances per forward pass: rerun with --eval-batch-size 8 (or less); the checkpoint "
        "of step 3 is saved, and the rerun resumes there."
    )
    assert failed.stderr.count(says) == 2, failed.stderr  # each process says it, neither hangs
    assert failed.stderr.count("Traceback") == 1  # torchrun's own, as it reports the exit codes
    assert [p.name for p in list_checkpoints(out)] == ["ckpt-00000003.pt"]
    resumed = torchrun(out, 4)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))
    for x, y in zip(metrics(ref), metrics(out), strict=True):
        assert [x[k] for k in LOSSES] == [y[k] for k in LOSSES]
    assert metrics(ref, True)[-1] == metrics(out, True)[-1]


@pytest.mark.slow
def test_two_processes_out_of_memory_mid_step_save_the_step_from_the_process_that_failed(
    tmp_path, train_data, tiny_bert_config
):
    """torchrun with 2 gloo processes, process 1 out of memory in its 4th step (simulated,
    after the trial step that fitted). Process 0 waits for its gradients in DDP's all-reduce,
    so nothing could be agreed and the steps since the last checkpoint were lost. Now process
    1 saves step 3 alone (the state before a step is every process's), with half the
    micro-batch, and says so; the same command again resumes there, at micro-batch 4, and
    ends as an unbroken run does (dropout 0: the masks are the step's)."""
    helper = Path(__file__).with_name("simulated_faults.py")
    steps = ("--num-train-steps", "6", "--save-checkpoints-steps", "2", "--no-do-eval")

    def torchrun(out: Path, oom: dict[str, str]) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SIMULATED_OOM_RANK": "1", **oom}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", "29526", str(helper), *args(train_data, out, tiny_bert_config,
               *steps, *FP32)]  # fmt: skip
        return run_group(cmd, env=env, timeout=300, capture_output=True, text=True)

    ref, out = tmp_path / "ref", tmp_path / "out"
    done = torchrun(ref, {})
    assert done.returncode == 0, done.stderr
    failed = torchrun(out, {"SIMULATED_OOM_CALL": "5"})  # the trial's, then steps 1, 2, 3
    assert failed.returncode != 0
    says = (
        "bertforge: error: CPU out of memory on process 1 at step 3 with micro-batch 8: with "
        "several processes the micro-batch cannot shrink mid-step; rerun with "
        "--micro-batch-size 4 (or less: the batch stays --train-batch-size, by gradient "
        "accumulation; the checkpoint of step 3 is saved, and the rerun resumes there)."
    )
    assert failed.stderr.count(says) == 1, failed.stderr
    saved = list_checkpoints(out)
    assert [p.name for p in saved] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    state = torch.load(saved[-1], weights_only=False)
    assert state["micro_batch_size"] == 4 and len(state["rng"]) == 1  # its own: others reseed
    resumed = torchrun(out, {})  # the same command
    assert resumed.returncode == 0, resumed.stderr
    assert [(r["step"], r["micro_batch_size"]) for r in metrics(out)] == [
        (1, 8),
        (2, 8),
        (3, 8),
        (4, 4),
        (5, 4),
        (6, 4),
    ]
    for x, y in zip(metrics(ref), metrics(out), strict=True):
        for k in LOSSES:
            assert x[k] == pytest.approx(y[k], abs=1e-5), (x["step"], k)
    # Out of CPU memory (the process does not recover: nothing saved), it stops all the same.
    cpu = torchrun(tmp_path / "cpu", {"SIMULATED_OOM_CALL": "5", "SIMULATED_OOM_CPU": "1"})
    assert cpu.returncode != 0
    says = (
        "bertforge: error: CPU out of memory (DefaultCPUAllocator: can't allocate memory) on "
        "process 1 at step 3 with micro-batch 8: with several processes the micro-batch cannot "
        "shrink mid-step; rerun with --micro-batch-size 4 (or less: the batch stays "
        "--train-batch-size, by gradient accumulation; training resumes from the last "
        "checkpoint)."
    )
    assert cpu.stderr.count(says) == 1, cpu.stderr
    assert [p.name for p in list_checkpoints(tmp_path / "cpu")] == ["ckpt-00000002.pt"]


@pytest.mark.slow
def test_a_full_disk_on_process_0_stops_the_run_at_once_and_says_why_once(
    tmp_path, train_data, tiny_bert_config
):
    """torchrun with 2 gloo processes; process 0 finds the disk full halfway through step 4's
    checkpoint (simulated) while process 1 goes on into step 5's all-reduce. Shutting the
    process group down there can hang (NCCL; gloo's destructor did here), so process 0 says
    why and leaves without it, and process 1, whose collective fails, says in one line that
    another process stopped instead of a traceback through torch. The partial checkpoint is
    gone, step 2's is whole, and the same command resumes from it."""
    helper = Path(__file__).with_name("simulated_faults.py")
    steps = ("--num-train-steps", "6", "--save-checkpoints-steps", "2", "--no-do-eval")

    def torchrun(out: Path, fault: dict[str, str]) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", **fault}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", "29528", str(helper), *args(train_data, out, tiny_bert_config,
               *steps, *FP32)]  # fmt: skip
        return run_group(cmd, env=env, timeout=300, capture_output=True, text=True)

    out = tmp_path / "out"
    failed = torchrun(out, {"SIMULATED_FULL_DISK_STEP": "4"})
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("bertforge: error")]
    assert len(errors) == 2 and errors[0] == (
        f"bertforge: error: {out / 'checkpoints'}: no space left on the device while writing "
        "ckpt-00000004.pt; free some space and run the same command again (finished files "
        "are kept)."
    ), failed.stderr
    # gloo's words for it vary with the timing: closed, or reset where bytes went unread
    assert re.fullmatch(
        r"bertforge: error: process 1 stops: another process of this run stopped "
        r"\((Connection closed by peer|Connection reset by peer|Broken pipe)\); its own "
        r"error, above or in its log, says why\.",
        errors[1],
    ), failed.stderr
    assert "bertforge/" not in failed.stderr  # no traceback through bertforge (torchrun's own)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000002.pt"]
    resumed = torchrun(out, {})
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_an_error_under_torchrun_leaves_the_process_group_as_it_is(tmp_path, monkeypatch, capsys):
    """Under torchrun, `main` says the error, then ends the process with its exit status by
    os._exit, never through the process group's shutdown (`distributed.leave`); `train`
    shuts the group down after a clean run only. Alone, `main` returns the status."""
    from bertforge import distributed

    calls = []

    def failing(cfg, d):
        raise UserError("the disk is full")

    def leave(code):
        calls.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(train_module, "_train", failing)
    monkeypatch.setattr(distributed, "shutdown", lambda d: calls.append("shutdown"))
    argv = ["train", "--data", "d", "--output", str(tmp_path / "o"), "--device", "cpu"]
    assert main(argv) == 2 and calls == []  # one process: no group, the status returned
    assert capsys.readouterr().err == "bertforge: error: the disk is full\n"
    monkeypatch.setattr(distributed, "grouped", lambda: True)
    monkeypatch.setattr(distributed.os, "_exit", leave)
    with pytest.raises(SystemExit):
        main(argv)
    assert calls == [2]  # left at once: no shutdown
    assert capsys.readouterr().err == "bertforge: error: the disk is full\n"
    # A collective that fails because another process left: one line, not torch's traceback.
    peer = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [::1]:5")

    def lost(cfg, d):
        monkeypatch.setenv("RANK", "3")  # torchrun's (set earlier, setup would take it)
        raise peer

    monkeypatch.setattr(train_module, "_train", lost)
    with pytest.raises(SystemExit):
        main(argv)
    assert calls == [2, 1] and capsys.readouterr().err == (
        "bertforge: error: process 3 stops: another process of this run stopped (Connection "
        "closed by peer); its own error, above or in its log, says why.\n"
    )

    # Any other error: Python's traceback, printed before leaving.
    def bug(cfg, d):
        return 1 / 0

    monkeypatch.setattr(train_module, "_train", bug)
    monkeypatch.delenv("RANK")
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert calls == [2, 1, 1] and "Traceback" in err and "ZeroDivisionError" in err
    monkeypatch.setattr(distributed, "grouped", lambda: False)
    with pytest.raises(ZeroDivisionError):  # alone, Python prints it as always
        main(argv)


def test_config_errors():
    with pytest.raises(UserError, match="--train-batch-size"):
        TrainConfig(data="d", output="o", train_batch_size=0)
    with pytest.raises(UserError, match="--init-checkpoint"):
        TrainConfig(data="d", output="o", do_train=False)


def test_a_fresh_start_never_deletes_its_own_init_checkpoint(
    tmp_path, train_data, tiny_bert_config, trained_run, capsys
):
    own = tmp_path / "own"
    shutil.copytree(trained_run, own)
    before = sorted(p.name for p in (own / "checkpoints").iterdir())
    extra = ("--init-checkpoint", str(own), "--overwrite", "--num-train-steps", "1")
    assert main(args(train_data, own, tiny_bert_config, *extra)) == 2
    err = capsys.readouterr().err
    assert f"--init-checkpoint {own / 'checkpoints'}" in err and "(e.g. own-2 beside it)" in err
    assert sorted(p.name for p in (own / "checkpoints").iterdir()) == before


def test_data_smaller_than_a_batch_is_warned_about(tmp_path, train_data, tiny_bert_config, capsys):
    total = len(PretrainingData(str(train_data)))
    steps = ("--num-train-steps", "1", "--no-do-eval")
    assert main(args(train_data, tmp_path / "a", tiny_bert_config, *steps)) == 0
    assert "warning" not in capsys.readouterr().err
    few = ("--eval-records", str(total - 5), "--max-eval-steps", "1")
    assert main(args(train_data, tmp_path / "b", tiny_bert_config, *steps[:2], *few)) == 0
    err = capsys.readouterr().err
    assert "has 5 training instances, fewer than one batch (--train-batch-size 16)" in err


def test_a_held_out_set_of_most_of_the_data_is_warned_about(
    tmp_path, train_data, tiny_bert_config, capsys
):
    """A fixed --eval-records (configs/demo.toml's 500) on a small corpus: over a tenth of the
    records held out is said, with how many training sees; a tenth is not."""
    total = len(PretrainingData(str(train_data)))
    steps = ("--num-train-steps", "1", "--max-eval-steps", "1")
    tenth = ("--eval-records", str(total // 10))
    assert main(args(train_data, tmp_path / "a", tiny_bert_config, *steps, *tenth)) == 0
    assert "warning" not in capsys.readouterr().err
    most = ("--eval-records", str(total - 20))
    assert main(args(train_data, tmp_path / "b", tiny_bert_config, *steps, *most)) == 0
    err = capsys.readouterr().err
    share = round(100 * (total - 20) / total)
    assert (f"bertforge: warning: --eval-records {total - 20:,} holds out {share}% of the "
            f"{total:,} records of {train_data}, so training sees 20; lower it") in err  # fmt: skip


def test_train_result(tmp_path, train_data, tiny_bert_config):
    cfg = TrainConfig(
        data=str(train_data),
        output=str(tmp_path / "r"),
        bert_config=str(tiny_bert_config),
        train_batch_size=8,
        num_train_steps=2,
        eval_records=8,
        progress=False,
    )
    result = train(cfg)
    assert result.step == 2 and not result.interrupted
    assert result.eval is not None
    assert set(result.eval) == {*train_module.EVAL_KEYS, "masked_lm_unigram_baseline"}
    assert 0 < result.eval["masked_lm_unigram_baseline"] < 1


def test_metrics_are_mirrored_to_tensorboard(trained_run):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    acc = event_accumulator.EventAccumulator(str(trained_run / "tensorboard"))
    acc.Reload()
    jsonl = metrics(trained_run)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in jsonl]
    assert loss[-1].value == pytest.approx(jsonl[-1]["loss"], rel=1e-6)
    (final,) = metrics(trained_run, evals=True)
    assert acc.Scalars("eval/masked_lm_accuracy")[-1].value == pytest.approx(
        final["masked_lm_accuracy"], rel=1e-6
    )


def test_dropout_override(tmp_path, train_data):
    out = tmp_path / "r"
    cfg = TrainConfig(
        data=str(train_data),
        output=str(out),
        model_size="tiny",
        dropout=0.0,
        train_batch_size=4,
        num_train_steps=2,
        eval_records=8,
        progress=False,
    )
    train(cfg)
    bert = json.loads((out / "manifest.json").read_text())["bert_config"]
    assert bert["hidden_dropout_prob"] == 0.0 and bert["attention_probs_dropout_prob"] == 0.0
    assert json.loads((out / "bert_config.json").read_text())["hidden_dropout_prob"] == 0.0
    with pytest.raises(UserError, match="--dropout"):
        TrainConfig(data="d", output="o", dropout=1.5)


def test_mfu_is_logged_on_a_gpu_of_known_peak(tmp_path, monkeypatch, capsys):
    """On a GPU whose peak is known, each log line and metrics.jsonl record gives the model
    FLOPs utilization; the peak is the data sheet's dense half-precision figure of the GPU
    torch names, times the processes; none on a CPU, in fp32, or on an unknown GPU."""
    cuda = torch.device("cuda", 0)
    peaks = {
        "NVIDIA H100 80GB HBM3": 989e12,  # SXM
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H200": 989e12,
        "NVIDIA A100-SXM4-40GB": 312e12,
        "NVIDIA L40S": 362e12,
        "NVIDIA L4": 121e12,
        "Tesla V100-SXM2-16GB": None,
    }
    for name, peak in peaks.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert train_module.peak_flops(cuda, torch.bfloat16) == peak, name
        assert train_module.peak_flops(cuda, torch.float16) == peak, name
        assert train_module.peak_flops(cuda, torch.float32) is None
    assert train_module.peak_flops(torch.device("cpu"), torch.bfloat16) is None

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    base = BertConfig.preset("base", 30522)
    # 6 x 85,054,464 non-embedding parameters + 12 x 12 x 768 x 128 + 6 x (768^2 + 768 x
    # 30,522) x 0.15 masked per token
    assert base.training_flops_per_token(128, 0.15) == pytest.approx(546_110_208)
    meter = train_module.FlopsMeter.of(base, 128, Dist(0, 2, 0, cuda), torch.bfloat16)
    assert meter is not None and meter.peak == 2 * 756e12
    assert train_module.FlopsMeter.of(base, 128, Dist(0, 1, 0, cuda), torch.float32) is None

    log = train_module.Window(0.0, meter)
    sums = dict.fromkeys(train_module.SUMS, 0.0) | {"masked": 300.0, "instances": 16.0}
    log.add(sums | {"tokens": 1000.0}, 1.0)
    log.add(sums | {"tokens": 1000.0}, 1.0)
    cfg = TrainConfig(data="d", output="o", num_train_steps=10)
    log.write(tmp_path, 2, 1e-4, 8, 0, cfg, 0.5)  # 2,000 tokens, 600 masked, in 0.5 s
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    want = 4000 * base.training_flops_per_token(128, 0.3) / (2 * 756e12)
    assert record["tokens_per_second"] == 4000
    assert record["mfu"] == pytest.approx(want)
    assert f"4,000 tok/s | MFU {want:.1%} | ETA" in capsys.readouterr().err

    log = train_module.Window(0.0)  # CPU, fp32, unknown GPUs: no MFU
    log.add(sums | {"tokens": 1000.0}, 1.0)
    log.write(tmp_path, 3, 1e-4, 8, 0, cfg, 0.5)
    assert "mfu" not in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert "MFU" not in capsys.readouterr().err


def test_peak_tflops_gives_mfu_where_the_table_does_not(tmp_path, train_data, tiny_bert_config):
    """--peak-tflops: MFU on any device (here a CPU in fp32), and over the table on a known GPU."""
    base = BertConfig.preset("base", 30522)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    meter = train_module.FlopsMeter.of(base, 128, Dist(0, 1, 0, cpu), torch.float32, 2.5)
    assert meter is not None and meter.peak == 2.5e12
    meter = train_module.FlopsMeter.of(base, 128, Dist(0, 4, 0, cuda), torch.bfloat16, 100.0)
    assert meter is not None and meter.peak == 4 * 100e12  # no device name read

    out = tmp_path / "run"
    args = ["train", "--data", str(train_data), "--output", str(out), "--bert-config",
            str(tiny_bert_config), "--train-batch-size", "8", "--num-train-steps", "4",
            "--log-every", "2", "--eval-records", "0", "--peak-tflops", "0.5"]  # fmt: skip
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    bert = BertConfig.from_json(tiny_bert_config)
    low, high = bert.training_flops_per_token(64, 0.0), bert.training_flops_per_token(64, 1.0)
    assert [r["step"] for r in records] == [2, 4]  # --eval-records 0: no eval lines
    for r in records:  # the FLOPs per token implied, with some share of the tokens masked
        assert low < r["mfu"] * 0.5e12 / r["tokens_per_second"] < high, r
    with pytest.raises(UserError, match="--peak-tflops"):
        TrainConfig(data="d", output="o", peak_tflops=0)


def test_no_held_out_set_means_no_evaluation(tmp_path, train_data, tiny_bert_config):
    """--eval-records 0 trains on everything and evaluates nothing (it used to log an
    evaluation of zero instances as loss 0, accuracy 0)."""
    out = tmp_path / "run"
    result = train_module.train(TrainConfig(
        data=str(train_data), output=str(out), bert_config=str(tiny_bert_config),
        train_batch_size=8, num_train_steps=2, eval_records=0, progress=False))  # fmt: skip
    assert result.eval is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["eval"] is None
    assert metrics(out, evals=True) == []
    with pytest.raises(UserError, match=r"--eval-records.*nothing to evaluate"):
        TrainConfig(data="d", output="o", do_train=False, eval_records=0, init_checkpoint="c")


def test_inductors_online_softmax_note_is_hidden():
    """Compiling on a GPU, inductor warns that a split reduction runs without online softmax
    (seen on an H200, once per compiled graph): not something a user can act on."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_module.quiet_inductor_notes()
        warnings.warn(
            "\nOnline softmax is disabled on the fly since Inductor decides to\nsplit the "
            "reduction. Cut an issue to PyTorch if this is an\nimportant use case.",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn("any other warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["any other warning"]
