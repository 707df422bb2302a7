"""What the benchmarks share: running a command while measuring it, running bertforge in
process, the English corpus, reading a GPU kernel's SASS, and a GPU's memory bandwidth."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def made_once(directory: Path, write: Callable[[Path], None]) -> int:
    """A benchmark's synthetic data, written by `write(PATH)` unless `directory` is there:
    into DIRECTORY.partial, renamed when whole, so that a write cut short is never taken for
    the data. Its files' bytes."""
    if not directory.exists():
        start = time.perf_counter()
        write(directory.with_suffix(".partial"))
        directory.with_suffix(".partial").rename(directory)
        print(f"wrote {directory} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return sum(p.stat().st_size for p in directory.iterdir())


def machine() -> str:
    """The first words of a benchmark's first line: the machine, its cores, Python."""
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )


def tree_rss_mb(root: int) -> float:
    """Resident memory of a process and all its descendants, summed (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total / 2**20


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """Run cmd; return (wall seconds, peak RSS MB of the largest single process, peak RSS MB of
    the whole process tree, sampled every 0.1 s)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})  # fmt: skip
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if status != 0:
        assert proc.stderr is not None
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-3000:]}")
    single = usage.ru_maxrss / 1024
    return wall, single, max(peak[0], single)


def side_json(cmd: list[str]) -> dict[str, Any]:
    """Run one side of a benchmark in a fresh process: the JSON object of its last line."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def corpus_file(work: Path, mb: float, corpus: str = "english") -> Path:
    """Build a benchmark corpus (`corpora.py`: english, 27 MB, repeated to reach `mb`; or
    turkish, 7.6 MB) in a child process: a forked child's peak RSS counts the parent's
    pages, so the benchmark process itself must stay small."""
    path = work / f"{corpus}_{mb:g}mb.txt"
    once = {"english": 27, "turkish": 7.6}[corpus]  # MB of text, about
    if not path.exists():
        subprocess.run(
            [sys.executable, str(HERE / "corpora.py"), corpus, "--output", str(path),
             "--work", str(work / "debs"), "--repeat", str(int(mb // once) + 1),
             "--max-mb", str(mb)],
            check=True,
        )  # fmt: skip
    return path


def demo_bench(p: argparse.ArgumentParser, name: str) -> tuple[argparse.Namespace, Path, list[str]]:
    """A bench on the demo corpus: its arguments (with --work, default bench/work/NAME), the
    work directory, made, and the corpus's documents (its chapters), each a text of lines (a
    verse per line)."""
    import gzip

    from bertforge.cli import demo_corpus

    p.add_argument("--work", default=f"bench/work/{name}")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = gzip.decompress(demo_corpus().read_bytes()).decode("utf-8")
    return args, work, [c for c in text.split("\n\n") if c.strip()]


def bertforge(*argv: str) -> None:
    """Run a bertforge command in this process; stop the benchmark if it fails."""
    from bertforge.cli import main

    code = main(list(argv))
    if code != 0:
        raise SystemExit(f"bertforge {' '.join(argv)}: exit {code}")


def eval_records(run: Path) -> list[dict]:
    """The evaluation records of a training directory's metrics.jsonl."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("eval")]


# The continued-pretraining benchmarks (new_words, transfer_vocab): a general-domain model,
# then the King James Bible, at this shape.
QUIET = "--no-progress"
SHAPE = ["--max-seq-length", "64", "--max-predictions-per-seq", "10"]


def general_model_flags(p: argparse.ArgumentParser, work: str) -> None:
    """The flags of the general-domain model and of the runs that continue it."""
    p.add_argument("--general", required=True, help="general-domain corpus (GCIDE text)")
    p.add_argument("--work", default=work)
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--vocab-size", type=int, default=8000, help="the general model's")
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=200, help="steps on the new domain")
    p.add_argument("--batch-size", type=int, default=64)


def pretrain_general(args: argparse.Namespace, work: Path) -> None:
    """The general-domain model, from nothing in `work` (emptied): its own vocabulary
    (work/vocab), data (work/data) and args.base_steps steps of training (work/base)."""
    shutil.rmtree(work, ignore_errors=True)
    bertforge("vocab", "--input", args.general, "--output", str(work / "vocab"),
              "--vocab-size", str(args.vocab_size), QUIET)  # fmt: skip
    bertforge("data", "--input", args.general, "--vocab", str(work / "vocab"),
              "--output", str(work / "data"), *SHAPE, QUIET)  # fmt: skip
    bertforge("train", "--data", str(work / "data"), "--output", str(work / "base"),
              "--model-size", args.model_size, "--train-batch-size", str(args.batch_size),
              "--num-train-steps", str(args.base_steps), "--learning-rate", "1e-3",
              "--eval-every", str(args.base_steps), QUIET)  # fmt: skip


class ToolchainOnly:
    """Stands for Triton's CUDA driver where no GPU is: the sm_90 target to compile for, so that
    torch can read from a user-defined kernel's TTIR which tensors it writes (without it, it
    takes every tensor argument as written: inductor copies each before the call)."""

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


