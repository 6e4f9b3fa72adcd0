"""Small helpers over ``torch.distributed`` that also work in a single process."""

from __future__ import annotations

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
