"""`bertforge train`: BERT pretraining, from one CPU to many GPUs, resumable at every step.

Read `train` top to bottom: resolve the data, vocabulary and model (and check that they
agree), restore a checkpoint if the output has one, then the step loop. A step takes the
global batch of that step (a pure function of seed and step, see batches.py), gives this
process its share, runs it in micro-batches (halving them on CUDA out-of-memory; with
several processes a trial step before the first finds the size that fits in every one),
checks the loss is finite, clips, steps the optimizer, and logs, evaluates and saves on
schedule.

The objective of a step is Google's: masked-LM loss averaged over the masked tokens of the
whole global batch plus next-sentence loss averaged over its instances. Each micro-batch
contributes its sums divided by the global counts, so micro-batching and the number of
processes do not change the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch._dynamo.exc import TorchDynamoException
from torch.nn.parallel import DistributedDataParallel

from bertforge import distributed, kernels, ops
from bertforge.batches import (
    IGNORE,
    Order,
    PretrainingData,
    Rows,
    ScanPart,
    Split,
    eval_rows,
    prefetcher,
    scan_threads,
    slice_rows,
    step_rows,
    tfrecord_peak,
    to_tensors,
    vocab_dir,
)
from bertforge.checkpoint import (
    CHECKPOINTS,
    InitWeights,
    checkpoint_bytes,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    read_google_run,
    read_init_checkpoint,
    save_checkpoint,
    saves_left,
    seed_new_words,
    transfer_vocab,
)
from bertforge.config import TrainConfig, changed_settings, config_to_dict, describe_changes
from bertforge.data import mask_spec as data_mask_spec
from bertforge.datacheck import check_recorded_vocab, data_files, folder_manifest
from bertforge.distributed import Dist
from bertforge.errors import UserError
from bertforge.fileio import (
    RUN_FILE,
    output_lock,
    prepare_output_dir,
    read_jsonl,
    size_text,
    write_json,
    write_manifest,
    write_text,
)
from bertforge.hardware import autocast_to, precision_name, resolve_precision
from bertforge.instances import InstanceParams, VocabIds
from bertforge.masking import MaskSpec
from bertforge.model import (
    LAYER_OPTIONS,
    MLM_HEAD,
    BertConfig,
    BertForPretraining,
    Packed,
    flash_varlen_available,
    flash_varlen_fits,
    load_weights,
    missing_heads,
)
from bertforge.optim import (
    FlatAdamW,
    GoogleAdamW,
    Lamb,
    learning_rate,
    param_groups,
    set_moments,
)
from bertforge.shards import is_shard
from bertforge.tokenization import (
    Vocab,
    check_init_vocab,
    copy_vocab,
    entry,
    load_vocab,
    normalization,
    other_normalization,
    read_vocab_file,
    recorded_casing,
    token_casing,
)
from bertforge.tune import use_tune
from bertforge.workers import available_memory

ANNOUNCED_CHECK_BYTES = 1 << 30  # a start-up check of more data is announced first
DATA_SCAN_FILE = "data_check.json"  # the start-up pass over the data, kept for a resumed run
# Paths that may change when a run is resumed: what they name is compared instead (the model's
# shape; the data, by `PretrainingData.identity`, in `check_same_run`).
WHERE = {"output", "bert_config", "data"}
# Settings that may change when a run is resumed; any other change is refused.
RESUMABLE = {
    "num_train_steps",
    "save_checkpoints_steps",
    "keep_checkpoints",
    "do_eval",
    "eval_every",
    "eval_batch_size",
    "max_eval_steps",
    "log_every",
    "progress",
    "resume",
    "resume_google",  # read at the start only: a rerun resumes from the output's checkpoints
    "overwrite",
    "micro_batch_size",
    "compile",
    "device",
    "max_bad_steps",
    "packed",
    "fused_norm",  # the same model and weights, other dropout draws
    "fused_gelu",
    "fused_ffn",
    "split_qkv",  # the same weights and numbers
    "fused_attention",  # the same model and weights, other dropout draws
    "prune_last_layer",  # the same logits
    "flat_optimizer",  # the same updates, and AdamW's state dict either way
    "cuda_graphs",  # the same step, replayed
    "loader",  # the same batches
    "tune",  # chooses among the options above
    "peak_tflops",
}
EVAL_KEYS = (
    "global_step",
    "loss",
    "masked_lm_accuracy",
    "masked_lm_loss",
    "next_sentence_accuracy",
    "next_sentence_loss",
)
# Per-step sums, reduced over micro-batches and ranks in one collective.
SUMS = (
    "masked_lm_loss",
    "next_sentence_loss",
    "masked_lm_correct",
    "next_sentence_correct",
    "masked",
    "instances",
    "tokens",
    "stop",
)


@dataclass
class TrainResult:
    output: Path
    step: int
    eval: dict[str, float] | None
    stop_signal: int | None  # None: ran to its end; else what stopped it (another rank's: SIGINT)

    @property
    def interrupted(self) -> bool:
        return self.stop_signal is not None


def train(cfg: TrainConfig) -> TrainResult:
    """The train stage. Under torchrun, an error leaves the process group as it is (the others
    may be waiting for this process in a collective, where its shutdown can hang): the CLI
    says the error and ends the process with `distributed.leave`, as a caller should."""
    d = distributed.setup(cfg.device)
    with claim_output(cfg, d):
        result = _train(cfg, d)
    distributed.shutdown(d)  # on success only: an error leaves the group as it is (`leave`)
    return result


@contextlib.contextmanager
def claim_output(cfg: TrainConfig, d: Dist) -> Iterator[None]:
    """Process 0, the one that writes, holds the output directory's lock (`output_lock`) for
    the run; every process learns whether it got it, so all stop together if not."""
    with contextlib.ExitStack() as stack:
        refusal = ""
        if d.main:
            try:
                stack.enter_context(output_lock(cfg.output, "train", "--output"))
            except UserError as e:
                refusal = str(e)
        refusal = distributed.broadcast_word(refusal if d.main else None, d, None)
        if refusal:
            raise UserError(refusal)
        yield


def _train(cfg: TrainConfig, d: Dist) -> TrainResult:
    # ---- what we train on, with what, into what; all checked against each other
    here = distributed.local_processes()  # this machine's: they share TFRecords
    if d.main and (line := tfrecord_memory_warning(cfg.data, here, available_memory())):
        print(line, file=sys.stderr)
    data = PretrainingData(cfg.data, (d.local_rank, here) if d.world > 1 else None)
    if d.main and data.native is not None and (note := data.native.limit_note()):
        print(note, file=sys.stderr)
    if data.tf_shared and ("warning" in data.tf_shared or (d.main and cfg.progress)):
        print(data.tf_shared, file=sys.stderr)  # each machine's process 0 may warn
    info = data.info
    check_data_flags(cfg, data)
    reused = data.reuse_scan(Path(cfg.output) / DATA_SCAN_FILE)  # a resumed run's, if true
    if d.main and cfg.progress and not reused and (line := check_announcement(cfg, data)):
        print(line, file=sys.stderr)
    share_data_check(data, d, reused)
    init = None
    if cfg.init_checkpoint:
        init = read_init_checkpoint(cfg.init_checkpoint, bert_config=cfg.bert_config)
        if d.main:
            note_google_run(init)
    elif cfg.resume_google:
        init = read_init_checkpoint(cfg.resume_google, "--resume-google", cfg.bert_config)
        if init.kind != "google":
            raise UserError(
                f"--resume-google: {init.path} is not a TensorFlow checkpoint of Google's "
                "run_pretraining.py; resume a bertforge run with --resume, or start from "
                "weights with --init-checkpoint."
            )
    vocab = resolve_vocab(cfg, data, init)
    check_records(cfg, data)  # after the ids' check: ids beyond the vocabulary say so first
    if d.main and not cfg.transfer_vocab and (line := casing_warning(vocab, init)):
        print(line, file=sys.stderr)
    elif d.main and cfg.vocab and vocab.casing_doubt:  # a bare vocab.txt for TFRecords
        print(vocab.casing_doubt, file=sys.stderr)  # (the data's own: the data stage said it)
    if init is not None and init.vocab_file is None and d.main:
        print(
            f"bertforge: warning: no vocab.txt or tokenizer.json beside {init.path}, so "
            f"nothing checks that the data's vocabulary {vocab.path} is the one the checkpoint "
            "was trained with (another one would train on the wrong embeddings, with no "
            "error); copy the checkpoint's vocab.txt beside it to have it checked.",
            file=sys.stderr,
        )
    bert = model_config(cfg, vocab, init, info.max_seq_length)
    if cfg.dropout is not None:
        bert = dataclasses.replace(
            bert, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout
        )
    spec = None if info.static_masking else mask_spec(data, vocab)
    eval_n = eval_size(cfg, len(data)) if cfg.do_eval else 0
    evaluating = eval_n > 0  # --eval-records 0: no held-out set, so no evaluation
    split = Split.of(len(data), eval_n)
    if cfg.do_train and split.num_train < 1:
        raise UserError(
            f"--data {cfg.data} holds {len(data)} record(s), and the held-out set "
            f"(--eval-records {eval_n}) takes them all, leaving none to train on; give more "
            "text, or --no-do-eval to train on every record."
        )
    if cfg.do_train and eval_n > len(data) // 10 and d.main:  # a small corpus, a fixed count
        print(
            f"bertforge: warning: --eval-records {eval_n:,} holds out "
            f"{100 * eval_n / len(data):.0f}% of the {len(data):,} records of {cfg.data}, so "
            f"training sees {split.num_train:,}; lower it to train on more (left out, the "
            "held-out set is 1% of the records).",
            file=sys.stderr,
        )
    if cfg.do_train and split.num_train < cfg.train_batch_size and d.main:
        print(
            f"bertforge: warning: {cfg.data} has {split.num_train:,} training instances, fewer "
            f"than one batch (--train-batch-size {cfg.train_batch_size}): every step repeats "
            "them. Is this the data you meant?",
            file=sys.stderr,
        )
    precision = resolve_precision(cfg.precision, d.device)
    varlen = flash_varlen_available(d.device) and flash_varlen_fits(
        precision, bert.hidden_size // bert.num_attention_heads
    )
    packed = use_packed(cfg, d.device, info.max_seq_length, varlen)
    check_options(cfg, bert, d.device, info.max_seq_length, packed)
    if cfg.train_batch_size % d.world:
        raise UserError(
            f"--train-batch-size {cfg.train_batch_size} must be a multiple of the "
            f"number of processes ({d.world})."
        )
    local_batch = cfg.train_batch_size // d.world

    out = Path(cfg.output)
    data_id = data.identity()
    state = None
    resume = Path(cfg.resume) if cfg.resume else None
    if resume is None and not cfg.overwrite and list_checkpoints(out):
        resume = list_checkpoints(out)[-1]
    if resume is not None:
        state = load_checkpoint(resume)
        check_same_run(state, cfg, bert, resume, data_id, d.main)
        note_new_schedule(state, cfg, d.main)
    first = state["step"] if state else 0  # the step this run starts from
    check_one_start(d, out, first, len(data), data_id)
    if d.main and cfg.do_train and cfg.warmup_steps >= cfg.num_train_steps > 0:
        print(warmup_warning(cfg), file=sys.stderr)
    if d.main and cfg.do_train and state is None and (line := epochs_warning(cfg, split)):
        print(line, file=sys.stderr)
    if (
        state is None
        and init is not None
        and init.path.resolve().is_relative_to((out / CHECKPOINTS).resolve())
    ):
        raise UserError(
            f"--init-checkpoint {init.path} is in --output {out}, whose checkpoints a fresh "
            "start deletes: the weights would be gone with the first crash. Train into "
            f"another --output (e.g. {out.name}-2 beside it)."
        )
    if d.main:
        prepare_output_dir(out, "train", cfg.overwrite and state is None, "--output")
        if state is None:
            clear_run(out)
        if cfg.do_train and (line := check_disk_space(cfg, bert, out, first)):
            print(line, file=sys.stderr)
        write_json(out / RUN_FILE, {"stage": "train", "config": run_settings(cfg)})
        data.save_scan(out / DATA_SCAN_FILE)
        write_json(out / "bert_config.json", bert.to_dict())
        copy_vocab(vocab, out)
        truncate_metrics(out / "metrics.jsonl", state["step"] if state else 0)
    distributed.barrier(d)
    for line in distributed.gpu_neighbours(d):
        print(
            f"bertforge: warning: another process holds memory on this GPU: {line} (a "
            "suspended job? it can make training run out of memory)",
            file=sys.stderr,
        )

    # the micro-batch: asked for, else a resumed run's (halved after out-of-memory), else all
    micro = min(cfg.micro_batch_size or (state["micro_batch_size"] if state else local_batch),
                local_batch)  # fmt: skip

    # ---- the speed options, measured on this device (--tune)
    if cfg.do_train and first < cfg.num_train_steps and use_tune(cfg, d.device):
        batches = (data, split, spec, local_batch, micro, first)
        cfg, micro = tuned(cfg, bert, d, batches, varlen, out)
        packed = use_packed(cfg, d.device, info.max_seq_length, varlen)
        check_options(cfg, bert, d.device, info.max_seq_length, packed)

    # ---- model, optimizer, state
    torch.manual_seed(cfg.random_seed)  # the same initial weights on every rank
    model = build_model(cfg, bert, d.device)
    # How the checkpoint's embeddings became this vocabulary's (kept in checkpoints, reported).
    embeddings: dict[str, int] | None = state.get("embeddings") if state else None
    if init is not None and state is None:
        if cfg.transfer_vocab:
            weights, embeddings = start_transferred(init, vocab, bert, notes=d.main)
        else:
            weights, embeddings = start_new_words(init, vocab, notes=d.main)
        load_weights(model, {k: v.to(d.device) for k, v in weights.items()}, str(init.path))
        if d.main and (fresh := missing_heads(weights)):
            bare = " (a bare encoder, as transformers' BertModel saves one)"
            print(
                f"bertforge: note: {init.path} has no weights for {' or '.join(fresh)}"
                f"{bare if MLM_HEAD in fresh else ''}: they start from fresh "
                "weights, which the first steps train (the loss starts high).",
                file=sys.stderr,
            )
    if state is not None:
        model.load_state_dict(state["model"])
    optimizer = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(d.device.type, enabled=precision == torch.float16)
    step = 0
    skipped = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        skipped = state["skipped_steps"]
        restore_rng(state["rng"], d, cfg.random_seed, step)
    else:
        torch.manual_seed(cfg.random_seed + 1_000_003 * d.rank)  # dropout differs per rank
        if cfg.resume_google:
            assert init is not None
            step = take_over_google_run(cfg, init.path, bert, model, optimizer, d.main)
    objective = Objective(model)
    ddp = (
        DistributedDataParallel(
            objective, device_ids=[d.device.index] if d.device.type == "cuda" else None
        )
        if d.world > 1
        else None
    )
    eager = ddp or objective
    graphs = cfg.cuda_graphs  # never dropped: a failed compile under it stops the run
    compiled = use_compile(cfg, d.device, cfg.num_train_steps - step)
    mode = "reduce-overhead" if graphs else None
    forward = compile_step(eager, mode=mode) if compiled else eager
    autocast = autocast_to(precision, d.device)

    def evaluate_now() -> dict[str, float]:
        """The held-out metrics now. Out of memory (a large --eval-batch-size) on any process,
        every process saves this step's checkpoint together and stops, saying what to rerun
        with, so that the rerun resumes there."""
        batch = cfg.eval_batch_size or micro
        try:
            result = evaluate(model, data, split, spec, cfg, d, batch, autocast, packed, step)
        except EvalOutOfMemory as e:
            error, short = e.error, e.processes  # the exception goes, with the failed frames
        else:
            if d.main:
                report_eval(out, result, cfg.progress)
            return result
        if d.device.type == "cuda":
            torch.cuda.empty_cache()
        saved = checkpoint_path(out, step).is_file()
        if not saved and cfg.do_train:
            checkpoint()
            saved = True
        resumes = (
            f"the checkpoint of step {step} is saved, and the rerun resumes there"
            if saved
            else None  # an evaluation alone (--no-do-train): nothing to resume
        )
        raise UserError(eval_out_of_memory_stop(d, step, batch, resumes, error, short))

    def checkpoint() -> Path | None:
        rng = distributed.gather_objects(rng_state(), d)
        if not d.main:
            return None
        return save_checkpoint(out, step, run_state(rng, micro, skipped), cfg.keep_checkpoints)

    def run_state(rng: list[dict[str, Any]], micro_batch: int, skips: int) -> dict[str, Any]:
        """What a checkpoint holds: the step's state, with every process's random state."""
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,
            "micro_batch_size": micro_batch,
            "skipped_steps": skips,
            "config": run_settings(cfg),
            "bert_config": bert.to_dict(),
            "data": {
                "source": info.source,
                "records": len(data),
                "eval_records": eval_n,
                "identity": data_id,
            },
            "embeddings": embeddings,
            "trained_length": trained_length(init, info.max_seq_length),
        }

    def save_alone(skips: int) -> str | None:
        """Out of GPU memory mid-step on this process, one of several: the others wait for its
        gradients inside DDP's all-reduce, where nothing more can be agreed, and torchrun stops
        them once this one stops. The state before the step is every process's alike (DDP
        keeps the replicas equal, and the optimizer has not stepped), so this process saves it
        alone: with its own random state only (the resumed run reseeds every process's, as
        after a change in the number of processes) and half the micro-batch, which a rerun
        takes unless --micro-batch-size says otherwise. Several processes out of memory at
        once each write the same step (atomically). Where the rerun resumes, in words; None
        before the first step (nothing to save)."""
        if step == 0:
            return None
        if not checkpoint_path(out, step).is_file():
            own = run_state([rng_state()], max(1, micro // 2), skips)
            save_checkpoint(out, step, own, cfg.keep_checkpoints)
        return f"the checkpoint of step {step} is saved, and the rerun resumes there"

    if d.main and cfg.progress:
        what = f"resuming at step {step} from {resume}" if state else "starting"
        if state is None and cfg.resume_google:
            what = f"continuing {init.path} at its step {step}"  # type: ignore[union-attr]
        epochs = passes(cfg, split)
        shown = f"{epochs:,.0f}" if epochs >= 10 else f"{epochs:.2f}"
        plan = f", {cfg.num_train_steps:,} steps: {shown} epochs" if cfg.do_train else ""
        print(
            f"train: {what}: {bert.num_hidden_layers} layers, hidden {bert.hidden_size}, vocab "
            f"{bert.vocab_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
            f"parameters; {split.num_train:,} training / {eval_n:,} held-out instances of "
            f"{info.max_seq_length} tokens{plan}; batch {cfg.train_batch_size} ({d.world} "
            f"process(es) x micro-batch {micro}); {precision_name(precision)} on "
            f"{d.device.type}{', packed batches' if packed else ''}"
            f"{', compiled (the first step waits for it)' if compiled else ''}"
            f"{', CUDA graphs' if graphs else ''}{speed_flags(cfg)}",
            file=sys.stderr,
        )

    if d.world > 1 and cfg.do_train and step < cfg.num_train_steps:

        def trial(n: int) -> None:
            rows = trial_rows(n, info.max_seq_length, info.max_predictions_per_seq)
            step_args = (autocast, scaler, packed, compiled, graphs)
            trial_step(forward, ddp, model, optimizer, rows, d, step_args)

        try:
            micro = fit_micro_batch(micro, d, trial)
        except TorchDynamoException as e:  # as in the loop: an automatic compile goes eager
            print(compile_failure(e, cfg, d, step), file=sys.stderr)
            forward, compiled = eager, False
            micro = fit_micro_batch(micro, d, trial)

    # ---- the loop
    last_eval: dict[str, float] | None = None
    stop_signal: int | None = None
    if cfg.do_train and step < cfg.num_train_steps:
        stop = StopRequest()
        order = Order(split.num_train, cfg.random_seed)
        share = (d.rank * local_batch, (d.rank + 1) * local_batch)  # of each step's batch
        prefetch = prefetcher(
            lambda s: step_rows(data, order, spec, cfg.random_seed, s, cfg.train_batch_size, share),
            step,
            cfg.num_train_steps,
            process=cfg.loader == "process",
        )
        log = Window(
            time.perf_counter(),
            FlopsMeter.of(bert, info.max_seq_length, d, precision, cfg.peak_tflops),
        )
        ledger = Ledger(device_skip(optimizer, scaler), skipped)
        try:
            for step_now, rows in prefetch:
                assert step_now == step, (step_now, step)
                lr = learning_rate(step, cfg.learning_rate, cfg.warmup_steps, cfg.num_train_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                totals = (step_masked(rows, d), cfg.train_batch_size)
                while True:
                    failed = None
                    try:
                        sums = forward_backward(
                            forward,
                            ddp,
                            rows,
                            micro,
                            totals,
                            d,
                            autocast,
                            scaler,
                            packed,
                            compiled,
                            graphs,
                        )
                        break
                    except TorchDynamoException as e:
                        failed = compile_failure(e, cfg, d, step)
                    except RuntimeError as e:
                        retry_or_raise(e, d, step, micro)
                        # leave the except block first, so the failed step's tensors go
                    if failed is None:  # out of GPU memory
                        if d.world > 1:  # the others wait in DDP's all-reduce: save, stop
                            optimizer.zero_grad(set_to_none=True)
                            resumes = save_alone(ledger.skipped_so_far())
                            raise UserError(out_of_memory_stop(d, step, micro, resumes=resumes))
                        micro = halve_micro_batch(micro, d, optimizer, step)
                        continue
                    # The automatic compile failed (no compiler, an old GPU, a torch bug):
                    # drop the step's partial gradients and redo it uncompiled.
                    optimizer.zero_grad(set_to_none=True)
                    forward, compiled = eager, False
                    print(failed, file=sys.stderr)
                sums[SUMS.index("stop")] = float(stop.requested)
                distributed.all_reduce_sum(sums, d)
                bad, norm = update(model, optimizer, scaler, sums, cfg.max_grad_norm, ledger)
                ledger.add(step, sums, bad, norm)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                last = step == cfg.num_train_steps
                log_due = step % cfg.log_every == 0 or last
                eval_due = evaluating and (
                    step % (cfg.eval_every or cfg.save_checkpoints_steps) == 0 or last
                )
                save_due = step % cfg.save_checkpoints_steps == 0 or last
                # Every rank reads at the same steps (a local Ctrl-C only counts alone).
                local_stop = d.world == 1 and stop.requested
                if not ledger.due(step, log_due or eval_due or save_due or local_stop):
                    continue
                stopping = ledger.read(log, cfg, out)
                skipped = ledger.skipped
                if d.main and (log_due or stopping):
                    log.write(out, step, lr, micro, skipped, cfg, time.perf_counter())
                if eval_due:
                    last_eval = evaluate_now()
                if save_due or stopping:
                    checkpoint()
                if stopping:
                    stop_signal = stop.signum or int(signal.SIGINT)
                    if d.main:
                        print(
                            f"train: stopped at step {step}; checkpoint saved. Run the same "
                            "command to resume.",
                            file=sys.stderr,
                        )
                    break
        finally:
            prefetch.close()
            stop.restore()
    elif evaluating:
        last_eval = evaluate_now()

    if d.main and stop_signal is None:
        finish(
            out,
            cfg,
            bert,
            info,
            step,
            skipped,
            last_eval,
            precision,
            compiled,
            packed,
            d,
            embeddings,
        )
    return TrainResult(out, step, last_eval, stop_signal)


# ----------------------------------------------------------------------------- step


def pretraining_sums(
    mlm_logits: torch.Tensor,
    labels: torch.Tensor,
    nsp_logits: torch.Tensor,
    nsp_labels: torch.Tensor,
    vocab: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed MLM and NSP cross-entropies (fp32) and the detached correct counts.

    mlm_logits: (B x P, V) with V >= vocab, the columns from vocab on padding
    (`BertForPretraining.pretraining_logits`); labels (B, P)."""
    labels = labels.flatten()
    if ops.eager_on_cpu(mlm_logits):
        mlm, mlm_correct = ops.masked_lm_loss(mlm_logits, labels, vocab, IGNORE)
    else:
        mlm_logits = mlm_logits[:, :vocab]
        mlm = F.cross_entropy(mlm_logits.float(), labels, ignore_index=IGNORE, reduction="sum")
        with torch.no_grad():
            # max(-1).indices is argmax (the first maximum), 2.2x faster on a CPU
            mlm_correct = ((mlm_logits.max(-1).indices == labels) & (labels != IGNORE)).sum()
    nsp = F.cross_entropy(nsp_logits.float(), nsp_labels, reduction="sum")
    with torch.no_grad():
        nsp_correct = (nsp_logits.argmax(-1) == nsp_labels).sum()
    return mlm, nsp, torch.stack([mlm_correct, nsp_correct]).float()


