"""What a timing says about the machine it ran on: timings compare only within one machine."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from .amp import cpu_has_native_bf16


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), and whether it has native bf16 arithmetic."""
    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    bf16 = cpu_has_native_bf16()
    return f"{name or 'unknown CPU'}{', native bf16' if bf16 else ''}"


def describe(threads: int | None = None) -> str:
    """``x86_64 (AMD EPYC, native bf16), 2 threads, torch 2.14.1``, and the GPU where one is used."""
    threads = torch.get_num_threads() if threads is None else threads
    text = f"{platform.machine()} ({cpu_model()}), {threads} threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text
