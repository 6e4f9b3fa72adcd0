"""One training epoch: the loop, nothing else."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..amp import amp_autocast
from ..data.collate import Batch, SkipTracker
from ..distributed import (
    all_processes,
    any_process,
    is_main_process,
    sum_over_processes,
    union_over_processes,
)
from ..models.criterion import SetCriterion
from ..models.detr import unwrap
from .aids import TrainingAids


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss keeps being non-finite)."""


@dataclass
class TrainState:
    """Counters that survive across epochs and into checkpoints."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    bad_streak: int = 0  # consecutive non-finite losses
    best_metric: float = -math.inf  # best monitored value so far (negated for a loss: higher is better)
    patience_best: float = -math.inf  # the value that last reset the early-stopping count
    evals_without_improvement: int = 0
    stop_reason: str | None = None  # why the run ended before its epochs (early stopping)
    train_seconds: float = 0.0  # wall-clock time spent training (evaluation excluded)
    backbone_pretrained: bool = False  # the dense pretraining stage is done
    pretrain_seconds: float = 0.0  # of train_seconds, the pretraining stage's
    history: list[dict] = field(default_factory=list)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batch_norm_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The running statistics that a training-mode forward updates (BatchNorm layers that train
    and track them): what a step that is then skipped must put back."""
    return [
        buffer
        for m in model.modules()
        if isinstance(m, _BATCH_NORMS) and m.training and m.track_running_stats
        for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buffer is not None
    ]


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` that hold a NaN or an infinity."""
    return [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def refuse_non_finite(model: nn.Module, what: str, run_dir: object) -> None:
    """Raise :class:`TrainingError` naming the tensors of ``model`` that are not finite: such a
    model is not ``what`` ("saved", "evaluated"), and the last good checkpoint stays as it is."""
    bad = non_finite_tensors(model)
    if bad:
        raise TrainingError(
            f"the model's {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} hold NaN or infinite "
            f"values: it is not {what}, and the last good checkpoint in {run_dir} is untouched. "
            "Lower the learning rate, or check the data."
        )


def _micro_batch_groups(
    loader: Iterable[Batch], size: int, skips: SkipTracker | None
) -> Iterator[list[Batch]]:
    """``loader``'s batches in groups of ``size`` (one optimizer step each; the last may be shorter)."""
    group: list[Batch] = []
    for batch in loader:
        if skips is not None:
            skips.update(batch.skipped)
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def train_one_epoch(
    model: nn.Module,
    criterion: SetCriterion,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    state: TrainState,
    *,
    clip_max_norm: float = 0.1,
    grad_accum: int = 1,
    amp: str = "none",
    scaler: torch.amp.GradScaler | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    max_steps: int | None = None,
    max_bad_steps: int = 5,
    skips: SkipTracker | None = None,
    progress: Callable[[dict[str, float]], None] | None = None,
    lr_factor: Callable[[], float] | None = None,
) -> dict[str, float]:
    """Train for one pass over ``loader`` (or until ``max_steps`` optimizer steps in total).

    Every ``grad_accum`` batches make one optimizer step whose losses are normalised over all of
    them (:class:`LossNorm`), so the step equals one on their union. Under DDP every process joins
    the same collectives in every step, whatever its data did: the decisions to skip a step (a
    process whose batches of the step were all unreadable, a non-finite loss anywhere) are taken
    together, and the gradients are synchronised once, by the last backward of the step.

    ``lr_factor``, when given, is called before every optimizer step: each parameter group's rate
    becomes its ``initial_lr`` times the factor (the per-step schedules of :mod:`detrkit.training.schedule`).

    Returns the mean over steps (and processes) of every loss, weighted ``loss`` included.
    """
    model.train()
    criterion.train()
    weight_dict = criterion.weight_dict
    sums: dict[str, float] = {}
    count = 0
    images = 0
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    consumed = 0  # batches read since the last progress report
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    # Denoising queries are built from the ground truth: that aid takes the targets too.
    takes_targets = isinstance(inner, TrainingAids) and inner.denoising_groups > 0
    norm_buffers = batch_norm_buffers(model)  # the same tensors all epoch (updated in place)
    for group in _micro_batch_groups(loader, grad_accum, skips):
        if max_steps is not None and state.step >= max_steps:
            break
        consumed += len(group)
        usable = [b for b in group if len(b)]
        norm = criterion.loss_norm([b.targets for b in usable], device=device)  # one collective
        # Skip together when any process has nothing to train on in this step: alone, it could not
        # join the gradient synchronisation that the others' backward passes wait for.
        if any_process(not usable, device):
            continue
        step_losses: dict[str, torch.Tensor] = {}
        finite = torch.ones((), dtype=torch.bool, device=device)
        # The forward updates BatchNorm's running statistics before the loss is known to be finite:
        # keep them, so that a skipped step leaves no trace (one NaN would poison them for good).
        norm_before = [b.clone() for b in norm_buffers]
        for i, batch in enumerate(usable):
            batch = batch.to(device, non_blocking=True)
            sync = contextlib.nullcontext()
            if i < len(usable) - 1 and isinstance(model, nn.parallel.DistributedDataParallel):
                sync = model.no_sync()  # gradients are all-reduced once, by the step's last backward
            with sync:
                with amp_autocast(device, amp):
                    if takes_targets:
                        outputs = model(batch.images, batch.padding_mask, batch.targets)
                    else:
                        outputs = model(batch.images, batch.padding_mask)
                loss_dict = criterion(outputs, batch.targets, norm)
                loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
                finite &= torch.isfinite(loss.detach())  # read once per step, not per batch
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
            # Losses are normalised over the whole step: add them up; logging-only metrics average.
            loss_dict["loss"] = loss
            for key, value in loss_dict.items():
                share = 1.0 if key in weight_dict or key == "loss" else 1.0 / len(usable)
                step_losses[key] = step_losses.get(key, 0.0) + value.detach().float() * share
            images += batch.images.shape[0]

        if not all_processes(bool(finite), device):
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, before in zip(norm_buffers, norm_before, strict=True):
                    buffer.copy_(before)
            state.bad_streak += 1
            ids = [int(t["image_id"]) for b in usable for t in b.targets]
            warnings.warn(
                f"non-finite loss at step {state.step}, image ids {ids}: step skipped on every process "
                f"({state.bad_streak} in a row)",
                stacklevel=2,
            )
            if state.bad_streak >= max_bad_steps:
                raise TrainingError(
                    f"stopping: {state.bad_streak} consecutive non-finite losses (last at image ids {ids}). "
                    "The last good checkpoint is untouched; lower the learning rate or check these images."
                )
            continue
        state.bad_streak = 0
        if lr_factor is not None:
            factor = lr_factor()
            for param_group in optimizer.param_groups:
                param_group["lr"] = param_group["initial_lr"] * factor
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip_max_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if ema is not None:
            ema.update_parameters(unwrap(model))

        for key, value in step_losses.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        count += 1
        if progress is not None and is_main_process():
            progress(
                {
                    "loss": sums["loss"] / count,
                    "lr": optimizer.param_groups[0]["lr"],
                    "img/s": images / (time.perf_counter() - start),
                    "batches": consumed,
                }
            )
            consumed = 0
    # One collective for the epoch's means: every process has the same loss names (same config).
    keys = union_over_processes(sorted(sums))
    totals = sum_over_processes([sums.get(k, 0.0) for k in keys] + [float(count)], device)
    steps = max(totals[-1], 1.0)
    return {k: v / steps for k, v in zip(keys, totals[:-1], strict=True)}
