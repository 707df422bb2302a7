"""`train --tune`: the step's speed options, measured on the device that trains.

Which options make a step fastest (compiling, packed batches, bertforge's Triton kernels, the
flat optimizer, CUDA graphs) depends on the device, the model's shape, the batch and the
versions of torch and Triton: on an H200 packed batches measured faster at seq 128 and
slower at 512; on a CPU compiling was faster in fp32 and slower in bf16. So rather than ship
one guess, the trainer can time them where it trains, before the first step.

The search is greedy: the step as the defaults make it first, then one question at a time
(compile? packed? which attention, which feed-forward, ...), each answer tried on top of the
best so far and kept if it `beats` the best beyond the noise of the timing; at the end the
defaults and the choice are timed again, back to back, and the choice stands only if it
still wins. Options the user set are not asked about. Each trial runs in a process of its
own (`run_trial`), so a Triton compile error, an out-of-memory or a CUDA error that poisons
its process costs that trial only, and every trial compiles from a fresh start as training
will. A trial first checks its gradients on a small batch without dropout, uncompiled,
against the default step's computed in fp32 (`gradients_agree`): each parameter's gradient
norm, and how far the whole gradient moved, estimated from a fixed random sketch of it
(`signature`). A trial may be as far from them as the default step at the run's
precision is, give or take (bf16's rounding moves some gradients by 10%, a kernel that rounds
elsewhere about as far), but not as far as a kernel that is fast and wrong (a gradient
scaled, transposed, of the wrong tokens, or missing). Then it times whole steps (forward,
backward, update) on the run's first batches, after warm-up steps that compile and record.

The choice is kept in a cache file named by a hash of what it depends on (`tune_key`), so a
rerun or a resume does not measure again, and reported in OUTPUT/tune.json with every
trial's time. Written here rather than taken from torch's autotuners: those choose among
kernels for one operation, not among ways to build the whole step.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertforge import __version__, kernels
from bertforge.batches import Rows, slice_rows
from bertforge.config import TUNABLE, TrainConfig
from bertforge.distributed import Dist, use_device
from bertforge.errors import UserError
from bertforge.fileio import write_json
from bertforge.model import BertConfig

# The options a trial can set, in the order the questions are asked.
# A change is kept when its step takes at most (1 - MARGIN) of the best step so far and every
# one of its timed blocks beat that best step (`beats`): an option that does not measurably
# help stays off (equal times within noise keep the simpler step).
MARGIN = 0.02
# Steps a run must have (--num-train-steps) for --tune to be on by default on a GPU: the
# trials take minutes (most compile), a small share of a run this long.
AUTO_TUNE_STEPS = 100_000
WARMUP_STEPS = 5  # compiling, the packed batch's recompile with a dynamic size, graph records
TIMED_STEPS = 4  # a block's: the device synchronizes only at its ends, as training seldom does
BLOCKS = 3
TRIAL_TIMEOUT_S = 900
CHECK_ROWS = 8
# The trial's check (no dropout, uncompiled) measures how far a trial's gradients are from the
# default step's in fp32 (in an fp32 run, from the default step's own), relative to each
# parameter's gradient norm: "norm", the difference of the norm (and of the loss);
# "difference", of the gradient itself (`signature`'s estimate of |g - g_exact|). A trial
# passes where each is at most ROUNDING times the default step's own (0 in fp32) plus the
# floor here. In bf16 the default step's own reaches 9% in a LayerNorm bias of BERT-mini and
# -base and 13% in BERT-large's, on random tokens (19% in the next-sentence head's weight on
# the demo corpus), and --fused-norm, which rounds elsewhere, differs from it by as much while
# nearer fp32; the other options differ from it by 1-3.5%, and every option stays 1.1% or more
# inside its limits (on a CPU, the Triton kernels under the interpreter: bench/tune_check.py,
# bench/RESULTS.md "Session 37"). A wrong kernel is far further: a permuted gradient by about
# 1.4 of its norm, one of the wrong sign by 2.
ROUNDING = 1.5
CHECK_FLOOR = {
    "fp32": {"norm": 1e-3, "difference": 1e-3},
    "bf16": {"norm": 2e-2, "difference": 2e-2},
    "fp16": {"norm": 2e-2, "difference": 2e-2},
}
SKETCH_BUCKETS = 256  # a parameter's gradient, summed with random signs into random buckets

Options = dict[str, bool]


@dataclasses.dataclass(frozen=True)
class Trial:
    """What a trial process needs: the run's settings, the model, the batches to time."""

    cfg: TrainConfig  # every TUNABLE field a bool
    bert: dict[str, Any]
    device: str
    batches: list[Rows]  # this process's share of the first steps' batches
    micro: int
    warmup: int
    steps: int  # a block's
    blocks: int
    check: bool = True  # the gradient check (`check_gradients`) too; not on a second timing


