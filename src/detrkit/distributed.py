"""Small helpers over ``torch.distributed`` that also work in a single process."""

from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    return rank() == 0


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any process (``flag`` itself in a single process)."""
    if not is_dist():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_processes(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every process (``flag`` itself in a single process)."""
    return not any_process(not flag, device)


def max_over_processes(value: float, device: torch.device) -> float:
    """The largest of every process's ``value`` (``value`` itself in a single process)."""
    if not is_dist():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def sum_over_processes(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over processes, in one collective (``values`` in one process)."""
    if not is_dist():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def union_over_processes(keys: list[str]) -> list[str]:
    """The sorted union of every process's ``keys`` (e.g. loss names: a process may have logged none)."""
    if not is_dist():
        return sorted(keys)
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, keys)
    return sorted({k for ks in gathered for k in ks or []})


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over all processes (``value`` itself in a single process)."""
    if not is_dist():
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def pick_device(preference: str | torch.device | None = "auto") -> torch.device:
    """The device ``preference`` names, checked to exist here.

    ``"auto"`` (or None): this process's GPU (``LOCAL_RANK`` under torchrun) if there is one, else
    the CPU. ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"mps"`` are refused with a
    :class:`~detrkit.errors.ConfigError` when this machine has no such device."""
    from .errors import ConfigError

    if preference is None or preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    text = str(preference)
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", text)
    if match is None:
        raise ConfigError(f"device {text!r}: expected auto, cpu, cuda, cuda:N or mps")
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {text!r}: this machine has no CUDA GPU (use cpu or auto)")
        if index is not None and int(index) >= count:
            raise ConfigError(
                f"device {text!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {text!r}: MPS (Apple GPUs) is not available on this machine")
    if kind == "cpu" and index not in (None, "0"):
        raise ConfigError(f"device {text!r}: the CPU is cpu")
    return torch.device(text)
