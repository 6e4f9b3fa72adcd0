"""Dense pretraining of a backbone that starts from nothing (no ImageNet weights offline).

DETR's backbone only learns through the decoder's attention, which at first is spread over the whole
image: from scratch, the class loss then sits at chance for a long time. This stage gives the
backbone a direct, dense signal first: a 1x1 convolution on its last feature map classifies every
cell into the dataset's classes or background, against the fraction of the cell each object's mask
covers (soft targets). The head is thrown away afterwards; DETR itself is unchanged. This replaces
ImageNet pretraining when there is none, on the training images only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..amp import amp_autocast
from ..data.coco import DatasetError
from ..data.collate import Batch
from ..distributed import any_process, is_dist, is_main_process
from ..errors import ConfigError
from ..models.config import DetrConfig
from ..models.detr import Detr
from .build import seed_everything, train_loader
from .config import TrainConfig

# Background cells outnumber object cells several times; weigh them down, like DETR's eos_coef.
BACKGROUND_WEIGHT = 0.2


def dense_targets(batch: Batch, num_classes: int, size: tuple[int, int], stride: int) -> Tensor:
    """Per feature cell, the fraction of it covered by each class (and background, last).

    Cell ``(i, j)`` of a stride-``s`` feature map stands for pixels ``[s*i, s*(i+1)) x [s*j, s*(j+1))``
    (ResNet's grid, which may reach past the image), so masks are padded to whole cells and averaged
    per cell. Where objects overlap, class fractions are scaled to sum to the covered part.

    Returns Tensor[B, K+1, h, w] for ``size == (h, w)``; cells wholly outside the image are all zero.
    """
    h_cells, w_cells = size
    out = torch.zeros(len(batch.targets), num_classes + 1, h_cells, w_cells, device=batch.images.device)

    def per_cell(pixels: Tensor) -> Tensor:  # Float[N, H, W] -> Float[N, h, w]
        pad_h, pad_w = h_cells * stride - pixels.shape[-2], w_cells * stride - pixels.shape[-1]
        pixels = F.pad(pixels, (0, max(pad_w, 0), 0, max(pad_h, 0)))[
            ..., : h_cells * stride, : w_cells * stride
        ]
        return F.avg_pool2d(pixels[:, None], stride)[:, 0]

    for i, target in enumerate(batch.targets):
        masks = target["masks"]
        inside = per_cell(torch.ones(1, *masks.shape[-2:], device=out.device))[0]
        classes = out[i, :num_classes]
        if len(masks):
            classes.index_add_(0, target["labels"].to(out.device), per_cell(masks.float()))
        total = classes.sum(0)
        classes *= torch.where(total > inside, inside / total.clamp(min=1e-6), torch.ones_like(total))
        out[i, num_classes] = (inside - classes.sum(0)).clamp(min=0)
    return out


class _Dense(nn.Module):
    """Backbone + per-cell classifier (one module, so DDP can wrap it)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        features, mask = self.backbone(images, padding_mask)[-1]
        return self.head(features), mask


def pretrain_backbone(
    model: Detr,
    batches: Callable[[int], Iterable[Batch]],
    *,
    steps: int,
    lr: float,
    device: torch.device,
    amp: str = "none",
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train ``model.backbone`` for ``steps`` optimizer steps on dense class targets.

    Args:
        batches: ``epoch -> batches`` with ``masks`` in the targets (loops over epochs as needed).
        amp: mixed precision of the forward pass, as in training ("none", "bf16" or "fp16").

    Returns ``{"loss", "cell_accuracy", "seconds"}`` of the last 20 steps (accuracy over object cells).
    """
    backbone = model.backbone
    num_classes = model.config.num_classes
    head = nn.Conv2d(backbone.num_channels, num_classes + 1, kernel_size=1).to(device)
    net: nn.Module = _Dense(backbone, head)
    if is_dist():
        # Every process trains the same backbone on its own shard: average gradients as DDP does.
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    weights = torch.ones(num_classes + 1, device=device)
    weights[-1] = BACKGROUND_WEIGHT
    net.train()
    start, step, epoch = time.perf_counter(), 0, 0
    recent: list[tuple[float, float]] = []
    while step < steps:
        used = 0
        for batch in batches(epoch):
            if any_process(len(batch) == 0, device):  # all processes skip it together (DDP)
                continue
            used += 1
            batch = batch.to(device)
            with amp_autocast(device, amp):
                logits, mask = net(batch.images, batch.padding_mask)
            features = logits
            target = dense_targets(batch, num_classes, tuple(features.shape[-2:]), backbone.strides[-1])
            per_cell = -(target * logits.float().log_softmax(1) * weights[:, None, None]).sum(1)
            valid = torch.ones_like(per_cell, dtype=torch.bool) if mask is None else ~mask
            loss = per_cell[valid].mean()
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1
            with torch.no_grad():
                truth = target.argmax(1)
                objects = valid & (truth < num_classes)
                hits = (logits.argmax(1)[objects] == truth[objects]).float()
                accuracy = float(hits.mean()) if len(hits) else recent[-1][1] if recent else 0.0
            recent = (recent + [(loss.item(), accuracy)])[-20:]
            if is_main_process() and (step % 50 == 0 or step == steps):
                log(
                    f"backbone pretraining: step {step}/{steps}, loss {loss.item():.3f}, "
                    f"object-cell accuracy {sum(a for _, a in recent) / len(recent):.2f}"
                )
            if step >= steps:
                break
        if not used:
            # Every image failed to load (e.g. a wrong image folder): say so instead of looping forever.
            raise DatasetError("backbone pretraining: no training image could be loaded in a whole epoch")
        epoch += 1
    return {
        "loss": sum(v for v, _ in recent) / max(len(recent), 1),
        "cell_accuracy": sum(a for _, a in recent) / max(len(recent), 1),
        "seconds": time.perf_counter() - start,
    }


def no_pretraining_reason(cfg: TrainConfig, model: DetrConfig, resumed: bool) -> str | None:
    """Why the dense pretraining stage must not run (it replaces a *missing* initialisation of a
    backbone DETR has not trained yet), or None when it should run."""
    if resumed:
        return "DETR training has already started (resumed run); it would overwrite trained weights"
    if cfg.init_from:
        return f"the weights come from {cfg.init_from}"
    if model.pretrained_backbone:
        return "the backbone has ImageNet weights"
    if cfg.freeze_backbone or not model.train_backbone:
        return "the backbone is frozen"
    return None


def check_masks_for_pretraining(cfg: TrainConfig, annotations: list[dict], source: object) -> None:
    """Refuse pretraining on box-only data (its targets are the instance masks), naming some of the
    annotations without a segmentation."""
    unmasked = [
        a.get("id")
        for a in annotations
        if not a.get("iscrowd") and not a.get("segmentation") and "segments_info" not in a
    ]
    if unmasked:
        shown = ", ".join(str(i) for i in unmasked[:5]) + (", ..." if len(unmasked) > 5 else "")
        raise ConfigError(
            f"backbone_pretrain_steps={cfg.backbone_pretrain_steps} needs instance masks, but "
            f"{len(unmasked)} annotation(s) in {source} have no segmentation (ids {shown}); "
            "set backbone_pretrain_steps=0 for box-only data"
        )


def pretraining_stage(
    cfg: TrainConfig,
    model: Detr,
    train_set,
    with_masks: Callable[[], torch.utils.data.Dataset],
    *,
    resumed: bool,
    device: torch.device,
    amp: str,
    log: Callable[[str], None],
) -> dict[str, float] | None:
    """Run :func:`pretrain_backbone` for ``cfg.backbone_pretrain_steps`` steps on ``with_masks()``
    (the training set with instance masks) unless :func:`no_pretraining_reason` forbids it (then
    logged, and None returned); returns the stage's statistics."""
    reason = no_pretraining_reason(cfg, model.config, resumed)
    if reason is not None:
        log(f"backbone pretraining skipped: {reason}")
        return None
    check_masks_for_pretraining(cfg, train_set.data["annotations"], train_set.source)
    dataset = with_masks()
    log(
        f"backbone pretraining: {cfg.backbone_pretrain_steps} steps of dense classification "
        f"on {len(dataset)} images (lr {cfg.backbone_pretrain_lr:g})"
    )
    # Seeded separately from the epochs, so a run that resumes later replays them identically.
    seed_everything(cfg.seed + 7919)
    return pretrain_backbone(
        model, lambda epoch: train_loader(cfg, dataset, -1 - epoch), steps=cfg.backbone_pretrain_steps,
        lr=cfg.backbone_pretrain_lr, device=device, amp=amp, log=log,
    )  # fmt: skip
