"""What the machine's processor does in which precision: whether a CPU multiplies bf16 in
hardware, the precision `--precision auto` picks (training, `embed`), and the autocast a
precision runs under. Its own module, light to import: `embed` uses it without train.py."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from bertforge.errors import UserError


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (`bf16_in_hardware`)."""
    return bf16_in_hardware(torch.cpu)


def bf16_in_hardware(cpu: Any) -> bool:
    """Whether torch's CPU probes (`cpu`: torch.cpu) find bf16 matrix products in hardware:
    Intel's AMX tiles (Xeon 4th generation and later), where bf16 autocast trains BERT-mini
    and -small 2.1x and 2.5x faster than fp32 (bench/RESULTS.md, session 21), or AVX512-BF16
    (AMD's Zen 4 and later, Intel's Cooper Lake), where it trained BERT-mini 1.9x and
    BERT-small 2.0x faster on an AMD EPYC (session 41). Elsewhere bf16 is emulated, and
    slower. The probes are private: a torch without them trains in fp32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it (else fp16), and on a CPU that multiplies bf16 in
    hardware; fp32 on any other CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if cpu_has_bf16() else torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU; use fp32 or bf16 on a CPU.")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast_to(dtype: torch.dtype, device: torch.device) -> Any:
    """The context a step runs in: autocast to bf16/fp16, nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def precision_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
