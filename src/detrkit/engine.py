"""One training epoch and one evaluation pass: the loops, nothing else."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .criterion import SetCriterion
from .data.collate import Batch, SkipTracker
from .distributed import all_reduce_mean, is_dist, is_main_process
from .evaluation import CocoEvaluator
from .panoptic import PostProcessPanoptic
from .postprocess import PostProcess, PostProcessSegm
from .pq import PanopticEvaluator


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss keeps being non-finite)."""


@dataclass
class TrainState:
    """Counters that survive across epochs and into checkpoints."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    bad_streak: int = 0  # consecutive non-finite losses
    best_metric: float = -1.0
    train_seconds: float = 0.0  # wall-clock time spent training (evaluation excluded)
    backbone_pretrained: bool = False  # the dense pretraining stage is done
    history: list[dict] = field(default_factory=list)


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _all_finite(value: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (so all of them skip the step together)."""
    flag = torch.tensor([1.0 if torch.isfinite(value).all() else 0.0], device=value.device)
    if is_dist():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


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
) -> dict[str, float]:
    """Train for one pass over ``loader`` (or until ``max_steps`` optimizer steps in total).

    Returns the epoch's mean of every loss (weighted ``loss`` included), averaged over processes.
    """
    model.train()
    criterion.train()
    weight_dict = criterion.weight_dict
    sums: dict[str, float] = {}
    count = 0
    micro = 0
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for batch in loader:
        if skips is not None:
            skips.update(batch.skipped)
        if max_steps is not None and state.step >= max_steps:
            break
        if len(batch) == 0:
            continue  # every sample of this batch was unreadable
        batch = batch.to(device, non_blocking=True)
        last_micro = (micro + 1) % grad_accum == 0
        sync = contextlib.nullcontext()
        if not last_micro and isinstance(model, nn.parallel.DistributedDataParallel):
            sync = model.no_sync()
        with sync:
            with _autocast(device, amp):
                outputs = model(batch.images, batch.padding_mask)
            loss_dict = criterion(outputs, batch.targets)
            loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)

            if not _all_finite(loss):
                state.bad_streak += 1
                ids = [int(t["image_id"]) for t in batch.targets]
                warnings.warn(
                    f"non-finite loss ({loss.item()}) at step {state.step}, image ids {ids}: step skipped "
                    f"({state.bad_streak} in a row)",
                    stacklevel=2,
                )
                optimizer.zero_grad(set_to_none=True)
                micro = 0
                if state.bad_streak >= max_bad_steps:
                    raise TrainingError(
                        f"stopping: {state.bad_streak} consecutive non-finite losses (last at image ids {ids}). "
                        "The last good checkpoint is untouched; lower the learning rate or check these images."
                    )
                continue
            state.bad_streak = 0
            scaled = loss / grad_accum
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        micro += 1

        if last_micro:
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
                ema.update_parameters(model)

        logged = {k: v.detach() for k, v in loss_dict.items()}
        logged["loss"] = loss.detach()
        for key, value in logged.items():
            sums[key] = sums.get(key, 0.0) + float(all_reduce_mean(value.float()))
        count += 1
        if progress is not None and is_main_process():
            progress(
                {
                    "loss": sums["loss"] / count,
                    "lr": optimizer.param_groups[0]["lr"],
                    "img/s": count * batch.images.shape[0] / (time.perf_counter() - start),
                }
            )
    return {k: v / max(count, 1) for k, v in sums.items()}


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    evaluator: CocoEvaluator | PanopticEvaluator,
    device: torch.device,
    *,
    amp: str = "none",
    criterion: SetCriterion | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Run the model over ``loader``, feed ``evaluator`` with detections in original image
    coordinates (panoptic segmentations for a :class:`PanopticEvaluator`), and return its metrics (plus the mean validation loss with ``criterion``)."""
    model.eval()
    postprocess = PostProcess()
    postprocess_masks = PostProcessSegm()
    panoptic = "panoptic" in evaluator.iou_types
    if panoptic:
        postprocess_panoptic = PostProcessPanoptic(_unwrap(model).config.is_thing)
    loss_sum, batches = 0.0, 0
    for batch in loader:
        if len(batch) == 0:
            continue
        batch = batch.to(device)
        with _autocast(device, amp):
            outputs = model(batch.images, batch.padding_mask)
        if criterion is not None:
            loss_dict = criterion(outputs, batch.targets)
            weights = criterion.weight_dict
            loss_sum += float(sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights))
            batches += 1
        orig_sizes = torch.stack([t["orig_size"] for t in batch.targets])
        image_ids = [int(t["image_id"]) for t in batch.targets]
        if panoptic:
            sizes = torch.stack([t["size"] for t in batch.targets])
            evaluator.update(image_ids, postprocess_panoptic(outputs, sizes, orig_sizes))
            if progress is not None:
                progress()
            continue
        detections = postprocess(outputs, orig_sizes)
        if "segm" in evaluator.iou_types:
            sizes = torch.stack([t["size"] for t in batch.targets])
            detections = postprocess_masks(detections, outputs, sizes, orig_sizes)
        evaluator.update(image_ids, detections)
        if progress is not None:
            progress()
    evaluator.synchronize()
    metrics = evaluator.summarize()
    if criterion is not None:
        metrics["val/loss"] = float(all_reduce_mean(torch.tensor(loss_sum / max(batches, 1), device=device)))
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
