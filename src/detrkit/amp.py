"""Mixed precision: what ``amp="auto"`` means on a device, and the autocast context of a choice."""

from __future__ import annotations

import contextlib

import torch


def resolve_amp(amp: str, device: torch.device) -> str:
    """The mixed precision ``amp`` means on ``device``: ``"auto"`` becomes ``"bf16"`` on a CPU with
    native bf16 arithmetic (AVX512-BF16 or AMX), where a cpu-tiny training step measured 0.75x the
    fp32 time (bench/profile_step.py), and ``"none"`` everywhere else: without those instructions
    bf16 is emulated and several times slower, and on CUDA it was not measured for these sizes."""
    if amp != "auto":
        return amp
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "none"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot products (AVX512-BF16 or AMX); False where torch cannot tell."""
    # Private probes of torch.cpu (present in recent releases): without them, assume no.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def amp_autocast(device: torch.device, amp: str):
    """The autocast context of a resolved ``amp`` ("none", "bf16" or "fp16") on ``device``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def outputs_to_float(outputs: dict) -> dict:
    """Model outputs (tensors, and the lists of dicts of the auxiliary outputs) in fp32: what loss
    and post-processing read, whatever precision the forward ran in."""

    def to_float(value):
        if isinstance(value, torch.Tensor):
            return value.float()
        if isinstance(value, list):
            return [{k: to_float(v) for k, v in item.items()} for item in value]
        return value

    return {k: to_float(v) for k, v in outputs.items()}