class Objective(torch.nn.Module):
    """The model and its pretraining sums in one module: DDP wraps it, and torch.compile sees
    the step's whole forward (the MLM cross-entropy over the vocabulary fuses with the logits'
    slice and cast instead of running as separate passes over a large tensor)."""

    def __init__(self, model: BertForPretraining) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        lengths: torch.Tensor | None,
        positions: torch.Tensor,
        labels: torch.Tensor,
        next_sentence: torch.Tensor,
        packed: Packed | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mlm_logits, nsp_logits = self.model.pretraining_logits(
            input_ids, token_type_ids, lengths, positions, packed
        )
        vocab = self.model.config.vocab_size
        return pretraining_sums(mlm_logits, labels, nsp_logits, next_sentence, vocab)


def model_batch(
    rows: Rows, device: torch.device, packed: bool, trim: bool = True, bucket: int = 0
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, Packed | None]:
    """The rows as tensors (`to_tensors`) and the (lengths, Packed) to give the model:
    lengths None when a padded batch has no padding, decided here on the host so the model
    never reads device values. Under torch.compile a packed batch's token count is marked
    dynamic: one graph serves every step (with `bucket`, filler rounds the count up, so that
    CUDA graphs see a few sizes only)."""
    b = to_tensors(rows, device, trim=trim, packed=packed, bucket=bucket if packed else 0)
    if packed:
        for name in ("input_ids", "token_type_ids", "position_ids"):
            torch._dynamo.maybe_mark_dynamic(b[name], 0)
        width = rows.input_ids.shape[1]
        flash = flash_varlen_available(device)
        return b, None, Packed(b["cu_seqlens"], b["position_ids"], width, flash)
    width = b["input_ids"].shape[1]
    return b, (b["lengths"] if int(rows.lengths.min(initial=width)) < width else None), None


