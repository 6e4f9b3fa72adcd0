"""Small helpers over ``torch.distributed`` that also work in a single process."""

from __future__ import annotations

import os

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


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over all processes (``value`` itself in a single process)."""
    if not is_dist():
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def pick_device(preference: str = "auto") -> torch.device:
    """``"auto"``: this process's GPU (``LOCAL_RANK`` under torchrun) if there is one, else the CPU."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(preference)