def use_tune(cfg: TrainConfig, device: torch.device) -> bool:
    """--tune / --no-tune, or by default on CUDA for a run of AUTO_TUNE_STEPS or more (in
    all: a resumed run takes the cached choice again, however few steps it has left)."""
    if cfg.tune is not None:
        return cfg.tune
    return device.type == "cuda" and cfg.num_train_steps >= AUTO_TUNE_STEPS


def resolved(
    cfg: TrainConfig, device: torch.device, steps_left: int, seq: int, varlen: bool
) -> Options:
    """The options training takes from `cfg` without tuning (the defaults resolved)."""
    from bertforge.train import use_compile, use_flat, use_packed

    options = {name: bool(getattr(cfg, name)) for name in TUNABLE}
    options["compile"] = use_compile(cfg, device, steps_left)
    options["packed"] = use_packed(cfg, device, seq, varlen)
    options["flat_optimizer"] = use_flat(cfg)
    return options


def questions(
    cfg: TrainConfig, device: torch.device, base: Options, processes: int = 1
) -> list[list[Options]]:
    """The alternatives to try, question by question, for the options the user left unset.
    Which of them can run in this run is `problem`'s to say, once the earlier answers are in.
    With several processes CUDA graphs are not asked about: a trial is one process, and cannot
    time (or check) DDP's all-reduce in a replayed step, where torch has had crashes and
    slowdowns (pytorch/pytorch#128218, #139207)."""
    unset = {name for name in TUNABLE if getattr(cfg, name) is None}
    asked: list[list[Options]] = []
    for name in ("compile", "packed"):
        if name in unset:
            asked.append([{name: not base[name]}])
    triton = device.type == "cuda" and kernels.available()
    if triton and "fused_attention" in unset and cfg.packed is not False:
        asked.append([{"fused_attention": True, "packed": True}])
    if triton:
        feed_forward = [{name: True} for name in ("fused_ffn", "fused_gelu") if name in unset]
        if feed_forward and not cfg.fused_ffn and not cfg.fused_gelu:
            asked.append(feed_forward)
        if "fused_norm" in unset:
            asked.append([{"fused_norm": True}])
    if "split_qkv" in unset:
        asked.append([{"split_qkv": True}])
    adamw = cfg.optimizer == "adamw" and not cfg.google_adam
    if adamw and "flat_optimizer" in unset and not base["flat_optimizer"]:
        asked.append([{"flat_optimizer": True}])
    graphs = cfg.compile is not False and cfg.flat_optimizer is not False and processes == 1
    if device.type == "cuda" and adamw and "cuda_graphs" in unset and graphs:
        asked.append([{"cuda_graphs": True, "compile": True, "flat_optimizer": True}])
    return asked


def problem(
    options: Options, cfg: TrainConfig, bert: BertConfig, device: torch.device, seq: int
) -> str | None:
    """Why these options cannot run in this run (train.check_options's error), or None."""
    from bertforge.train import check_options

    trial = dataclasses.replace(cfg, **options)
    if options["fused_ffn"] and options["fused_gelu"]:
        return "--fused-ffn takes over from --fused-gelu"
    try:
        check_options(trial, bert, device, seq, options["packed"])
    except UserError as e:
        return str(e)
    return None


