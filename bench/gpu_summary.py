"""The figures of a GPU round's logs in one table: `bash bench/gpu_round.sh` writes a log per
stage (STAGE.log, the bench's JSON its last line per run); this reads them back.

    python bench/gpu_summary.py DIR_OR_LOG ...

For every `bench/train_throughput.py` run: a Markdown row per side (tokens/s, ms a step,
against the peer, MFU and, where the last layer is pruned, the share of the FLOPs the step
does, peak memory, warm-up, and with --profile the device time by kind of kernel, and a line
of the host's waits for the device and the ops that made them; a side that failed, with its
error; a run cut short, with its figures so far); for `bench/optimizer_update.py`: ms an
update per side; for `bench/attention_kernel.py`: ms of each side's attention; for
`bench/feed_forward.py`: ms of each side's feed-forward and the product's TFLOP/s; for
`bench/loader_contention.py`: ms a step per loader; for `bench/tune_check.py`: each option's
gradients against the default step's in fp32, and its margin; for `bertforge train --tune`: each
trial's line and the choice, and the run's last progress line (tokens/s, MFU); for pytest:
its summary line, and the failures it listed; a bench's refusal of its command line. Also
the stage times `all` printed. Nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

PYTEST = re.compile(r"^=*\s*(?:\d+ (?:passed|failed|skipped|errors?|deselected)[, ]*)+.*$")
USAGE = re.compile(r"^\S+\.py: error: ")  # a bench refused its command line
ROUND = re.compile(r"^round \d+: tokens/s so far: ")
STAGE_TIME = re.compile(r"^== \S+?(?: took \d+ s|: skipped, .*|: exit \d+)$")
TRAIN_STEP = re.compile(r"^step \d+/\d+ \| ")  # `bertforge train`'s progress line


def shares(side: dict[str, Any]) -> str:
    """'matmul 45%, elementwise 29%, ...' of a profiled side's device time."""
    got = side.get("device_time_shares") or {}
    return ", ".join(f"{kind} {share:.0%}" for kind, share in got.items())


def throughput_rows(run: dict[str, Any], stage: str) -> list[str]:
    rows = []
    for name, side in run["layouts"].items():
        ratio = f"{side['ratio']:.2f}x" if side.get("ratio") else "-"
        mfu = f"{side['mfu']:.1%}" if side.get("mfu") is not None else "-"
        done = side.get("mfu_executed")
        if done is not None and done != side["mfu"]:  # the pruned last layer's skipped FLOPs
            mfu += f" ({done:.1%} of FLOPs done)"
        memory = side.get("peak_memory_gib")
        rows.append(
            f"| {stage} | {run['model_size']} {run['seq_len']} x {run['batch_size']} | {name} "
            f"| {side['tokens_per_s']:,.0f} | {side['step_ms']:.1f} | {ratio} | {mfu} "
            f"| {memory if memory is not None else '-'} | {side['warmup_s']:.0f} "
            f"| {shares(side)} |"
        )
    if run.get("peer_tokens_per_s"):
        peer_mfu = f"{run['peer_mfu']:.1%}" if run.get("peer_mfu") is not None else "-"
        rows.append(
            f"| {stage} | {run['model_size']} {run['seq_len']} x {run['batch_size']} | peer "
            f"| {run['peer_tokens_per_s']:,.0f} | {run['peer_step_ms']:.1f} | - | {peer_mfu} "
            f"| {(run.get('peak_memory_gib') or {}).get('peer', '-')} | - | |"
        )
    return rows


def wait_lines(run: dict[str, Any], stage: str) -> list[str]:
    """'STAGE SIDE: the host waited: aten::item < aten::X 2x (0.010 ms), ...' per profiled
    side whose step made the host wait for the device (a wait is named with its op)."""
    lines = []
    for name, side in run["layouts"].items():
        waits = [
            f"{call} {count:g}x ({ms:.3f} ms)"
            for call, (count, ms) in (side.get("host_calls") or {}).items()
            if " < " in call or "synchronize" in call.lower()
        ]
        if waits:
            lines.append(f"{stage} {name}: the host waited a step: {', '.join(waits)}")
    return lines


def optimizer_line(run: dict[str, Any], stage: str) -> str:
    sides = {k.removesuffix("_ms"): v for k, v in run.items() if k.endswith("_ms") and v}
    what = ", ".join(f"{side} {ms:.2f} ms" for side, ms in sides.items())
    return f"{stage}: {run['model_size']} update ({run['gb_per_update']} GB): {what}"


def attention_line(run: dict[str, Any], stage: str) -> str:
    """bench/attention_kernel.py's figures: ms of each side, forward and forward + backward
    (and the padded attention's forward + backward)."""
    return (
        f"{stage}: one layer's attention, {run['model_size']} {run['seq_len']} x "
        f"{run['batch_size']} ({run['tokens']:,} tokens, dropout {run['dropout']}): forward "
        f"ours {run['ours_fwd_ms']:.3f} ms, {run['theirs']} {run['theirs_fwd_ms']:.3f} ms "
        f"({run['ratio_fwd']:.2f}x); forward + backward ours {run['ours_fwd_bwd_ms']:.3f} ms, "
        f"theirs {run['theirs_fwd_bwd_ms']:.3f} ms ({run['ratio_fwd_bwd']:.2f}x), padded "
        f"{run['padded_fwd_bwd_ms']:.3f} ms ({run['padded_ratio_fwd_bwd']:.2f}x); largest "
        f"difference without dropout {run['max_abs_diff_without_dropout']:.2g}"
    )


