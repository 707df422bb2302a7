"""The only module that touches torch.distributed.

bertforge does not launch processes: `torchrun` does (one process per GPU, any number of
nodes), and sets RANK, WORLD_SIZE and LOCAL_RANK, which `setup` reads. Without them training
runs in one process. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from bertforge.errors import UserError
from bertforge.malloc import keep_freed_memory
from bertforge.workers import cap_torch_threads


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> Dist:
    """Join the process group when launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu.")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device: {device!r} is not one of auto, cpu, cuda.")
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    use_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def local_processes() -> int:
    """How many of the job's processes run on this machine (torchrun's LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def use_device(dev: torch.device) -> None:
    """Set this process up to train on `dev` (a training process, or a --tune trial's): the
    current CUDA device, or on a CPU the thread cap and malloc's keeping of freed memory."""
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        cap_torch_threads()
        keep_freed_memory()  # a CPU step's tensors: reused, not faulted in anew (malloc.py)


def waiting_group(d: Dist) -> Any:
    """A gloo group whose operations wait up to 30 days: for processes that wait while
    process 0 does hours of single-process work (`bertforge run`'s vocab and data stages).
    The default group keeps its usual timeout, which catches a hung training step."""
    return dist.new_group(backend="gloo", timeout=timedelta(days=30)) if d.world > 1 else None


def broadcast_word(word: str | None, d: Dist, group: Any) -> str:
    """Process 0's word, on every process (the others pass None)."""
    box = [word]
    if d.world > 1:
        dist.broadcast_object_list(box, src=0, group=group)
    assert box[0] is not None
    return box[0]


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def shutdown(d: Dist) -> None:
    """Leave the process group in order, once every process is done: after an error, never
    (`leave`)."""
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def grouped() -> bool:
    """Whether this process is in a process group (one of a torchrun job's)."""
    return dist.is_available() and dist.is_initialized()


def leave(code: int) -> None:
    """End this process at once with `code`, its error said, where it is in a process group
    (`grouped`); return where it is alone. After an error on one process, the others may be
    waiting for it inside a collective (the next step's all-reduce, while process 0 finds
    the disk full), and shutting the group down then can hang instead of ending: NCCL waits
    for the collective (torchtitan calls destroy_process_group only after a clean run for
    this, its PR 1342), and gloo's destructor was seen here to deadlock, joining a worker
    thread that waited for the GIL it held. Python's own exit would run that destructor
    too, so the process leaves with os._exit, its output flushed; torchrun then stops the
    others."""
    if not grouped():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# What a collective raises on the processes left when another one of the run has gone:
# gloo's, as its socket sees the other end close (or reset, where the one that left had
# unread bytes from this one; a write to it then fails), and NCCL's.
PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote process exited",
    "NCCL communicator was aborted",
)


def peer_gone(e: BaseException) -> str | None:
    """One line for a collective that failed because another process of the run stopped (its
    own error says why): a traceback through torch's internals would bury that error."""
    if not isinstance(e, RuntimeError):
        return None
    why = next((m for m in PEER_GONE if m in str(e)), None)
    if why is None:
        return None
    rank = os.environ.get("RANK", "?")
    return (
        f"bertforge: error: process {rank} stops: another process of this run stopped "
        f"({why}); its own error, above or in its log, says why."
    )


def gpu_neighbours(d: Dist) -> list[str]:
    """Other processes holding memory on this GPU (a suspended job often does), via nvidia-smi."""
    if d.device.type != "cuda":
        return []
    try:
        uuid = torch.cuda.get_device_properties(d.device).uuid
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-compute-apps=gpu_uuid,pid,process_name,used_memory",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError, AttributeError):
        return []
    ours = str(uuid).removeprefix("GPU-")
    found = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4 or parts[1] == str(os.getpid()):
            continue
        if parts[0].removeprefix("GPU-") == ours:
            found.append(f"pid {parts[1]} ({parts[2]}) holds {parts[3]} MiB")
    return found


def gather_objects(obj: object, d: Dist) -> list[object]:
    """obj from every rank, in rank order (used for per-rank RNG states in checkpoints)."""
    if d.world == 1:
        return [obj]
    out: list[object] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out
