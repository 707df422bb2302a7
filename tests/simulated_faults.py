"""`bertforge` under torchrun with faults one process meets on cue: a CPU can neither run out
of memory nor fill its disk when a test wants.

Out of memory: a micro-batch of more than SIMULATED_OOM_ABOVE instances raises CUDA's
out-of-memory error on process SIMULATED_OOM_RANK, in evaluations only where
SIMULATED_OOM_EVAL is set; with SIMULATED_OOM_CALL instead, its Nth training forward pass
does, mid-run (the CPU's error with SIMULATED_OOM_CPU). For test_train.py's multi-process
out-of-memory tests.

A full disk: with SIMULATED_FULL_DISK_STEP, process 0 (the one that writes) finds the disk
full halfway through writing that step's checkpoint.
"""

import errno
import os
import sys

import torch

from bertforge.cli import main
from bertforge.model import BertForPretraining

real = BertForPretraining.pretraining_logits
calls = [0]  # training forward passes on this process


def small_memory(self, input_ids, token_type_ids, lengths, masked_positions, *rest, **kw):
    above = int(os.environ.get("SIMULATED_OOM_ABOVE", 1 << 30))
    here = os.environ["RANK"] == os.environ.get("SIMULATED_OOM_RANK")
    if here and self.training and "SIMULATED_OOM_CALL" in os.environ:
        calls[0] += 1
        if calls[0] == int(os.environ["SIMULATED_OOM_CALL"]):
            if "SIMULATED_OOM_CPU" in os.environ:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory (simulated)")
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    here = here and not (self.training and os.environ.get("SIMULATED_OOM_EVAL"))
    if here and masked_positions.shape[0] > above:  # instances, padded or packed
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    return real(self, input_ids, token_type_ids, lengths, masked_positions, *rest, **kw)


real_save = torch.save


def full_disk(obj, f, *args, **kw):
    step = os.environ.get("SIMULATED_FULL_DISK_STEP")
    if os.environ["RANK"] == "0" and isinstance(obj, dict) and str(obj.get("step")) == step:
        f.write(b"the first bytes of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save(obj, f, *args, **kw)


if __name__ == "__main__":
    BertForPretraining.pretraining_logits = small_memory
    torch.save = full_disk
    sys.exit(main(sys.argv[1:]))