def choose(
    base: Options,
    asked: Sequence[Sequence[Options]],
    measure: Callable[[Options, bool], dict[str, Any]],
    blocked: Callable[[Options], str | None],
    note: Callable[[str], None] = lambda line: None,
) -> tuple[Options, list[dict[str, Any]]]:
    """Greedy: measure `base`, then each alternative of each question on top of the best so
    far, keeping the fastest that `beats` it and whose gradients are near enough the default
    step's in fp32 (`gradients_agree`); then base and the choice again, back to back, the
    choice kept only if it still beats base (the faster of base's two timings:
    `defaults_seconds`). `measure(options, check)` -> {"seconds": per step, "gradients": its
    `signature`, "exact": base's in fp32 (base's trial, where the run's precision is not
    fp32), "floor": CHECK_FLOOR's} or {"error": why}; without check (the second timings,
    whose gradients were checked in the first), no "gradients" or "exact".
    Returns the choice and the trials (options, result, kept; "again" for the last two)."""
    trials: list[dict[str, Any]] = []

    def timed(options: Options, check: bool = True) -> tuple[dict[str, Any], Any, Any]:
        """A trial's result, with two `signature`s split off (compared, not recorded): its
        gradients', and the default step's in fp32 ("exact", which only the default trial
        brings; in an fp32 run, where there is none, its own gradients are that)."""
        result = dict(measure(options, check))
        gradients = result.pop("gradients", None)
        return result, gradients, result.pop("exact", None) or gradients

    first, reference, exact = timed(base)
    if "error" not in first:  # the default step's own distance from fp32's: bf16's rounding
        first["check"] = gradients_agree(reference, reference, exact, first["floor"])
        if "error" in first["check"]:
            first["error"] = f"its gradients are {first['check']['error']}"
    trials.append({"options": {}, **first, "kept": "error" not in first})
    note(trial_line(trials[-1], None))
    if "error" in first:
        return base, trials
    best, best_s = base, first["seconds"]
    for alternatives in asked:
        winner = None
        for change in alternatives:
            options = {**best, **change}
            if options == best:
                continue
            why = blocked(options)
            if why is not None:
                continue
            result, gradients, _ = timed(options)
            if "error" not in result:
                check = gradients_agree(gradients, reference, exact, result["floor"])
                result["check"] = check
                if "error" in check:
                    result["error"] = f"gradients too far: {check['error']}"
            trial = {"options": changed(options, base), **result, "kept": False}
            trials.append(trial)
            fast = "error" not in result and beats(result, best_s)
            if fast and (winner is None or result["seconds"] < winner[1]["seconds"]):
                winner = (options, result, trial)
            note(trial_line(trial, best_s))
        if winner is not None:
            best, best_s = winner[0], winner[1]["seconds"]
            winner[2]["kept"] = True
    if best == base:
        return base, trials
    # The defaults and the choice once more, back to back: a win that was the noise of one
    # trial's moment does not hold. The choice must beat the faster of the defaults' two
    # timings: noise (another process, a page fault) only ever adds time, so one slow timing of
    # the defaults cannot make the choice.
    again = {"options": {}, **timed(base, check=False)[0], "kept": False, "again": True}
    trials.append(again)
    note(trial_line(again, None))
    then = {"options": changed(best, base), **timed(best, check=False)[0], "kept": False,
            "again": True}  # fmt: skip
    trials.append(then)
    if "error" in again:
        return base, trials
    defaults_s = defaults_seconds(trials)
    note(trial_line(then, defaults_s))
    if "error" in then or not beats(then, defaults_s):
        note("tune: measured again, the choice was not faster than the defaults: training with "
             "the defaults")  # fmt: skip
        return base, trials
    again["kept"] = then["kept"] = True
    return best, trials


def defaults_seconds(trials: Sequence[dict[str, Any]]) -> float:
    """The default step's time: the faster of its two timings (the first trial and its
    second timing, "again")."""
    return min(t["seconds"] for t in trials if t["options"] == {} and "seconds" in t)


def beats(result: dict[str, Any], best_s: float) -> bool:
    """Whether a trial is faster than the best step so far (`best_s` a step) beyond noise: its
    median block by MARGIN, and its slowest block too (on this 2-core CPU a trial's blocks
    spread by 10% and more)."""
    slowest = max(result.get("blocks") or [result["seconds"]])
    return result["seconds"] <= best_s * (1 - MARGIN) and slowest < best_s


def changed(options: Options, base: Options) -> Options:
    return {k: v for k, v in options.items() if base.get(k) != v}


