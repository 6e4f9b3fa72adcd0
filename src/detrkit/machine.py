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


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of returning it to the system.

    By default glibc serves every allocation above 128 KiB-32 MiB with a fresh ``mmap`` and unmaps
    it on free, so each new feature map of a CPU forward or backward is first zero-filled page by
    page by the kernel. DETR's CPU training step at 800x1066 spends about a sixth of its time there
    (``bench/train_step_vs_transformers.py --allocator``). With mmap off and the trim threshold at
    1 GiB, freed blocks stay in the heap and are reused, as jemalloc or tcmalloc (the allocators
    PyTorch's CPU tuning guide recommends) would do; the process keeps its peak memory reserved.

    Process-wide and idempotent; the ``detrkit`` command calls it unless the environment sets
    ``DETRKIT_MALLOC=system``. Returns False where malloc is not glibc's (macOS, Windows, musl),
    which is then left as it is.
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: musl's mallopt does nothing
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**30))
