"""The only module that touches torch.distributed.

bertforge does not launch processes: `torchrun` does (one process per GPU, any number of
nodes), and sets RANK, WORLD_SIZE and LOCAL_RANK, which `setup` reads. Without them training
runs in one process. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
import subprocess
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
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


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