def describe(options: Options) -> str:
    """'+fused_norm -packed' for a change from the defaults; 'the defaults' for none."""
    return " ".join(f"{'+' if on else '-'}{k}" for k, on in options.items()) or "the defaults"


def trial_line(trial: dict[str, Any], best_s: float | None) -> str:
    """One trial's line: its step time against the best so far, how far its gradients are from
    the default step's in fp32 (the default step's own too: its precision's rounding), and how
    long its process took (compiling, mostly), or its error."""
    what = ("again, " if trial.get("again") else "") + describe(trial["options"])
    took = f"its process took {trial['trial_s']:.0f} s" if "trial_s" in trial else ""
    if "error" in trial:
        return f"tune: {what}: failed ({trial['error']})" + (f"; {took}" if took else "")
    notes = []
    if "check" in trial:  # how far its gradients are from the default step's in fp32
        moved = trial["check"]["difference"]
        if moved:
            where = trial["check"].get("difference_in")
            notes.append(f"gradients within {100 * moved:.2g}% of fp32's"
                         + (f", the most in {where}" if where else ""))  # fmt: skip
        elif trial["options"]:  # the default step of an fp32 run is fp32's
            notes.append("the same gradients")
    notes += [took] if took else []
    line = f"tune: {what}: {1000 * trial['seconds']:.1f} ms a step"
    if best_s is not None:
        than = "the defaults" if trial.get("again") else "the best so far"
        line += f", {best_s / trial['seconds']:.2f}x {than}"
    return line + (f" ({'; '.join(notes)})" if notes else "")


def distances(got: dict[str, Any], exact: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float]:
    """How far `got`'s gradients (a `signature`) are from `exact`'s, relative to each
    parameter's gradient norm in `exact` (to a thousandth of the largest, for near-zero ones):
    the whole gradient's (estimated from the sketches), its norm's, and the loss's."""
    norm, exact_norm = np.asarray(got["norms"]), np.asarray(exact["norms"])
    scale = np.maximum(exact_norm, 1e-3 * exact_norm.max(initial=0) + 1e-12)
    # the sketch of the gradients' difference is the difference of their sketches, and its
    # squared norm is the difference's, on average over the buckets and signs
    ours, theirs = np.asarray(got["sketch"]), np.asarray(exact["sketch"])
    moved = np.sqrt(np.sum((ours - theirs) ** 2, axis=1)) / scale
    loss = abs(got["loss"] - exact["loss"]) / max(abs(exact["loss"]), 1e-12)
    return moved, np.abs(norm - exact_norm) / scale, loss


def limits(
    default: dict[str, Any], exact: dict[str, Any], floor: dict[str, float]
) -> tuple[np.ndarray, np.ndarray, float]:
    """How far from `exact` a trial's gradients may be (`distances`' three measures): ROUNDING
    times the default step's own distance from them plus `floor` (CHECK_FLOOR's)."""
    own_moved, own_stretched, own_loss = distances(default, exact)
    return (ROUNDING * own_moved + floor["difference"], ROUNDING * own_stretched + floor["norm"],
            ROUNDING * own_loss + floor["norm"])  # fmt: skip