def objective_args(
    b: dict[str, torch.Tensor], lengths: torch.Tensor | None, layout: Packed | None
) -> tuple[Any, ...]:
    """`model_batch`'s batch as an Objective's positional arguments."""
    return (b["input_ids"], b["token_type_ids"], lengths, b["positions"], b["labels"],
            b["next_sentence"], layout)  # fmt: skip


def step_masked(rows: Rows, d: Dist) -> int | torch.Tensor:
    """The masked tokens of the whole step (the masked-LM loss is a mean over them), from
    this process's rows: with several processes a sum over them on the device (nothing waits
    for it; torch.full, unlike torch.tensor, copies nothing that would sync the stream)."""
    masked = int((rows.labels != IGNORE).sum())
    if d.world == 1:
        return masked
    return distributed.all_reduce_sum(torch.full((), masked, device=d.device), d)


def forward_backward(
    forward: Any,
    ddp: DistributedDataParallel | None,
    rows: Rows,
    micro: int,
    totals: tuple[int | torch.Tensor, int],
    d: Dist,
    autocast: Any,
    scaler: Any,
    packed: bool,
    static_shapes: bool,
    graphs: bool = False,
) -> torch.Tensor:
    """Gradients of this process's share of the step, micro-batch by micro-batch; the sums.

    `forward` is an Objective (or its DDP / compiled wrapper). Nothing here waits for the
    device: the counts come from the host arrays. graphs: `forward` replays CUDA graphs
    (torch.compile's reduce-overhead mode): each micro-batch starts a new replay, and packed
    batches are rounded up by filler to a multiple of `graph_bucket` tokens."""
    masked, instances = totals
    n = len(rows.lengths)
    sums = torch.zeros(len(SUMS), device=d.device)
    starts = list(range(0, n, micro))
    bucket = graph_bucket(rows.input_ids.shape[1], micro) if graphs and packed else 0
    for i, start in enumerate(starts):
        part = slice_rows(rows, start, start + micro)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        b, lengths, layout = model_batch(part, d.device, packed, not static_shapes, bucket)
        sync = ddp is None or i == len(starts) - 1
        with contextlib.nullcontext() if sync else ddp.no_sync():  # type: ignore[union-attr]
            with autocast:
                mlm, nsp, correct = forward(*objective_args(b, lengths, layout))
            # DDP averages gradients over ranks; * world makes that a sum over the global batch.
            denominator = masked.clamp(min=1) if torch.is_tensor(masked) else max(masked, 1)
            objective = (mlm / denominator + nsp / instances) * d.world
            scaler.scale(objective).backward()
        sums[:4] += torch.stack([mlm.detach(), nsp.detach(), correct[0], correct[1]])
    for j, count in enumerate((int((rows.labels != IGNORE).sum()), n, int(rows.lengths.sum()))):
        sums[4 + j] += count
    return sums