def feed_forward_line(run: dict[str, Any], stage: str) -> str:
    """bench/feed_forward.py's figures: ms of each side's forward + backward, and the
    forward's product alone, Triton's against cuBLAS's."""
    return (
        f"{stage}: one layer's feed-forward, {run['model_size']} ({run['tokens']:,} tokens): "
        f"forward + backward --fused-ffn {run['fusedffn_fwd_bwd_ms']:.3f} ms, --fused-gelu "
        f"{run['fusedgelu_fwd_bwd_ms']:.3f} ms ({run['ratio_fwd_bwd_vs_fusedgelu']:.2f}x), "
        f"plain {run['plain_fwd_bwd_ms']:.3f} ms ({run['ratio_fwd_bwd_vs_plain']:.2f}x); the "
        f"product alone Triton {run['product_triton_tflops']} TFLOP/s, cuBLAS "
        f"{run['product_cublas_tflops']} TFLOP/s; largest difference {run['max_abs_diff']:.2g}"
    )


def check_lines(run: dict[str, Any], stage: str) -> list[str]:
    """bench/tune_check.py's figures: per option, how far its gradients are from the default
    step's in fp32, the default step's own, and its margin under --tune's rule."""
    lines = []
    for r in run["results"]:
        verdict = "passes" if r["margin"] <= 0 else "FAILS"
        lines.append(
            f"{stage}: {run['model_size']} {run['precision']}, {r['layout']} {r['option']}: "
            f"{100 * r['from_fp32']:.2f}% from fp32 (the default step "
            f"{100 * r['default_from_fp32']:.2f}%), {100 * r['from_default']:.2f}% from the "
            f"default step, margin {100 * r['margin']:+.2f}% in {r['margin_at']} "
            f"({100 * r['margin_distance']:.2f}% against {100 * r['margin_limit']:.2f}%): {verdict}"
        )
    return lines


def summarize(log: Path) -> tuple[list[str], list[str]]:
    """(table rows, other lines) of one stage's log."""
    stage = log.stem
    rows: list[str] = []
    lines: list[str] = []
    so_far = None  # a throughput run's last "round N: tokens/s so far" before its JSON
    trained = None  # `bertforge train`'s last progress line
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        text = line.strip()
        if ROUND.match(text):
            so_far = text
        elif text.startswith("{") and text.endswith("}"):
            try:
                run = json.loads(text)
            except json.JSONDecodeError:
                continue
            if "layouts" in run or "failed" in run:
                so_far = None
            for side, why in (run.get("failed") or {}).items():  # a throughput side
                lines.append(f"{stage} {side}: failed, left out: {why}")
            if "layouts" in run:
                rows += throughput_rows(run, stage)
                lines += wait_lines(run, stage)
            elif "ratio_fwd_bwd" in run:
                lines.append(attention_line(run, stage))
            elif "ratio_fwd_bwd_vs_fusedgelu" in run:
                lines.append(feed_forward_line(run, stage))
            elif "gb_per_update" in run:
                lines.append(optimizer_line(run, stage))
            elif "rounding" in run:
                lines += check_lines(run, stage)
            elif "thread_over_precomputed_ms" in run:
                steps = ", ".join(f"{k} {v:.2f}" for k, v in run["ms_per_step"].items())
                lines.append(f"{stage}: a host-bound step with batches of {run['batch_size']} "
                             f"made beside it, ms: {steps}")  # fmt: skip
        elif PYTEST.match(text) or text.startswith(("FAILED ", "ERROR ")) or USAGE.match(text):
            lines.append(f"{stage}: {text.strip('= ')}")
        elif STAGE_TIME.match(text):
            lines.append(text)
        elif text.startswith("tune: "):  # train --tune: each trial, and the choice
            lines.append(f"{stage}: --tune: {text.removeprefix('tune: ')}")
        elif TRAIN_STEP.match(text):
            trained = text
    if trained:
        lines.append(f"{stage}: trained, last: {trained}")
    if so_far:
        lines.append(f"{stage}: cut short, {so_far}")
    return rows, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="stage logs, or folders of them")
    args = ap.parse_args()
    logs = [
        log
        for path in args.paths
        for log in (sorted(path.glob("*.log")) if path.is_dir() else [path])
    ]
    if not logs:
        ap.error(f"no .log files in {', '.join(map(str, args.paths))}")
    rows: list[str] = []
    lines: list[str] = []
    for log in logs:
        got_rows, got_lines = summarize(log)
        rows += got_rows
        lines += got_lines
    if rows:
        print("| stage | model, seq x batch | side | tokens/s | ms/step | vs peer | MFU "
              "| peak GiB | warm-up s | device time |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    if lines:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