def gradients_agree(
    got: dict[str, Any], default: dict[str, Any], exact: dict[str, Any], floor: dict[str, float]
) -> dict[str, Any]:
    """How far `got`'s gradients are from `exact`'s (`signature`s: the default step's in fp32),
    and whether they are near enough: each parameter's gradient and gradient norm, and the
    loss, within `limits` (from `default`'s own distance: the default step's at the run's
    precision; 0 in an fp32 run, where it is `exact`).
    The largest distance of a gradient ("difference") and of a norm, each with where, and of
    the loss; "error" when one is over its limit, they are not finite, or the two are not of
    the same parameters."""
    if got["names"] != exact["names"]:
        return {"error": f"{len(got['names'])} parameters against {len(exact['names'])}"}
    moved, stretched, loss = distances(got, exact)
    if not (np.isfinite(moved).all() and np.isfinite(stretched).all() and np.isfinite(loss)):
        return {"error": "not finite"}
    moved_limit, stretched_limit, loss_limit = limits(default, exact, floor)
    worst, longest = int(moved.argmax()), int(stretched.argmax())
    check = {
        "difference": round(float(moved[worst]), 6),
        "difference_in": got["names"][worst],
        "norm": round(float(stretched[longest]), 6),
        "norm_in": got["names"][longest],
        "loss": round(float(loss), 6),
    }
    over = np.flatnonzero(moved > moved_limit)
    long = np.flatnonzero(stretched > stretched_limit)
    if loss > loss_limit:
        why = (f"the loss {got['loss']:.6g} against the default step's {exact['loss']:.6g} in "
               f"fp32 (at most {100 * loss_limit:.2g}% off passes)")  # fmt: skip
    elif len(long):
        i = int(long[np.argmax(stretched[long] - stretched_limit[long])])
        why = (f"{got['names'][i]}'s gradient norm {got['norms'][i]:.6g} against the default "
               f"step's {exact['norms'][i]:.6g} in fp32 (at most {100 * stretched_limit[i]:.2g}% "
               "off passes)")  # fmt: skip
    elif len(over):
        i = int(over[np.argmax(moved[over] - moved_limit[over])])
        why = (f"{got['names'][i]}'s gradient differs from the default step's in fp32 by about "
               f"{100 * moved[i]:.3g}% of its norm (at most {100 * moved_limit[i]:.2g}% "
               "passes)")  # fmt: skip
    else:
        return check
    return {**check, "error": why}


def signature(model: torch.nn.Module, loss: float) -> dict[str, Any]:
    """The gradients of `model`'s parameters, small enough to pass between processes: each
    one's name and norm, and its count sketch: every element, its sign flipped at random, added
    into one of SKETCH_BUCKETS buckets at random (the same signs and buckets in every process
    on this device: one seed per parameter). The sketch of a difference of two gradients is the
    difference of their sketches, and its norm estimates the difference's: at BERT-mini's
    sizes within 0.89-1.13 times it where eight random projections, the sketch before, were
    within 0.45-1.8 times (the rule's margins were then mostly that noise: bench/RESULTS.md,
    "Session 37"), at a third of their cost. Any change of a gradient changes its sketch, a
    permutation that keeps its norm included."""
    names, norms, sketches = [], [], []
    for i, (name, p) in enumerate(model.named_parameters()):
        g = p.grad.detach().double().flatten() if p.grad is not None else torch.zeros(
            p.numel(), dtype=torch.float64, device=p.device)  # fmt: skip
        draws = torch.Generator(device=g.device)
        draws.manual_seed(1_000_003 + i)
        bucket = torch.randint(0, SKETCH_BUCKETS, g.shape, generator=draws, device=g.device)
        signs = torch.randint(0, 2, g.shape, generator=draws, device=g.device, dtype=g.dtype)
        sketch = torch.zeros(SKETCH_BUCKETS, dtype=g.dtype, device=g.device)
        sketch.index_add_(0, bucket, g * signs.mul_(2).sub_(1))
        names.append(name)
        norms.append(float(g.norm()))
        sketches.append(sketch.tolist())
    return {"names": names, "norms": norms, "sketch": sketches, "loss": loss}


# ----------------------------------------------------------------------------- the cache


def cache_dir() -> Path:
    root = os.environ.get("BERTFORGE_CACHE")
    if root:
        return Path(root) / "tune"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "bertforge" / "tune"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm{major}{minor})"
    model = platform.processor() or platform.machine()
    with_name = Path("/proc/cpuinfo")
    if with_name.exists():
        for line in with_name.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {torch.get_num_threads()} threads"