# Memory bandwidth (GB/s, the datasheets') of the GPUs the benchmarks' byte floors are
# counted for: the first entry whose name a device's name contains (torch's names: "NVIDIA
# H100 80GB HBM3" is the SXM card, "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", ...).
PEAK_GBPS = (
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),
    ("H200", 4800.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
)
# what the census and the counts assume without a device: an H200's (the GPU of the rounds
# so far)
DEFAULT_GBPS = 4800.0


def peak_gbps(device_name: str) -> float | None:
    """The memory bandwidth of a GPU by its name (`torch.cuda.get_device_name()`), or None
    for one not in PEAK_GBPS."""
    return next((gbps for part, gbps in PEAK_GBPS if part in device_name), None)


def kernel_device(ap: argparse.ArgumentParser, args: argparse.Namespace, entry: str) -> Any:
    """A kernel benchmark's device (args.device) and dtype: bf16 on CUDA, fp32 on a CPU under
    Triton's interpreter (a check of the script there); args.peak_gbps filled in with a known
    GPU's bandwidth where not given; refused (naming kernels.ENTRY) where bertforge's Triton
    kernels do not run."""
    import torch

    from bertforge import kernels

    device = torch.device(args.device)
    if args.peak_gbps is None and device.type == "cuda":
        args.peak_gbps = cuda_gbps(device)
    if not kernels.usable(torch.empty(0, device=device)):
        ap.error(f"kernels.{entry} does not run on {device} here (CUDA with Triton, or a CPU "
                 "under TRITON_INTERPRET=1)")  # fmt: skip
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def ms_per_call(fn: Any, steps: int, device: Any, grad: Any = None, leaves: Any = ()) -> float:
    """Milliseconds a call of fn takes over `steps` calls on `device`, synchronized around
    them: its forward alone under no_grad, or with `grad` its forward and backward (fn()'s
    output's gradient), the `leaves`' gradients dropped after each."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        if grad is not None:
            fn().backward(grad)
            for leaf in leaves:
                leaf.grad = None
        else:
            with torch.no_grad():
                fn()
    sync()
    return (time.perf_counter() - start) * 1e3 / steps


def cuda_gbps(device: Any = None) -> float | None:
    """The memory bandwidth of this machine's CUDA device (torch's current one by default),
    or None without CUDA or for a GPU not in PEAK_GBPS."""
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_gbps(torch.cuda.get_device_name(device))


def sm90_compile(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    warps: int,
    aligned: bool = False,
    stages: int = 3,
    divisible: tuple[str, ...] = (),
) -> Any:
    """A Triton kernel through Triton's whole CUDA pipeline for sm_90 (H100, H200; ptxas
    included, no GPU needed): the compiled kernel. signature: every argument's type,
    "constexpr" for constexprs' values. aligned: its pointers and *_stride arguments multiples
    of 16, as Triton specializes a launch whose values are (its loads then vectorized).
    stages: the software pipeline's (Triton's num_stages; 3 is its default). divisible: other
    integer arguments a multiple of 16 (with aligned), as a launch's sizes may be."""
    import triton
    from triton.backends.compiler import GPUTarget

    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if aligned
        and name in signature
        and (name.endswith(("_ptr", "_stride")) or name in divisible)
    }
    source = triton.compiler.ASTSource(
        fn=fn, signature=signature, constexprs=constexprs, attrs=attrs
    )
    options = {"num_warps": warps, "num_stages": stages}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


# cuobjdump's start-up (its disassembler's tables) takes about 0.35 s a cubin whatever its
# size: most of a step's census, which reads some 80 kernels. What it prints is kept here by
# the cubin's hash, as Triton keeps its cubins by their source's.
SASS_CACHE = Path(
    os.environ.get("BERTFORGE_SASS_CACHE") or Path.home() / ".cache" / "bertforge" / "cuobjdump"
)


def cuobjdump(cubin: bytes, flag: str, workdir: Path) -> str:
    """What cuobjdump from Triton's wheel prints for a cubin with `flag` (-sass, -res-usage);
    from SASS_CACHE when that cubin was read with that flag and that Triton before."""
    import triton

    key = hashlib.sha256(f"{triton.__version__} {flag} ".encode() + cubin).hexdigest()
    kept = SASS_CACHE / key[:2] / key
    if kept.exists():
        return kept.read_text()
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    done = subprocess.run([str(tool), flag, str(path)], capture_output=True, text=True, check=True)
    kept.parent.mkdir(parents=True, exist_ok=True)
    partial = kept.with_name(f".{key}.{os.getpid()}.tmp")  # whole or absent, for a reader
    partial.write_text(done.stdout)
    partial.replace(kept)
    return done.stdout


def sm90_sass(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    warps: int,
    workdir: Path,
    aligned: bool = False,
) -> list[str]:
    """A Triton kernel compiled for sm_90 (`sm90_compile`), as its SASS opcodes: every
    instruction but the NOPs, branches and the exit (what a thread issues on its straight
    path)."""
    compiled = sm90_compile(fn, signature, constexprs, warps, aligned)
    ops = []
    for line in cuobjdump(compiled.asm["cubin"], "-sass", workdir).splitlines():
        found = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if found and found.group(2).split(".")[0] not in ("NOP", "BRA", "EXIT"):
            ops.append(found.group(2))
    return ops
