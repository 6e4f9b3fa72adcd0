"""Learning-rate schedules.

``step`` is the paper's: the rates are divided by 10 once, after ``lr_drop`` epochs (a
``torch.optim.lr_scheduler.StepLR`` stepped per epoch). ``linear`` and ``cosine`` decay the rates to
0, step by step, over the last ``decay_fraction`` of the run (constant before it; 1.0 = the whole
run), whichever of the run's ends comes first: its epochs (or ``max_steps``) or its time budget.
So a run stopped by the clock still ends annealed instead of at its peak rate, whatever the budget
(Li, Yumer and Ramanan, "Budgeted Training", ICLR 2020, decay over the whole budget; the
"warmup-stable-decay" schedules, e.g. Hägele et al., "Scaling Laws and Compute-Optimal Training
Beyond Fixed Training Durations", NeurIPS 2024, keep the rate constant and decay over the last
~20%). For DETR, whose curve still climbs steeply at the end of a short budget, a late decay is
what pays (docs/benchmarks/convergence.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..distributed import max_over_processes

SCHEDULES = ("step", "linear", "cosine")


def lr_factor(schedule: str, progress: float, decay_fraction: float = 1.0) -> float:
    """The multiplier of the base learning rates at ``progress`` (0 = start of the run, 1 = its end)
    for the ``linear`` or ``cosine`` schedule decaying over the last ``decay_fraction`` of the run."""
    if not 0 < decay_fraction <= 1:
        raise ValueError(f"decay_fraction={decay_fraction}: must be in (0, 1]")
    p = min(max((progress - (1.0 - decay_fraction)) / decay_fraction, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - p
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"lr_factor: {schedule!r} is not a per-step schedule (linear or cosine)")


def run_progress(
    step: int, total_steps: int, seconds: float | None = None, budget_seconds: float | None = None
) -> float:
    """How far a run is: the larger of ``step / total_steps`` and, with a time budget, ``seconds``
    over ``budget_seconds`` (the run ends when either reaches 1)."""
    progress = step / max(total_steps, 1)
    if budget_seconds is not None and seconds is not None:
        progress = max(progress, seconds / max(budget_seconds, 1e-9))
    return progress


def per_step_factor(
    schedule: str,
    decay_fraction: float,
    *,
    epochs: int,
    steps_per_epoch: int,
    max_steps: int | None,
    budget_seconds: float | None,
    step: Callable[[], int],
    trained_seconds: Callable[[], float],
    device: torch.device,
) -> Callable[[], float] | None:
    """The learning-rate factor of a ``linear``/``cosine`` schedule, to be called before each
    optimizer step; None for the paper's ``step`` schedule (stepped per epoch instead).

    The schedule runs over DETR's training: ``step()`` is its optimizer step so far and
    ``trained_seconds()`` its training time so far (read at each call), ``budget_seconds`` the time
    it has (the run's budget less the backbone pretraining). With a time budget the processes take
    the largest of their clocks: all must use the same rate, or their weights drift apart."""
    if schedule == "step":
        return None
    total_steps = epochs * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)

    def factor() -> float:
        seconds = None
        if budget_seconds is not None:
            seconds = max_over_processes(trained_seconds(), device)
        progress = run_progress(step(), total_steps, seconds, budget_seconds)
        return lr_factor(schedule, progress, decay_fraction)

    return factor