def tune_key(
    cfg: TrainConfig, bert: BertConfig, device: torch.device, batch: Rows, micro: int,
    processes: int, base: Options,
) -> dict[str, Any]:  # fmt: skip
    """What the choice depends on: the device, the versions, the model, the batch (and how
    full its sequences are, which decides what packing saves), the step's settings, the
    defaults (`base`, `resolved`), the options the user fixed, and the gradient check's rule
    (a choice made under another, which may have ruled out a good kernel, is made again)."""
    fill = float(batch.lengths.sum()) / (len(batch.lengths) * batch.input_ids.shape[1])
    return {
        "device": device_name(device),
        "bertforge": __version__,
        "torch": torch.__version__,
        "triton": kernels.triton.__version__ if kernels.triton is not None else None,
        "bert_config": bert.to_dict(),
        "max_seq_length": batch.input_ids.shape[1],
        "max_predictions_per_seq": batch.positions.shape[1] if batch.positions is not None else 0,
        "batch": len(batch.lengths),
        "micro_batch_size": micro,
        "processes": processes,
        "fill": round(fill * 20) / 20,
        "precision": cfg.precision,
        "optimizer": [cfg.optimizer, cfg.google_adam, cfg.max_grad_norm > 0],
        "prune_last_layer": cfg.prune_last_layer,
        "defaults": base,
        "fixed": {name: getattr(cfg, name) for name in TUNABLE if getattr(cfg, name) is not None},
        "check": {
            "against": "fp32",
            "rounding": ROUNDING,
            "floor": {name: dict(floor) for name, floor in CHECK_FLOOR.items()},
            "sketch": SKETCH_BUCKETS,
        },
    }