def update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    sums: torch.Tensor,
    max_grad_norm: float,
    ledger: Ledger,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip and apply the step's gradients unless its loss is NaN/inf; (bad, grad norm).

    With torch's fused AdamW (`device_skip`) nothing is read back: the kernel skips a bad step
    itself (`found_inf`) and clips too, dividing the gradients by its `grad_scale`, here
    max(1, norm / max_grad_norm) (Google's clip_by_global_norm), which saves
    clip_grad_norm_'s extra pass over every gradient."""
    bad = step_is_bad(sums)
    norm = torch.zeros((), device=sums.device)
    if not ledger.device_skip and bool(bad):  # bool(): the host path reads the device here
        return bad, norm
    scaler.unscale_(optimizer)  # a no-op unless fp16 loss scaling (never with device_skip)
    if isinstance(optimizer, FlatAdamW):
        grads = optimizer.flat_grads()
    else:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
    if max_grad_norm > 0:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        scale = (norm / max_grad_norm).clamp(min=1.0)
    if ledger.device_skip:
        optimizer.found_inf = bad  # type: ignore[attr-defined]
        if max_grad_norm > 0:
            optimizer.grad_scale = scale  # type: ignore[attr-defined]
        optimizer.step()
        del optimizer.found_inf  # type: ignore[attr-defined]
        if max_grad_norm > 0:
            del optimizer.grad_scale  # type: ignore[attr-defined]
    else:
        if max_grad_norm > 0:  # the division the fused kernel does
            torch._foreach_div_(grads, scale)
        scaler.step(optimizer)
        scaler.update()
    return bad, norm


def graph_bucket(seq: int, micro: int) -> int:
    """Under CUDA graphs, the multiple of tokens a packed micro-batch is rounded up to (each
    token count is a graph of its own): seq x micro / 64, at least seq, at most seq x seq
    (`batches.filler_lengths`); 512 for BERT-base's 256 x 128, where the filler averages
    half of it, about 1% of the batch's tokens."""
    return seq * min(seq, max(1, micro // 64))


def step_is_bad(sums: torch.Tensor) -> torch.Tensor:
    """1.0 on the device when the step's loss is NaN/inf, else 0.0 (nothing read back)."""
    i = SUMS.index
    loss = sums[i("masked_lm_loss")] / sums[i("masked")].clamp(min=1) + sums[
        i("next_sentence_loss")
    ] / sums[i("instances")].clamp(min=1)
    return (~torch.isfinite(loss)).float()


def mean_losses(sums: dict[str, float]) -> tuple[float, float]:
    """(masked LM loss per masked token, next sentence loss per instance) of summed values."""
    return (
        sums["masked_lm_loss"] / max(sums["masked"], 1),
        sums["next_sentence_loss"] / max(sums["instances"], 1),
    )


def device_skip(optimizer: torch.optim.Optimizer, scaler: Any) -> bool:
    """Whether the optimizer can skip a bad step on the device: torch's fused AdamW reads a
    `found_inf` tensor (the mechanism GradScaler uses); our own optimizers and fp16 loss
    scaling decide on the host."""
    fused = isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused")
    return bool(fused) and not scaler.is_enabled()


# Steps between reads of the step sums when the optimizer skips bad steps on the device.
READ_EVERY = 8


class Ledger:
    """The steps whose sums are still on the device.

    Reading a step's sums (for the NaN check, the log and a stop request) makes the host wait
    for the device, which leaves the GPU idle while the next step is prepared and launched
    (9.6% of BERT-base's step time on an H100). When the optimizer can skip a bad step by
    itself (`device_skip`), the trainer reads every READ_EVERY steps and whenever it logs,
    evaluates or saves; otherwise after every step. Bad steps are reported when read, in
    order, and max_bad_steps in a row stops the run as before."""

    def __init__(self, device_skip: bool, skipped: int) -> None:
        self.device_skip = device_skip
        self.skipped = skipped
        self.bad_in_a_row = 0
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, step: int, sums: torch.Tensor, bad: torch.Tensor, norm: torch.Tensor) -> None:
        self.pending.append((step, sums, bad, norm))

    def due(self, step: int, forced: bool) -> bool:
        return forced or not self.device_skip or step % READ_EVERY == 0

    def skipped_so_far(self) -> int:
        """The steps skipped, the pending ones counted (read without a word: a run stopping)."""
        return self.skipped + sum(int(bad) for _, _, bad, _ in self.pending)

    def read(self, log: Window, cfg: TrainConfig, out: Path) -> bool:
        """Account the pending steps; True when a stop was requested on any rank."""
        stop = False
        rows = torch.stack(
            [torch.cat([s, b[None], n[None].float()]) for _, s, b, n in self.pending]
        )
        for (step, _, _, _), row in zip(self.pending, rows.tolist(), strict=True):
            values = dict(zip(SUMS, row[: len(SUMS)], strict=True))
            bad, norm = row[len(SUMS)], row[len(SUMS) + 1]
            stop = stop or values["stop"] > 0
            if not bad:
                self.bad_in_a_row = 0
                log.add(values, norm)
                continue
            self.skipped += 1
            self.bad_in_a_row += 1
            loss = sum(mean_losses(values))
            print(
                f"bertforge: warning: step {step}: loss is {loss}; step skipped "
                f"({self.bad_in_a_row} in a row)",
                file=sys.stderr,
            )
            if self.bad_in_a_row >= cfg.max_bad_steps:
                raise UserError(
                    f"the loss was NaN/inf for {self.bad_in_a_row} steps in a row (last at "
                    f"step {step}); stopped. The last good checkpoint is in {out}/"
                    "checkpoints. Lower --learning-rate, use --precision fp32 or bf16, "
                    "or check that the data was made with this vocabulary."
                )
        self.pending.clear()
        return stop


CPU_OUT_OF_MEMORY = (
    "DefaultCPUAllocator: can't allocate memory",  # torch's own allocations
    "could not create a primitive",  # oneDNN's (matmuls, layer norms), whose memory ran out
)


def out_of_memory(e: RuntimeError) -> bool:
    """A GPU's out-of-memory error (torch.OutOfMemoryError) or the CPU's (a plain
    RuntimeError, `CPU_OUT_OF_MEMORY`)."""
    return isinstance(e, torch.OutOfMemoryError) or any(m in str(e) for m in CPU_OUT_OF_MEMORY)


def retry_or_raise(e: RuntimeError, d: Dist, step: int, micro: int) -> None:
    """Return where `e` is an out-of-memory error that a smaller micro-batch may cure: a GPU's
    (torch.OutOfMemoryError). Raise the rest: the CPU's, which torch raises as a plain
    RuntimeError (under a memory limit: ulimit -v, a container's), as the stop that says what
    to rerun with (`out_of_memory_stop`); any other error as it is. Where the kernel's OOM
    killer strikes first, the process dies with no error to catch."""
    if isinstance(e, torch.OutOfMemoryError):
        return
    if out_of_memory(e):
        raise UserError(out_of_memory_stop(d, step, micro, e)) from None
    raise e


def halve_micro_batch(micro: int, d: Dist, optimizer: torch.optim.Optimizer, step: int) -> int:
    """After an out-of-memory error on a GPU: drop the step's gradients, halve the micro-batch
    (or, where that cannot help, stop saying what to rerun with)."""
    optimizer.zero_grad(set_to_none=True)
    if d.device.type == "cuda":
        torch.cuda.empty_cache()
    if micro == 1:
        raise UserError(out_of_memory_stop(d, step, micro))
    print(
        f"bertforge: {d.device.type.upper()} out of memory at step {step} with micro-batch "
        f"{micro}; retrying the step with micro-batch {micro // 2} (gradient accumulation "
        "doubles, the effective batch stays the same)",
        file=sys.stderr,
    )
    return micro // 2


def out_of_memory_stop(
    d: Dist, step: int, micro: int, e: RuntimeError | None = None, resumes: str | None = None
) -> str:
    """Why a run out of memory stops, what to rerun with and where the rerun `resumes` (None:
    from the last checkpoint). Out of CPU memory, the process does not recover (under a 2.5 GB
    limit, retried in the same process, micro-batches of a quarter failed too, where a fresh
    process trained at a quarter), so it never retries; the message quotes which CPU error it
    was (`e`), oneDNN's saying nothing of memory."""
    if micro == 1:
        hint = "even one instance per micro-batch does not fit; use a smaller --model-size or"
        hint += " shorter sequences"
        hint += f"; {resumes}" if resumes else ""
    else:
        why = "a process does not get its memory back after a failed allocation on the CPU"
        if d.world > 1:
            why = "with several processes the micro-batch cannot shrink mid-step"
        hint = (
            f"{why}; rerun with --micro-batch-size {micro // 2} (or less: the batch stays "
            "--train-batch-size, by gradient accumulation; "
            f"{resumes or 'training resumes from the last checkpoint'})"
        )
    where = f" on process {d.rank}" if d.world > 1 else ""
    return f"{ran_out(d, str(e or ''))}{where} at step {step} with micro-batch {micro}: {hint}."


def ran_out(d: Dist, error: str) -> str:
    """What ran out: "CUDA out of memory", or "CPU out of memory (MARKER)" with the
    CPU_OUT_OF_MEMORY marker `error` holds (oneDNN's message says nothing of memory)."""
    said = next((f" ({m})" for m in CPU_OUT_OF_MEMORY if m in error), "")
    return f"{d.device.type.upper()} out of memory{said}"


class EvalOutOfMemory(Exception):
    """Out of memory in an evaluation on `processes` (ranks; `error`: the first one's
    message), raised on every process once they have agreed."""

    def __init__(self, error: str, processes: list[int]) -> None:
        super().__init__(error)
        self.error, self.processes = error, processes


def eval_out_of_memory_stop(
    d: Dist, step: int, batch: int, resumes: str | None, error: str, processes: list[int]
) -> str:
    """Why a run out of memory in its evaluation (on `processes`) stops, what to rerun with
    and where the rerun `resumes` (None: an evaluation alone)."""
    if batch == 1:
        hint = "even one instance at a time does not fit; use a smaller --model-size"
    else:
        hint = f"rerun with --eval-batch-size {batch // 2} (or less)"
    where = f" on process(es) {', '.join(map(str, processes))}" if d.world > 1 else ""
    return (
        f"{ran_out(d, error)}{where} in the evaluation at step {step}, {batch} instances per "
        f"forward pass: {hint}{f'; {resumes}' if resumes else ''}."
    )


def fit_micro_batch(micro: int, d: Dist, trial: Callable[[int], None]) -> int:
    """Before the first step of a run of several processes: the micro-batch every process's
    memory holds. Each process halves `micro` until `trial` (a step's forward and backward at
    that size, `trial_step`) runs without out-of-memory; all take the smallest.

    One process halves its micro-batch mid-step (`halve_micro_batch`); several cannot: the
    others would be waiting for its gradients in DDP's all-reduce."""
    fits = micro
    while fits > 0:
        try:
            trial(fits)
            break
        except RuntimeError as e:
            retry_or_raise(e, d, 0, fits)
            # leave the except block first, so the failed trial's tensors go
        if d.device.type == "cuda":
            torch.cuda.empty_cache()
        fits //= 2
    everyone = [int(f) for f in distributed.gather_objects(fits, d)]  # type: ignore[call-overload]
    agreed = min(everyone)
    short = ", ".join(str(rank) for rank, f in enumerate(everyone) if f < micro)
    if agreed == 0:
        raise UserError(
            f"out of memory on process(es) {short} before the first step: even one instance "
            "per micro-batch does not fit; use a smaller --model-size or shorter sequences."
        )
    if agreed < micro and d.main:
        print(
            f"bertforge: micro-batch {micro} does not fit in memory on process(es) {short} "
            f"(out of memory in a trial step before the first); all {d.world} processes train "
            f"with micro-batch {agreed} (gradient accumulation x{micro // agreed}, the effective "
            "batch stays the same)",
            file=sys.stderr,
        )
    return agreed


def trial_rows(n: int, seq: int, predictions: int) -> Rows:
    """n instances of the largest size a step can hold: seq tokens (one a token shorter, so
    that a padded batch takes the masked attention of real batches) and every masked slot
    used."""
    lengths = np.full(n, seq)
    lengths[-1] = seq - 1
    ids = np.ones((n, seq), dtype=np.int64)
    positions = np.broadcast_to(np.arange(1, predictions + 1), (n, predictions)).copy()
    return Rows(ids, lengths, None, np.zeros_like(ids), np.zeros(n, dtype=np.int64), positions,
                np.ones_like(positions))  # fmt: skip


def trial_step(
    forward: Any,
    ddp: DistributedDataParallel | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rows: Rows,
    d: Dist,
    step_args: tuple[Any, ...],
) -> None:
    """A step's forward and backward on `rows` that leaves no trace: no gradients kept, no
    all-reduce (DDP's no_sync), the random number generators as they were. While the
    optimizer has no state yet (a fresh run), the memory its first step will take for it is
    held, so that the trial needs what later steps need."""
    n = len(rows.lengths)
    fresh = not optimizer.state
    room = sum(2 * p.numel() * p.element_size() for p in model.parameters()) if fresh else 0
    held = torch.empty(room, dtype=torch.uint8, device=d.device)
    devices = [d.device] if d.device.type == "cuda" else []  # the CPU's is always forked
    try:
        with (
            torch.random.fork_rng(devices, device_type="cuda"),
            ddp.no_sync() if ddp is not None else contextlib.nullcontext(),
        ):
            masked = int((rows.labels != IGNORE).sum())  # type: ignore[operator]
            forward_backward(forward, None, rows, n, (masked, n), d, *step_args)
    finally:
        optimizer.zero_grad(set_to_none=True)
        del held


@torch.no_grad()
def evaluate(
    model: BertForPretraining,
    data: PretrainingData,
    split: Split,
    spec: MaskSpec | None,
    cfg: TrainConfig,
    d: Dist,
    batch: int,
    autocast: Any,
    packed: bool,
    step: int,
) -> dict[str, float]:
    """Google's eval metrics on the held-out split (its batches spread over the ranks). Out
    of memory on any process, every process raises EvalOutOfMemory alike (they agree in the
    sums' all-reduce), so that all can save a checkpoint together and stop."""
    model.eval()
    count = math.ceil((split.total - split.num_train) / batch)
    if cfg.max_eval_steps:
        count = min(count, cfg.max_eval_steps)
    sums = torch.zeros(7, dtype=torch.float64, device=d.device)  # the last: out of memory
    label_counts = torch.zeros(model.config.vocab_size, dtype=torch.float64, device=d.device)
    error = ""
    try:
        for chunk in range(d.rank, count, d.world):
            rows = eval_rows(data, split, spec, cfg.random_seed, chunk, batch)
            b, lengths, layout = model_batch(rows, d.device, packed)
            with autocast:
                mlm_logits, nsp_logits = model.pretraining_logits(
                    b["input_ids"], b["token_type_ids"], lengths, b["positions"], layout
                )
            mlm, nsp, correct = pretraining_sums(
                mlm_logits, b["labels"], nsp_logits, b["next_sentence"], model.config.vocab_size
            )
            masked = (b["labels"] != IGNORE).sum()
            label_counts += torch.bincount(
                b["labels"][b["labels"] != IGNORE], minlength=label_counts.numel()
            ).double()
            sums[:6] += torch.stack(
                [
                    mlm,
                    nsp,
                    correct[0],
                    correct[1],
                    masked.float(),
                    torch.tensor(float(len(rows.lengths)), device=d.device),
                ]
            ).double()
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        error, sums[-1] = str(e), 1.0  # the others finish their batches, then hear of it
    distributed.all_reduce_sum(sums, d)
    if sums[-1] > 0:
        model.train()
        errors = [str(x) for x in distributed.gather_objects(error, d)]
        short = [rank for rank, x in enumerate(errors) if x]
        raise EvalOutOfMemory(errors[short[0]], short)
    distributed.all_reduce_sum(label_counts, d)
    model.train()
    mlm_sum, nsp_sum, mlm_ok, nsp_ok, masked, n = sums.tolist()[:6]
    result = {
        "global_step": step,
        "masked_lm_loss": mlm_sum / max(masked, 1),
        "masked_lm_accuracy": mlm_ok / max(masked, 1),
        "next_sentence_loss": nsp_sum / max(n, 1),
        "next_sentence_accuracy": nsp_ok / max(n, 1),
    }
    result["loss"] = result["masked_lm_loss"] + result["next_sentence_loss"]
    # The best constant guess on these very labels: what a unigram model cannot beat.
    result["masked_lm_unigram_baseline"] = float(label_counts.max()) / max(masked, 1)
    return result


def report_eval(out: Path, result: dict[str, float], progress: bool) -> None:
    """eval_results.txt in Google's format (sorted `key = value` lines) and metrics.jsonl."""
    write_text(out / "eval_results.txt", "".join(f"{k} = {result[k]}\n" for k in sorted(EVAL_KEYS)))
    append_metrics(
        out,
        {
            "step": result["global_step"],
            "eval": True,
            **{k: result[k] for k in EVAL_KEYS if k != "global_step"},
            "masked_lm_unigram_baseline": result["masked_lm_unigram_baseline"],
        },
    )
    if progress:
        print(
            f"eval at step {result['global_step']}: loss {result['loss']:.4f}, masked LM "
            f"accuracy {result['masked_lm_accuracy']:.4f} (unigram baseline "
            f"{result['masked_lm_unigram_baseline']:.4f}), next sentence accuracy "
            f"{result['next_sentence_accuracy']:.4f}",
            file=sys.stderr,
        )


class Window:
    """Sums since the last log line."""

    def __init__(self, now: float, meter: FlopsMeter | None = None) -> None:
        self.meter = meter
        self.reset(now)

    def reset(self, now: float) -> None:
        self.start = now
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.norm = 0.0

    def add(self, values: dict[str, float], norm: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.norm = norm

    def write(
        self,
        out: Path,
        step: int,
        lr: float,
        micro: int,
        skipped: int,
        cfg: TrainConfig,
        now: float,
    ) -> None:
        s, elapsed = self.sums, max(now - self.start, 1e-9)
        if self.steps:
            mlm, nsp = mean_losses(s)
            record = {
                "step": step,
                "loss": mlm + nsp,
                "masked_lm_loss": mlm,
                "next_sentence_loss": nsp,
                "masked_lm_accuracy": s["masked_lm_correct"] / max(s["masked"], 1),
                "next_sentence_accuracy": s["next_sentence_correct"] / s["instances"],
                "learning_rate": lr,
                "grad_norm": self.norm,
                "tokens_per_second": s["tokens"] / elapsed,
                "step_seconds": elapsed / self.steps,
                "micro_batch_size": micro,
                "skipped_steps": skipped,
            }
            mfu = ""
            if self.meter is not None:
                record["mfu"] = self.meter.mfu(s["tokens"] / elapsed, s["masked"] / s["tokens"])
                mfu = f" | MFU {record['mfu']:.1%}"
            append_metrics(out, record)
            if cfg.progress:
                left = (cfg.num_train_steps - step) * elapsed / self.steps
                print(
                    f"step {step}/{cfg.num_train_steps} | loss {record['loss']:.4f} | mlm acc "
                    f"{record['masked_lm_accuracy']:.3f} | nsp acc "
                    f"{record['next_sentence_accuracy']:.3f} | lr {lr:.2e} | "
                    f"{record['tokens_per_second']:,.0f} tok/s{mfu} | ETA {duration(left)}",
                    file=sys.stderr,
                )
        self.reset(now)


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    """One line of metrics.jsonl, mirrored to TensorBoard (OUTPUT/tensorboard) if installed."""
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    writer = tensorboard(out)
    if writer is not None:
        group = "eval" if record.get("eval") else "train"
        for key, value in record.items():
            if key not in ("step", "eval") and isinstance(value, int | float):
                writer.add_scalar(f"{group}/{key}", value, record["step"])
        writer.flush()


_WRITERS: dict[Path, Any] = {}


def tensorboard(out: Path) -> Any:
    """The run's TensorBoard writer, or None without the tensorboard package (optional extra)."""
    if out not in _WRITERS:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _WRITERS[out] = None
        else:
            _WRITERS[out] = SummaryWriter(str(out / "tensorboard"))
    return _WRITERS[out]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics past `step` (a resumed run logs those steps again)."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]  # torn lines go too
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class StopRequest:
    """Ctrl-C / SIGTERM: finish the step, save a checkpoint, exit. A second Ctrl-C quits now."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # None: stopped by another process's request
        self._old: dict[int, Any] = {}
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        print(
            "\nbertforge: stopping after this step and saving a checkpoint (Ctrl-C again to "
            "quit at once)",
            file=sys.stderr,
        )

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- state


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(states: list[dict[str, Any]], d: Dist, seed: int, step: int) -> None:
    """This rank's RNG state; a different number of processes reseeds from (seed, step)."""
    if len(states) != d.world:
        torch.manual_seed(seed + 1_000_003 * d.rank + 7919 * step)
        return
    state = states[d.rank]
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and d.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])


def run_settings(cfg: TrainConfig) -> dict[str, Any]:
    settings = config_to_dict(cfg)
    for key in ("data", "output", "bert_config", "init_checkpoint", "vocab", "resume"):
        if settings[key] is not None:
            settings[key] = ",".join(
                str(Path(p).resolve()) if "*" not in p else p for p in str(settings[key]).split(",")
            )
    return settings


def check_same_run(state: dict[str, Any], cfg: TrainConfig, bert: BertConfig, path: Path,
                   data_identity: str, notes: bool) -> None:  # fmt: skip
    """Refuse to resume a run with settings it was not trained with (`RESUMABLE` may change).
    Where things are is not a setting: a run directory moved or copied (another disk, another
    machine) resumes, as does one whose data moved, when its records are the same
    (`PretrainingData.identity`), and its model is compared by shape, not by --bert-config's
    path. Data made again at the same path with other records is another run's (continue from
    the checkpoint with --init-checkpoint into another --output)."""
    old, new = state["config"], run_settings(cfg)
    changed = changed_settings(old, new, TrainConfig, ignore={*RESUMABLE, *WHERE})
    moved, was = old.get("data") != new["data"], state.get("data", {}).get("identity")
    if was is None and moved:  # a checkpoint from before identities: by path, as then
        changed.append("data")
    elif was not in (None, data_identity):  # other records, at another path or the same
        changed.append("data" if moved else f"the records of {new['data']} (made again)")
    elif moved and notes:
        print(f"bertforge: note: the data was read from {old.get('data')}; the same records are "
              f"now at {new['data']}, and the run goes on with them.", file=sys.stderr)  # fmt: skip
    if state["bert_config"] != bert.to_dict():
        changed.append("model (--model-size/--bert-config)")
    if changed:
        detail = ", ".join(
            describe_changes(old, new, [k], TrainConfig) if k in new else k for k in changed
        )
        raise UserError(
            f"{path} belongs to a run with other settings ({detail}); resume with the "
            "same settings, or start over with --overwrite or another --output. To go on from "
            f"its weights with the new settings: --init-checkpoint {path} --output OTHER (the "
            "optimizer and learning-rate schedule start afresh)."
        )


def note_new_schedule(state: dict[str, Any], cfg: TrainConfig, notes: bool) -> None:
    """A resumed run with another --num-train-steps follows the new schedule from its step on
    (as run_pretraining.py does): the learning rate jumps there; say by how much. One already
    past the new total has nothing to train: say so, rather than only "done"."""
    total, step = state["config"].get("num_train_steps"), state["step"]
    if notes and step > cfg.num_train_steps:
        print(
            f"bertforge: note: --num-train-steps {cfg.num_train_steps:,}: the run is at step "
            f"{step:,} already (its last checkpoint), so there is nothing to train and its model "
            "stays at that step. A shorter run starts over: --overwrite or another --output.",
            file=sys.stderr,
        )
    if not notes or total in (None, cfg.num_train_steps) or step >= cfg.num_train_steps:
        return
    old = dataclasses.replace(cfg, num_train_steps=total)
    before = learning_rate(step, cfg.learning_rate, old.warmup_steps, total)
    after = learning_rate(step, cfg.learning_rate, cfg.warmup_steps, cfg.num_train_steps)
    print(
        f"bertforge: note: --num-train-steps {total:,} -> {cfg.num_train_steps:,}: the learning "
        f"rate follows the new schedule from step {step:,} on, so it goes from {before:.3g} to "
        f"{after:.3g} there (the schedule decays to 0 at the last step, as run_pretraining.py's "
        "does). To lengthen a run without the jump, give the total you mean from the start.",
        file=sys.stderr,
    )


# Passes over the training records past which a fresh run is warned that the model will
# learn its data by heart: Google's BERT made about 40 over its 3.3 billion words.
EPOCHS_WARNED = 100


def passes(cfg: TrainConfig, split: Split) -> float:
    """Epochs: how many times the run's steps read its training records."""
    return cfg.num_train_steps * cfg.train_batch_size / max(1, split.num_train)


def epochs_warning(cfg: TrainConfig, split: Split) -> str | None:
    """A warning where --num-train-steps of --train-batch-size are more than EPOCHS_WARNED
    passes over the data (a small corpus, or steps copied from a recipe for a large one).
    Dynamic masking masks each pass anew, but the sentences stay the same."""
    epochs = passes(cfg, split)
    if epochs <= EPOCHS_WARNED:
        return None
    return (
        f"bertforge: warning: {cfg.num_train_steps:,} steps of {cfg.train_batch_size:,} "
        f"instances are {epochs:,.0f} passes over the {split.num_train:,} training instances "
        f"of {cfg.data}: the model will learn them by heart rather than the language (Google's "
        "BERT made about 40 passes over its data). Give more text, or fewer --num-train-steps."
    )


def warmup_warning(cfg: TrainConfig) -> str:
    """--num-warmup-steps at or past --num-train-steps: the learning rate rises all run long
    and never decays (run_pretraining.py takes it silently)."""
    top = learning_rate(cfg.num_train_steps - 1, cfg.learning_rate, cfg.warmup_steps,
                        cfg.num_train_steps)  # fmt: skip
    return (
        f"warning: --num-warmup-steps {cfg.warmup_steps:,} is not below --num-train-steps "
        f"{cfg.num_train_steps:,}: the learning rate rises for the whole run, to {top:.3g} at "
        f"its last step (--learning-rate {cfg.learning_rate:g}), and never decays. BERT warms "
        "up over the first 1% of the steps (the default; Google's scripts: 10,000 of 1,000,000)."
    )


def note_google_run(init: InitWeights) -> None:
    """--init-checkpoint starts the optimizer and schedule afresh (as Google's does); say so
    when the checkpoint is a run_pretraining.py run's, which --resume-google would continue."""
    if init.kind != "google":
        return
    from bertforge.tfcheckpoint import global_step

    step = global_step(init.path)
    if step:
        print(
            f"bertforge: note: {init.path} is a run_pretraining.py checkpoint at step {step}; "
            "--init-checkpoint takes its weights only (optimizer and learning-rate schedule "
            "start afresh); `bertforge train --resume-google` continues that run where it stopped.",
            file=sys.stderr,
        )


def start_new_words(
    init: InitWeights, vocab: Vocab, notes: bool
) -> tuple[dict[str, torch.Tensor], dict[str, int] | None]:
    """The checkpoint's weights for the data's vocabulary: words written over its [unusedN]
    slots (`bertforge vocab extend`) start from the mean of their pieces (`seed_new_words`);
    with the counts of those new words (None when there are none)."""
    if init.vocab_file is None:
        return init.weights, None
    theirs = read_vocab_file(init.vocab_file)
    weights, new = seed_new_words(init.weights, vocab.tokens, theirs)
    if notes and (new.seeded or new.unknown):
        i = (new.seeded or new.unknown)[0]
        print(
            f"bertforge: note: {len(new.seeded) + len(new.unknown)} [unusedN] slot(s) of "
            f"{init.vocab_file} are new words in {vocab.path} ({entry(init.vocab_file, i)}: "
            f"{theirs[i]} -> {vocab.tokens[i]}); {len(new.seeded)} start from the mean of their "
            "pieces' embeddings in the checkpoint.",
            file=sys.stderr,
        )
    if notes and new.unknown:
        print(
            f"bertforge: note: {len(new.unknown)} new word(s) have characters the checkpoint's "
            f"vocabulary lacks (the first: {vocab.tokens[new.unknown[0]]!r}); they keep the "
            "slots' embeddings.",
            file=sys.stderr,
        )
    if not (new.seeded or new.unknown):
        return weights, None
    return weights, {
        "new_words_from_pieces": len(new.seeded),
        "new_words_as_slots": len(new.unknown),
    }


def start_transferred(
    init: InitWeights, vocab: Vocab, bert: BertConfig, notes: bool
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """--transfer-vocab: the checkpoint's weights for the data's vocabulary (`transfer_vocab`),
    and how many tokens kept their rows, started from their pieces' or from [UNK]."""
    assert init.vocab_file is not None
    theirs = read_vocab_file(init.vocab_file)
    weights, t = transfer_vocab(init.weights, vocab.tokens, theirs, bert.padded_vocab_size)
    if notes:
        unknown = (
            f"; {len(t.unknown):,} have characters it lacks (the first: "
            f"{vocab.tokens[t.unknown[0]]!r}) and start from its [UNK]"
            if t.unknown
            else ""
        )
        print(
            f"bertforge: note: --transfer-vocab: of the {vocab.size:,} tokens of {vocab.path}, "
            f"{len(t.kept):,} are in {init.vocab_file} ({len(theirs):,} tokens) and keep their "
            f"embeddings; {len(t.pieces):,} start from the mean of their pieces' "
            f"embeddings{unknown}.",
            file=sys.stderr,
        )
    counts = {"kept": len(t.kept), "from_pieces": len(t.pieces), "from_unk": len(t.unknown)}
    return weights, counts


def take_over_google_run(
    cfg: TrainConfig,
    prefix: Path,
    bert: BertConfig,
    model: torch.nn.Module,
    optimizer: Any,
    notes: bool,
) -> int:
    """--resume-google: the optimizer takes the Adam moments of a run_pretraining.py
    checkpoint (whose weights the model already has); returns its global_step."""
    google = read_google_run(prefix, bert)
    if google.step >= cfg.num_train_steps:
        raise UserError(
            f"--num-train-steps {cfg.num_train_steps}: {prefix} is at step {google.step} "
            "already; give the run's total number of steps (its learning rate reaches 0 there)."
        )
    set_moments(optimizer, model, google.moments, google.step)
    if notes and not cfg.google_adam and cfg.optimizer == "adamw":
        print(
            "bertforge: note: the run goes on with torch's AdamW, which corrects Adam's bias "
            "(Google's optimizer does not; the difference fades over the steps); "
            "--google-adam updates exactly as Google's optimizer did.",
            file=sys.stderr,
        )
    return google.step


def clear_run(out: Path) -> None:
    """A fresh start: remove what an earlier run left (checkpoints, metrics, results)."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    writer = _WRITERS.pop(out, None)
    if writer is not None:
        writer.close()
    shutil.rmtree(out / "tensorboard", ignore_errors=True)
    for name in ("metrics.jsonl", "eval_results.txt", "manifest.json", "tune.json"):
        (out / name).unlink(missing_ok=True)


def tfrecord_memory_warning(path: str, processes: int, available: int | None) -> str | None:
    """Before Google's TFRecords are read into memory (once for this machine's `processes`:
    `batches.shared_tfrecords`): a warning where they are over 1 GB, or would not fit in the
    memory `available`, saying what they take and that `data convert` makes them shards that
    training reads as it goes. Said first, as the system may kill a process out of memory
    without a word."""
    files, _ = data_files(path)
    if is_shard(files[0]):
        return None
    size = sum(f.stat().st_size for f in files)
    need = tfrecord_peak(files)  # one process decodes them, the others map its arrays
    short = available is not None and need > available
    if size <= 1 << 30 and not short:
        return None
    once = f" (once for the {processes} processes on this machine)" if processes > 1 else ""
    line = (
        f"bertforge: warning: {size_text(size)} of TFRecords are read into memory at every "
        f"start{once}, about {size_text(need)} at the peak"
    )
    if short:
        line += (
            f", and this machine has {size_text(available or 0)} available: the system may "
            "stop training for lack of memory"
        )
    return (
        f"{line}; `bertforge data convert` turns them once into shards that training reads "
        "as it goes."
    )


def check_disk_space(cfg: TrainConfig, bert: BertConfig, out: Path, step: int) -> str | None:
    """Before step 1, not at the first checkpoint hours later: refuse a disk without room
    for one checkpoint, and warn (returned) when the checkpoints the run keeps, and the next
    one written before the oldest goes, will not fit."""
    saves = saves_left(step, cfg.num_train_steps, cfg.save_checkpoints_steps)
    if saves == 0:
        return None
    size = checkpoint_bytes(bert)
    free = shutil.disk_usage(out).free
    if free < size:
        raise UserError(
            f"{out}: its disk has {size_text(free)} free, and one checkpoint of this "
            f"model takes {size_text(size)} (the weights and the optimizer's state); free some "
            "space, or choose another --output."
        )
    have = len(list_checkpoints(out))
    need = max(1, min(cfg.keep_checkpoints, have + saves - 1) + 1 - have) * size
    if free >= need:
        return None
    return (
        f"bertforge: warning: {out}: its disk has {size_text(free)} free, and the "
        f"run's checkpoints need {size_text(need)} more ({size_text(size)} each; "
        f"--keep-checkpoints {cfg.keep_checkpoints}, and the next is written before the oldest "
        "is deleted): training will stop when the disk fills. Free some space, lower "
        "--keep-checkpoints, or choose another --output."
    )


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "lamb":
        return Lamb(groups, lr=cfg.learning_rate, eps=cfg.adam_epsilon)
    if cfg.google_adam:
        return GoogleAdamW(groups, lr=cfg.learning_rate, eps=cfg.adam_epsilon)
    if use_flat(cfg):
        return FlatAdamW(groups, lr=cfg.learning_rate, eps=cfg.adam_epsilon)
    return torch.optim.AdamW(
        groups,
        lr=cfg.learning_rate,
        betas=(0.9, 0.999),
        eps=cfg.adam_epsilon,
        fused=True,  # one kernel per step; skips a bad step on the device (Ledger)
    )


def root_cause(e: BaseException) -> str:
    """'Type: first line' of the innermost cause (torch.compile wraps its backend's error as
    `inner_exception`)."""
    while (inner := e.__cause__ or getattr(e, "inner_exception", None)) is not None:
        e = inner
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def compile_failure(e: TorchDynamoException, cfg: TrainConfig, d: Dist, step: int) -> str:
    """The warning for an automatic torch.compile that failed, before the step is redone
    uncompiled. Raises where that cannot be: --compile or --cuda-graphs was asked for, or
    the run has several processes (the others may already wait in the step's gradient
    all-reduce, which this one would no longer match: they would hang)."""
    if cfg.compile is not None or cfg.cuda_graphs:  # asked for: torch's own error
        raise e
    cause = root_cause(e)
    if d.world > 1:
        raise UserError(
            f"torch.compile failed at step {step} in process {d.rank} ({cause}); rerun with "
            "--no-compile (training resumes from the last checkpoint, if there is one)."
        ) from e
    return (
        f"bertforge: warning: torch.compile failed at step {step} ({cause}); training goes on "
        "uncompiled (--no-compile skips the attempt)"
    )


# Steps a run must have left for torch.compile to be on by default on a GPU: on an H100 the
# compiled BERT-base step is 1.2x faster, so the warm-up compile of under a minute pays back
# within a few thousand steps. A CPU runs eager unless asked: with bertforge's own ops (ops.py)
# the eager step of BERT-mini and -small measured 1.06-1.14x faster than the compiled one in
# bf16 (the default on a CPU with bf16 in hardware) on a Xeon; in fp32 compiling measured
# 1.05-1.5x faster there, but on an AMD EPYC (fp32, before these ops) 4% slower
# (bench/RESULTS.md).
AUTO_COMPILE_STEPS = 10_000


def use_compile(cfg: TrainConfig, device: torch.device, steps_left: int) -> bool:
    """--compile / --no-compile, or by default: with --cuda-graphs (a compile mode), and on
    CUDA for a run of AUTO_COMPILE_STEPS or more."""
    if cfg.cuda_graphs:  # check_graphs refuses it with --no-compile
        return True
    if cfg.compile is not None:
        return cfg.compile
    return device.type == "cuda" and steps_left >= AUTO_COMPILE_STEPS


def compile_step(step: torch.nn.Module, **options: Any) -> Any:
    """torch.compile of the training step, compiled as a fresh process would compile it.

    Dynamo remembers the shapes it saw in this process: after a packed run (1-D inputs) a
    padded run's inputs (2-D) would be compiled with dynamic batch and sequence sizes
    ("automatic dynamic"), a different graph from the static one a run of its own gets. So
    whatever was compiled before is forgotten first (code compiled elsewhere in the process
    recompiles at its next call; inductor's on-disk cache keeps that quick)."""
    torch._dynamo.reset()
    quiet_inductor_notes()
    return torch.compile(step, **options)


def quiet_inductor_notes() -> None:
    """Hide inductor's note, printed while compiling on a GPU, that a split reduction (the
    masked-LM loss over the vocabulary) runs without online softmax: it is about inductor's
    own code generation, and nothing a user of bertforge can act on."""
    warnings.filterwarnings("ignore", r"\s*Online softmax is disabled", UserWarning)


def tuned(
    cfg: TrainConfig,
    bert: BertConfig,
    d: Dist,
    batches: tuple[PretrainingData, Split, MaskSpec | None, int, int, int],
    varlen: bool,
    out: Path,
) -> tuple[TrainConfig, int]:
    """`cfg` with --tune's choice (tune.py), measured by process 0 on the first batches of
    its share (`batches`: data, split, mask spec, local batch, micro-batch, first step) while
    the others wait, and the micro-batch to start at (halved where the default step ran out
    of memory in its trial); the same on every process."""
    from bertforge.tune import tune

    data, split, spec, local_batch, micro, first = batches
    group = distributed.waiting_group(d)
    word = None
    if d.main:
        order = Order(split.num_train, cfg.random_seed)
        rows = [
            step_rows(data, order, spec, cfg.random_seed, s, cfg.train_batch_size, (0, local_batch))
            for s in range(first, min(first + 3, cfg.num_train_steps))
        ]
        try:
            choice, fits = tune(cfg, bert, d.device, rows, micro, d.world,
                                cfg.num_train_steps - first, varlen, out, cfg.progress)  # fmt: skip
        except BaseException:
            distributed.broadcast_word("failed", d, group)
            raise
        word = json.dumps({"choice": choice, "micro_batch_size": fits})
    word = distributed.broadcast_word(word, d, group)
    if word == "failed":
        raise UserError("--tune failed in process 0 (its error says why); rerun with --no-tune.")
    told = json.loads(word)
    return dataclasses.replace(cfg, **told["choice"]), told["micro_batch_size"]


def check_options(
    cfg: TrainConfig, bert: BertConfig, device: torch.device, max_seq_length: int, packed: bool
) -> None:
    """The speed options asked for (or chosen by --tune) where they cannot run: one clear
    error each, before anything is written."""
    for flag, on in (("--fused-gelu", cfg.fused_gelu), ("--fused-ffn", cfg.fused_ffn)):
        if on and bert.hidden_act != "gelu":
            raise UserError(
                f"{flag} computes GELU's erf form (hidden_act gelu); this model's hidden_act "
                f"is {bert.hidden_act}: leave the flag out."
            )
    for flag, on in (
        ("--fused-norm", cfg.fused_norm),
        ("--fused-gelu", cfg.fused_gelu),
        ("--fused-ffn", cfg.fused_ffn),
        ("--fused-attention", cfg.fused_attention),
    ):
        if on:
            check_fused(flag, device)
    if cfg.fused_ffn:
        check_fused_ffn(bert)
    if cfg.fused_attention:
        check_fused_attention(bert, max_seq_length, packed)
    if cfg.cuda_graphs:
        check_graphs(cfg, device)
    if use_flat(cfg) and (cfg.optimizer != "adamw" or cfg.google_adam):
        other = "--google-adam" if cfg.google_adam else f"--optimizer {cfg.optimizer}"
        flag = "--flat-optimizer" if cfg.flat_optimizer else "--cuda-graphs"
        raise UserError(
            f"{flag} lays out torch's AdamW (--flat-optimizer); it does not apply to {other}: "
            "leave one of the two out."
        )


def build_model(cfg: TrainConfig, bert: BertConfig, device: torch.device) -> BertForPretraining:
    """The model on `device` with the run's layer options (LAYER_OPTIONS) and pruned last
    layer; its weights from torch's generator as it stands."""
    model = BertForPretraining(bert).to(device)
    model.set_layer_options(**{name: bool(getattr(cfg, name)) for name in LAYER_OPTIONS})
    model.prune_last_layer = cfg.prune_last_layer
    return model


def speed_flags(cfg: TrainConfig) -> str:
    """', with --fused-norm --split-qkv ...': the layer options and the flat optimizer a run
    trains with (asked for or chosen by --tune), for its first progress line."""
    on = [name for name in LAYER_OPTIONS if getattr(cfg, name)]
    on += ["flat_optimizer"] if use_flat(cfg) else []
    return ", with " + " ".join("--" + name.replace("_", "-") for name in on) if on else ""


def check_graphs(cfg: TrainConfig, device: torch.device) -> None:
    """--cuda-graphs where it cannot be: one clear error, before anything is written."""
    if device.type != "cuda":
        raise UserError(
            f"--cuda-graphs replays the step's GPU kernels; training is on {device}: leave the "
            "flag out."
        )
    if cfg.compile is False:
        raise UserError(
            "--cuda-graphs is a torch.compile mode (reduce-overhead): it does not go with "
            "--no-compile; leave one of the two out."
        )
    if cfg.flat_optimizer is False:
        raise UserError(
            "--cuda-graphs needs the flat optimizer: a replay reuses the memory of the last "
            "one's outputs, gradients included, which must be added into a buffer of their own "
            "(pytorch/pytorch#169545); leave --no-flat-optimizer out."
        )


def use_flat(cfg: TrainConfig) -> bool:
    """--flat-optimizer / --no-flat-optimizer, or by default with --cuda-graphs only."""
    return cfg.flat_optimizer if cfg.flat_optimizer is not None else cfg.cuda_graphs


def check_fused(flag: str, device: torch.device) -> None:
    """--fused-norm / --fused-gelu / --fused-ffn / --fused-attention where bertforge's Triton
    kernels cannot run: one clear error, before anything is written."""
    if device.type != "cuda" or not kernels.available():
        where = kernels.missing() if device.type == "cuda" else f"training is on {device}"
        raise UserError(
            f"{flag} needs a CUDA device with Triton ({where}); leave the flag out to train "
            "with torch's own kernels."
        )


def check_fused_ffn(bert: BertConfig) -> None:
    """--fused-ffn for a hidden size its kernels do not take (a multiple of
    kernels.FFN_BLOCK_K): one clear error, rather than a run that silently keeps cuBLAS."""
    if bert.hidden_size % kernels.FFN_BLOCK_K:
        raise UserError(
            f"--fused-ffn takes hidden sizes that are a multiple of {kernels.FFN_BLOCK_K}; this "
            f"model's is {bert.hidden_size}: leave the flag out."
        )


def check_fused_attention(bert: BertConfig, max_seq_length: int, packed: bool) -> None:
    """--fused-attention where its kernels would not run (they take packed batches of
    sequences up to kernels.ATTENTION_MAX_LEN tokens, head sizes kernels.ATTENTION_HEADS): one
    clear error, rather than a run that silently keeps flash attention."""
    head = bert.hidden_size // bert.num_attention_heads
    if max_seq_length > kernels.ATTENTION_MAX_LEN:
        why = f"the data's max_seq_length is {max_seq_length}"
    elif head not in kernels.ATTENTION_HEADS:
        why = f"this model's head size is {head}"
    elif not packed:  # on CUDA up to 128 tokens the flag packs them unless told not to
        why = "--no-packed pads them"
    else:
        return
    sizes = "/".join(map(str, kernels.ATTENTION_HEADS))
    raise UserError(
        f"--fused-attention takes packed batches of sequences up to "
        f"{kernels.ATTENTION_MAX_LEN} tokens and head sizes {sizes}, but {why}: leave the "
        "flag out to keep flash attention."
    )


# Longest max_seq_length at which a GPU trains on packed batches by default: on an H200 they
# measured 2% (BERT-base) and 4% (BERT-large) faster at seq 128, 14% slower at 512, where
# cuDNN's padded attention outruns the flash varlen kernel (bench/RESULTS.md).
PACKED_MAX_SEQ_ON_GPU = 128


def use_packed(
    cfg: TrainConfig,
    device: torch.device,
    max_seq_length: int,
    varlen: bool,
) -> bool:
    """--packed / --no-packed, or by default on a GPU up to PACKED_MAX_SEQ_ON_GPU where the
    flash varlen kernel runs (`varlen`: compute capability 8.0 or newer, bf16/fp16, a head
    size it takes) or --fused-attention asks for bertforge's kernels (fp32 too). Elsewhere
    packed attention scatters each layer's tokens into a padded batch and back: on a GPU
    without the kernel, and on a CPU, where moreover every step's token count is a new shape:
    fresh pages for the step's tensors (thousands of page faults a step) and, in bf16, a new
    oneDNN matmul kernel per shape (its cache of 1,024 overflows).
    Measured over 40-100 warm-up steps (bench/RESULTS.md, session 24), padded batches were
    1.08-1.20x faster for BERT-mini and BERT-small in fp32, 1.5-2.0x for BERT-mini in bf16
    (session 13's runs, 3 warm-up steps each, had packed up to 9% ahead in fp32)."""
    if cfg.packed is not None:
        return cfg.packed
    attention = varlen or cfg.fused_attention
    return device.type == "cuda" and attention and max_seq_length <= PACKED_MAX_SEQ_ON_GPU


# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s per GPU, from NVIDIA's data sheets, by
# a part of the name torch.cuda.get_device_name gives; the first match counts, so the longer
# names come first ("NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_HALF_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s at this precision: known GPUs in bf16/fp16; else None."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_HALF_FLOPS if part in name), None)


@dataclass(frozen=True)
class FlopsMeter:
    """Model FLOPs utilization (MFU): the share of the hardware's peak that the model's own
    training FLOPs (`BertConfig.training_flops_per_token` at the run's sequence length) use
    at a measured tokens/s. peak is the FLOP/s of every process of the run together."""

    config: BertConfig
    seq_len: int
    peak: float

    @classmethod
    def of(
        cls,
        config: BertConfig,
        seq_len: int,
        d: Dist,
        dtype: torch.dtype,
        peak_tflops: float | None = None,
    ) -> FlopsMeter | None:
        """The meter of a run: one device's peak from --peak-tflops, else from the table
        (known GPUs in bf16/fp16); None when neither gives it."""
        peak = peak_tflops * 1e12 if peak_tflops is not None else peak_flops(d.device, dtype)
        return None if peak is None else cls(config, seq_len, peak * d.world)

    def mfu(self, tokens_per_second: float, masked_per_token: float) -> float:
        flops = self.config.training_flops_per_token(self.seq_len, masked_per_token)
        return tokens_per_second * flops / self.peak


# ----------------------------------------------------------------------------- checks


def check_data_flags(cfg: TrainConfig, data: PretrainingData) -> None:
    """Flags that restate the data's settings must agree with it (Google kept them in sync
    by hand across scripts; a mismatch there fails late or silently)."""
    info = data.info
    for flag, given, actual in (
        ("--max-seq-length", cfg.max_seq_length, info.max_seq_length),
        ("--max-predictions-per-seq", cfg.max_predictions_per_seq, info.max_predictions_per_seq),
        ("--do-lower-case", cfg.do_lower_case, info.do_lower_case),
    ):
        if given is not None and actual is not None and given != actual:
            raise UserError(
                f"{flag} {given} does not match the data in {cfg.data}, which was made "
                f"with {actual}; drop the flag or remake the data."
            )
    if data.native is not None and not info.static_masking and info.masked_lm_prob is None:
        folder = data_folder(data)
        raise UserError(
            f"--data {cfg.data}: these shards are masked as training reads them, with the "
            "settings (masked_lm_prob, whole-word masking) that their data directory's "
            "manifest.json holds, and shard files named one by one leave it out; give the "
            f"directory: --data {folder or 'DIR'}."
        )


def data_folder(data: PretrainingData) -> Path | None:
    """The one folder holding every file of --data given by name or glob, if it is a
    `bertforge data` output (a manifest.json that names the vocabulary and the settings)."""
    found = folder_manifest(data.files)
    return None if found is None else found[0]


def resolve_vocab(cfg: TrainConfig, data: PretrainingData, init: InitWeights | None) -> Vocab:
    info = data.info
    path = vocab_dir(info, cfg.vocab)
    if path is not None and not path.exists() and cfg.vocab is None:
        raise UserError(
            f"the data's vocabulary {info.vocab_path} no longer exists; give it with "
            "--vocab (the same vocab.txt the data was made with)."
        )
    if path is None and init is not None:
        path = init.vocab_file
    if path is None:
        folder = data_folder(data)  # files of a `bertforge data` output?
        hint = f", or --data {folder} (its manifest.json names it)." if folder else "."
        what = "Google's TFRecords do not" if data.native is None else "shard files do not"
        raise UserError(
            f"{cfg.data}: {what} name their vocabulary; give --vocab (the vocab.txt the data "
            f"was made with){hint}"
        )
    vocab = load_vocab(
        path, cfg.do_lower_case if cfg.do_lower_case is not None else info.do_lower_case
    )
    if info.vocab_sha256 and vocab.sha256 != info.vocab_sha256:
        own = vocab_dir(info, None) if cfg.vocab is not None else None  # named, or its copy
        raise UserError(
            f"--vocab: {vocab.path} is not the vocabulary the data in {cfg.data} was "
            f"made with ({info.vocab_path})"
            + (f"; leave --vocab out to use it ({own})." if own and own.exists() else ".")
        )
    if not info.vocab_sha256:  # files by name or glob: of a `bertforge data` output?
        check_recorded_vocab(data.files, vocab.path, vocab.sha256)
    if init is not None and cfg.transfer_vocab and init.vocab_file is None:
        raise UserError(
            f"--transfer-vocab: no vocab.txt or tokenizer.json beside {init.path}, so its "
            "embeddings cannot be matched to the data's tokens; copy the checkpoint's vocab.txt "
            "beside it."
        )
    if init is not None and init.vocab_file is not None and not cfg.transfer_vocab:
        check_init_vocab(vocab.tokens, vocab.path, init.vocab_file)
    top = data.max_token_id()
    if top >= vocab.size:
        why = "the data was made with another vocabulary"
        if info.vocab_sha256 and vocab.sha256 == info.vocab_sha256:  # its manifest names it
            why = (
                f"its manifest names this vocabulary, so the shards are damaged: `bertforge "
                f"data verify {cfg.data}` checks them against their sha256; recreate them"
            )
        raise UserError(
            f"{cfg.data} holds token id {top}, beyond the vocabulary {vocab.path} "
            f"({vocab.size} tokens); {why}."
        )
    return vocab


def casing_warning(vocab: Vocab, init: InitWeights | None) -> str | None:
    """Continued pretraining (on the checkpoint's vocabulary, not --transfer-vocab) on data
    normalized otherwise than the checkpoint's text was (mBERT, cased, on data made with
    --lowercase): the data's vocabulary is the checkpoint's, token for token, so nothing
    else tells. The checkpoint's casing as recorded beside it, else (Google's checkpoints
    record none) as its tokens tell (`token_casing`). A warning, not an error: it may be
    meant."""
    if init is None or init.vocab_file is None:
        return None
    if differ := other_normalization(vocab, init.vocab_file):
        ours, theirs, said = differ
    elif recorded_casing(init.vocab_file.parent)[0] is None:
        made_lower, said = token_casing(read_vocab_file(init.vocab_file))
        if made_lower is None or made_lower == vocab.do_lower_case:
            return None
        ours = normalization(vocab.do_lower_case, vocab.strip_accents)
        theirs = f"looks {'uncased' if made_lower else 'cased'}"
    else:
        return None
    return (
        f"bertforge: warning: the tokenizer of --init-checkpoint {init.path} {theirs} "
        f"({said}); the data's {ours} ({vocab.path}), so words reach the model otherwise than "
        "in its pretraining (as [UNK] or other pieces, or its cased tokens never trained). "
        "Make the data with the checkpoint's casing (--cased or --lowercase) to continue its "
        "training as it was."
    )


def check_announcement(cfg: TrainConfig, data: PretrainingData) -> str | None:
    """A line saying that the start-up check reads the data, for native shards of over
    ANNOUNCED_CHECK_BYTES: from slow storage it takes seconds to minutes (6 GB, 3-4 s from
    this machine's disk), with nothing else on screen yet."""
    if data.native is None:
        return None
    size = len(data) * data.native.dtype.itemsize
    if size <= ANNOUNCED_CHECK_BYTES:
        return None
    return (f"train: checking every record of {cfg.data} ({size / 1e9:.1f} GB, "
            f"{len(data.files):,} shards) before the first step")  # fmt: skip


def check_one_start(d: Dist, out: Path, step: int, records: int, data_id: str) -> None:
    """Under torchrun, every process must start at process 0's step on the same data (its
    records' count and `PretrainingData.identity`). A machine that does not see --output's
    checkpoints (no shared file system there) would start at step 0 with a fresh optimizer
    while the others resume, with no error (DDP copies process 0's weights, nothing else);
    one reading other data, on other batches."""
    if d.world == 1:
        return
    mine = (step, records, data_id, socket.gethostname())
    starts = cast(list[tuple[int, int, str, str]], distributed.gather_objects(mine, d))
    step0, records0, id0, host0 = starts[0]
    for rank, (other_step, other_records, other_id, host) in enumerate(starts):
        if other_step != step0:
            raise UserError(
                f"--output {out}: process {rank} (on {host}) would start at step {other_step}, "
                f"process 0 (on {host0}) at step {step0}: they do not see the same checkpoints. "
                "--output must be one directory that every machine sees (a shared file system)."
            )
        if (other_records, other_id) != (records0, id0):
            what = (
                f"{other_records:,} records, process 0 (on {host0}) {records0:,}"
                if other_records != records0
                else f"other records than process 0 (on {host0}), as many ({records0:,}): "
                "other shards or files, or the same names of other sizes"
            )
            raise UserError(
                f"--data: process {rank} (on {host}) reads {what}; give every machine the same "
                "data (a shared file system, or identical copies)."
            )


def share_data_check(data: PretrainingData, d: Dist, reused: bool) -> None:
    """Under torchrun, the start-up pass over native shards (the largest token id, damaged
    records) shared between the processes: each reads every world-th shard and all learn the
    whole result, so 8 processes on a node read the data once between them, not 8 times each.
    Skipped when every process took a resumed run's result (`reuse_scan`). A shard cut short
    stops every process with its error (none waits for the others forever)."""
    if d.world == 1 or data.native is None or all(distributed.gather_objects(reused, d)):
        return
    key = data.native.stat_key()  # before the pass: the shards as they were read
    threads = scan_threads(distributed.local_processes())
    mine: object
    try:
        mine = data.scan_part(range(d.rank, len(data.files), d.world), threads)
    except UserError as e:
        mine = str(e)
    parts = distributed.gather_objects(mine, d)
    for part in parts:
        if isinstance(part, str):
            raise UserError(part)
    data.take_scan(key, cast(list[ScanPart], parts))


def check_records(cfg: TrainConfig, data: PretrainingData) -> None:
    """Stop before the first step at a record whose fields contradict each other
    (`PretrainingData.damaged_record`), naming it and what to do."""
    damaged = data.damaged_record()
    if damaged is None:
        return
    if data.tf_rows is not None:  # whole by their checksums: written so
        raise UserError(
            f"{damaged}; the TFRecords are not valid BERT pretraining data: make them again "
            "(with Google's create_pretraining_data.py, or bertforge data --format tfrecord)."
        )
    check = f"`bertforge data verify {cfg.data}` checks the shards against their sha256; "
    raise UserError(
        f"{damaged}; the shard is damaged. "
        + (check if data.info.vocab_sha256 else "")
        + "recreate the data (bertforge data ... --overwrite)."
    )


def check_model_size(model_size: str | None, bert: BertConfig) -> None:
    """--model-size beside --init-checkpoint must name the checkpoint's size."""
    if not model_size:
        return
    want = BertConfig.preset(model_size, bert.vocab_size)
    if (want.num_hidden_layers, want.hidden_size) != (bert.num_hidden_layers, bert.hidden_size):
        raise UserError(
            f"--model-size {model_size} is not the size of --init-checkpoint "
            f"(L{bert.num_hidden_layers} H{bert.hidden_size}); drop --model-size."
        )


def model_config(
    cfg: TrainConfig, vocab: Vocab, init: InitWeights | None, max_seq_length: int
) -> BertConfig:
    if cfg.bert_config:
        bert = BertConfig.from_json(cfg.bert_config)
        source = cfg.bert_config
    elif init is not None:
        bert, source = init.config, f"{init.path}'s config"
        check_model_size(cfg.model_size, bert)
        if cfg.transfer_vocab:
            bert = dataclasses.replace(bert, vocab_size=vocab.size)
    else:
        return BertConfig.preset(
            cfg.model_size or "base", vocab.size, max_position_embeddings=max(512, max_seq_length)
        )
    if bert.vocab_size != vocab.size:
        raise UserError(
            f"{source}: vocab_size {bert.vocab_size} but the vocabulary {vocab.path} "
            f"has {vocab.size} tokens; they must be equal (a wrong vocab_size is "
            "what makes BERT training produce NaN)."
        )
    if bert.max_position_embeddings < max_seq_length:
        raise UserError(
            f"{source}: max_position_embeddings {bert.max_position_embeddings} is "
            f"below the data's max_seq_length {max_seq_length}; make the data again with "
            f"`bertforge data --max-seq-length {bert.max_position_embeddings}` or less (the "
            "model has no position embeddings past that)."
        )
    return bert


def mask_spec(data: PretrainingData, vocab: Vocab) -> MaskSpec:
    """The data stage's masking rule, with the settings the data was made with."""
    info = data.info
    assert info.masked_lm_prob is not None, "dynamic masking needs the data manifest"
    params = InstanceParams(
        max_seq_length=info.max_seq_length,
        masked_lm_prob=info.masked_lm_prob,
        max_predictions_per_seq=info.max_predictions_per_seq,
        do_whole_word_mask=info.do_whole_word_mask,
    )
    return data_mask_spec(params, VocabIds.from_tokens(vocab.tokens))


def eval_size(cfg: TrainConfig, total: int) -> int:
    if cfg.eval_records is not None:
        if cfg.eval_records >= total:
            raise UserError(
                f"--eval-records {cfg.eval_records}: the data has only {total} records."
            )
        return cfg.eval_records
    return min(10_000, max(1, total // 100))


def trained_length(init: InitWeights | None, max_seq_length: int) -> int:
    """The longest sequence the model's position embeddings have been trained on once this
    run has trained: its data's max_seq_length, or more if the checkpoint it started from was
    trained on longer. A checkpoint without that record (Google's, another tool's) counts as
    trained at every position it has, as Google's published models were (at 512). Export
    writes it as the tokenizer's model_max_length, so transformers and flair never feed the
    model positions it has not learned; embed and fill-mask read no further."""
    if init is None:
        return max_seq_length
    return max(max_seq_length, init.readable_length)


def finish(
    out: Path,
    cfg: TrainConfig,
    bert: BertConfig,
    info: Any,
    step: int,
    skipped: int,
    last_eval: dict[str, float] | None,
    precision: torch.dtype,
    compiled: bool,
    packed: bool,
    d: Dist,
    embeddings: dict[str, int] | None,
) -> None:
    ckpts = list_checkpoints(out)
    write_manifest(
        out,
        "train",
        run_settings(cfg),
        counts={
            "steps": step,
            "skipped_steps": skipped,
            "instances_seen": step * cfg.train_batch_size,
        },
        extra={
            "bert_config": bert.to_dict(),
            "eval": last_eval,
            "checkpoint": str(ckpts[-1].relative_to(out)) if ckpts else None,
            "data": {
                "source": info.source,
                "records": info.num_records,
                "max_seq_length": info.max_seq_length,
                "max_predictions_per_seq": info.max_predictions_per_seq,
                "static_masking": info.static_masking,
                "do_lower_case": info.do_lower_case,
            },
            "precision": precision_name(precision),
            "compiled": compiled,
            "packed": packed,
            "embeddings": embeddings,
            "device": d.device.type,
            "processes": d.world,
        },
        libraries=("torch", "numpy", "tokenizers"),
    )
    (out / RUN_FILE).unlink(missing_ok=True)
    if cfg.progress:
        print(f"train: done, {step} steps -> {out}", file=sys.stderr)