def cache_file(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{digest}.json"


def cached(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The record cached in `path` (`cache_file(key)`), or None (also when the file is
    unreadable or another key's: then it is measured again and overwritten)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or "choice" not in record:
        return None
    return record


# ----------------------------------------------------------------------------- tuning


def tune(
    cfg: TrainConfig,
    bert: BertConfig,
    device: torch.device,
    batches: list[Rows],
    micro: int,
    processes: int,
    steps_left: int,
    varlen: bool,
    out: Path,
    progress: bool,
    measure: Callable[[Trial, Options], dict[str, Any]] | None = None,
) -> tuple[Options, int]:
    """The options to train with (a change from `cfg`'s resolved defaults: only the fields that
    differ), measured or from the cache, for a run of `processes` processes (one of which
    measures), and the micro-batch to start at; writes OUTPUT/tune.json. Where the default
    step runs out of memory at `micro`, the trials run at half, and half again, and training
    starts there (it would halve its micro-batch at its first step)."""
    seq, start = batches[0].input_ids.shape[1], micro
    base = resolved(cfg, device, steps_left, seq, varlen)
    key = tune_key(cfg, bert, device, batches[0], micro, processes, base)
    path = cache_file(key)
    asked = questions(cfg, device, base, processes)

    def note(line: str) -> None:
        if progress:
            print(line, file=sys.stderr)

    if processes > 1 and device.type == "cuda" and cfg.cuda_graphs is None:
        note(
            f"tune: CUDA graphs are not tried with {processes} processes (a trial is one and "
            "cannot time DDP's all-reduce in a replay); --cuda-graphs turns them on"
        )
    if not asked:
        note("tune: every speed option this device runs is set on the command line: nothing to "
             "time")  # fmt: skip
        return {}, micro
    record = cached(path, key)
    if record is not None:
        note(
            f"tune: {describe(record['choice'])}, as measured on {record['when']} ({path}; "
            "delete it to measure again)"
        )
    else:
        count = 1 + sum(len(a) for a in asked)
        note(
            f"tune: timing up to {count} ways to run the step on {key['device']}, each in a "
            "process of its own (minutes: most compile); the choice is cached in "
            f"{path}"
        )
        run = measure or run_trial
        while True:
            trial = Trial(
                dataclasses.replace(cfg, **base),
                bert.to_dict(),
                str(device),
                batches,
                micro,
                WARMUP_STEPS,
                TIMED_STEPS,
                BLOCKS,
            )
            choice, trials = choose(
                base,
                asked,
                lambda options, check, trial=trial: run(
                    dataclasses.replace(trial, check=check), options
                ),
                lambda options: problem(options, cfg, bert, device, seq),
                note,
            )
            first = trials[0]
            if micro == 1 or "out of memory" not in first.get("error", "").lower():
                break
            # as the trainer does at its first step (`halve_micro_batch`, `fit_micro_batch`)
            note(
                f"tune: the default step ran out of memory at micro-batch {micro}; timing (and "
                f"then training) at {micro // 2}"
            )
            micro //= 2
        chosen = choice != base
        record = {
            "key": key,
            "when": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "choice": changed(choice, base),
            # the defaults' step (the faster of its two timings) over the choice's second
            "speedup": round(defaults_seconds(trials) / trials[-1]["seconds"], 4)
            if chosen
            else 1.0,
            "micro_batch_size": micro,  # measured at: the key's, or less after out-of-memory
            "trials": trials,
        }
        if "error" in first:
            note(
                f"tune: the default step failed in its trial ({first['error']}); training "
                "with the defaults"
            )
        else:
            try:
                write_json(path, record)
                if micro != start:  # a resumed run starts at the micro-batch trained with
                    fitted = {**key, "micro_batch_size": micro}
                    write_json(cache_file(fitted), {**record, "key": fitted})
            except OSError as e:
                print(f"bertforge: warning: --tune could not cache its choice in {path} ({e}); "
                      "the next run measures again. Set BERTFORGE_CACHE to a writable "
                      "directory to keep it.", file=sys.stderr)  # fmt: skip
            note(
                f"tune: training with {describe(record['choice'])}: {record['speedup']:.2f}x "
                "the default step"
            )
    write_json(out / "tune.json", {**record, "cache": str(path)})
    if "error" in record["trials"][0]:  # not even the defaults ran: the trainer will say why
        return record["choice"], start
    return record["choice"], record.get("micro_batch_size", start)  # at most the key's


def trial_boot(paths: list[str]) -> str:
    """A trial process's program (`python -c`): `paths` as its sys.path, then `trial_process`.
    `python -m` or `-c` alone put the working directory first, where a user's random.py or
    json.py would stand in for the standard library's and every trial would fail; the caller's
    own path is what its imports resolved against (multiprocessing's spawn passes it on too).
    Nothing is imported before it is set (sys is built in)."""
    return (
        f"import sys; sys.path[:] = {paths!r}; "
        "from bertforge.tune import trial_process; trial_process(*sys.argv[1:])"
    )


def run_trial(
    trial: Trial,
    options: Options,
    target: str = "bertforge.tune:trial_main",
    timeout: float = TRIAL_TIMEOUT_S,
) -> dict[str, Any]:
    """`measure` in a process of its own (`trial_boot`, which imports nothing of the caller's
    main module, as multiprocessing's spawn would): its result, or
    {"error": why} when it raised, died or took longer than `timeout` seconds. Its output
    goes to a log file, whose last lines an error quotes. `target`: module:function run
    there with (trial, options, result path). "trial_s": how long the process took."""
    start = time.perf_counter()
    outcome = _run_trial(trial, options, target, timeout)
    return {**outcome, "trial_s": round(time.perf_counter() - start, 1)}


def _run_trial(trial: Trial, options: Options, target: str, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bertforge-tune-") as tmp:
        job, result, log = (Path(tmp) / name for name in ("job.pkl", "result.json", "log.txt"))
        with open(job, "wb") as f:
            pickle.dump((trial, options), f)
        with open(log, "wb") as out:
            argv = [sys.executable, "-c", trial_boot(sys.path), target, str(job), str(result)]
            child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = child.wait(timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"took longer than {timeout:.0f} s"}
        finally:  # timed out, or this process interrupted (Ctrl-C): the trial goes too
            if child.poll() is None:
                child.kill()
                child.wait()
        if result.exists():
            return dict(json.loads(result.read_text()))
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        why = f"its process exited with code {code}"
        return {"error": why + (": " + " | ".join(tail) if tail else "")}


def trial_main(trial: Trial, options: Options, result: str) -> None:
    """A trial process's work: the result (or the error) as JSON to `result`."""
    try:
        outcome = measure(trial, options)
    except torch.OutOfMemoryError:
        outcome = {"error": "out of memory"}
    except Exception as e:  # any failure rules the trial out, with its cause
        from bertforge.train import root_cause

        traceback.print_exc()
        outcome = {"error": root_cause(e)}
    write_json(result, outcome)


def measure(trial: Trial, options: Options) -> dict[str, Any]:
    """In the trial's process: the gradient check (if `trial.check`), then seconds per whole
    step (forward, backward, update) after `trial.warmup` steps: the median of `trial.blocks`
    blocks of `trial.steps` steps each, the device synchronized at a block's ends only (a
    step's host work overlaps the device's, as in training)."""
    from bertforge.train import (
        Ledger,
        Objective,
        autocast_to,
        build_model,
        compile_step,
        device_skip,
        forward_backward,
        make_optimizer,
        precision_name,
        resolve_precision,
        step_masked,
        update,
    )

    cfg = dataclasses.replace(trial.cfg, **options)
    device = torch.device(trial.device)
    use_device(device)  # as a training process is set up
    d = Dist(0, 1, 0, device)
    bert = BertConfig.from_dict(trial.bert, "tune")
    dtype = resolve_precision(cfg.precision, device)
    autocast = autocast_to(dtype, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    packed = options["packed"]
    gradients = None
    if trial.check:
        gradients = check_gradients(cfg, bert, d, autocast, packed, trial.batches[0])
    default = all(options[name] == getattr(trial.cfg, name) for name in TUNABLE)
    exact = None  # the default step's in fp32, what every trial's gradients are checked against
    if trial.check and default and dtype != torch.float32:
        fp32 = autocast_to(torch.float32, device)
        exact = check_gradients(cfg, bert, d, fp32, packed, trial.batches[0])

    torch.manual_seed(cfg.random_seed)
    model = build_model(cfg, bert, device)
    optimizer = make_optimizer(cfg, model)
    ledger = Ledger(device_skip(optimizer, scaler), 0)
    forward: Any = Objective(model)
    if options["compile"]:
        forward = compile_step(forward, mode="reduce-overhead" if options["cuda_graphs"] else None)

    def step(i: int) -> None:
        rows = trial.batches[i % len(trial.batches)]
        totals = (step_masked(rows, d), len(rows.lengths))
        layout = (packed, options["compile"], options["cuda_graphs"])
        sums = forward_backward(
            forward, None, rows, trial.micro, totals, d, autocast, scaler, *layout
        )
        update(model, optimizer, scaler, sums, cfg.max_grad_norm, ledger)
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for i in range(trial.warmup):
        step(i)
    synchronize(device)
    warm = time.perf_counter()
    blocks = []  # the median block's time: one slow block (another process's burst) is ignored
    for b in range(trial.blocks):
        begin = time.perf_counter()
        for i in range(b * trial.steps, (b + 1) * trial.steps):
            step(trial.warmup + i)
        synchronize(device)
        blocks.append((time.perf_counter() - begin) / trial.steps)
    seconds = float(np.median(blocks))
    tokens = np.mean([int(rows.lengths.sum()) for rows in trial.batches])
    return {
        "seconds": seconds,
        "tokens_per_s": round(float(tokens) / seconds, 1),
        "blocks": [round(t, 6) for t in blocks],
        "warmup_s": round(warm - start, 2),
        **({"gradients": gradients} if gradients is not None else {}),
        **({"exact": exact} if exact is not None else {}),
        "floor": CHECK_FLOOR[precision_name(dtype)],
    }


def check_gradients(
    cfg: TrainConfig, bert: BertConfig, d: Dist, autocast: Any, packed: bool, batch: Rows
) -> dict[str, Any]:
    """The `signature` of the gradients (and the loss) of one uncompiled forward and backward
    (the trainer's `forward_backward`) on the batch's first CHECK_ROWS rows without dropout:
    the same for every trial of a run but for rounding, unless a kernel is wrong."""
    from bertforge.train import SUMS, Objective, build_model, forward_backward, step_masked

    still = dataclasses.replace(bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(cfg.random_seed)
    model = build_model(cfg, still, d.device)
    rows = slice_rows(batch, 0, min(CHECK_ROWS, len(batch.lengths)))
    n, masked = len(rows.lengths), step_masked(rows, d)
    unscaled = torch.amp.GradScaler(d.device.type, enabled=False)
    sums = forward_backward(Objective(model), None, rows, n, (masked, n), d, autocast, unscaled,
                            packed, False)  # fmt: skip
    loss = sums[SUMS.index("masked_lm_loss")] / max(int(masked), 1)
    loss += sums[SUMS.index("next_sentence_loss")] / n
    return signature(model, float(loss))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trial_process(target: str, job: str, result: str) -> None:
    """A trial process (`run_trial`): `target` (module:function) with the pickled job's
    (trial, options) and the result file's path."""
    module, function = target.split(":")
    with open(job, "rb") as f:
        trial, options = pickle.load(f)
    getattr(importlib.import_module(module), function)(trial, options, result)
