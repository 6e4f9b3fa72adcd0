"""The parts of a training run, each built from a :class:`~detrkit.training.config.TrainConfig`:
datasets, model (fresh, fine-tuned from a checkpoint, or resumed), optimizer, data loaders."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..amp import resolve_amp
from ..checkpoints.io import load_model
from ..data.coco import CocoDetection, DatasetError
from ..data.collate import AspectRatioBatchSampler, ShardSampler, collate
from ..data.formats import open_split
from ..data.images import ImageLoadError, load_image
from ..data.layout import resolve_panoptic
from ..data.panoptic import CocoPanoptic
from ..data.synthetic import SynthConfig, ensure_synthetic, synthetic_root
from ..data.transforms import TransformConfig, augmentation, eval_transforms
from ..distributed import is_dist, is_main_process, rank, world_size
from ..errors import ConfigError
from ..models.config import DetrConfig
from ..models.criterion import SetCriterion
from ..models.detr import Detr
from .aids import TrainingAids
from .config import TrainConfig

Log = Callable[[str], None]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_distributed(device_pref: str) -> None:
    """Join the process group that ``torchrun`` describes (NCCL on GPUs, gloo on CPUs), once."""
    if is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")


@dataclass
class Datasets:
    """The training and validation sets, and the training set with instance masks (what the dense
    backbone pretraining reads, built only when it runs)."""

    train: CocoDetection | CocoPanoptic
    val: CocoDetection | CocoPanoptic
    train_with_masks: Callable[[], Dataset]


def validated_classes(dataset: CocoDetection | CocoPanoptic) -> set[str] | None:
    """The class names with objects (crowd regions aside) in a detection dataset (None: panoptic)."""
    if isinstance(dataset, CocoPanoptic):
        return None
    cmap = dataset.category_map
    names = dict(zip(cmap.category_ids, cmap.names))
    return {
        names[a["category_id"]]
        for a in dataset.data["annotations"]
        if not a.get("iscrowd", 0) and a["category_id"] in names
    }


def _objects(dataset: CocoDetection) -> int:
    """The objects (crowd regions aside) of a dataset's annotations."""
    return sum(1 for a in dataset.data["annotations"] if not a.get("iscrowd", 0))


def training_augmentation(cfg: TrainConfig):
    """The training transforms ``cfg`` asks for: its ``augment`` preset and switches."""
    return augmentation(
        cfg.augment, cfg.image_scale, hflip=cfg.hflip, crop=cfg.crop, scale_min=cfg.scale_min,
        scale_max=cfg.scale_max, color_jitter=cfg.color_jitter,
    )  # fmt: skip


def build_datasets(cfg: TrainConfig, out: Path, log: Log) -> Datasets:
    """``cfg.data`` as training and validation sets (the synthetic dataset is written under ``out``
    first, by the main process)."""
    if cfg.data == "synthetic":
        root = synthetic_root(out, cfg.synth_shapes)
        if is_main_process():
            splits = {
                cfg.train_split.removesuffix("2017"): cfg.synth_images,
                cfg.val_split.removesuffix("2017"): max(8, cfg.synth_images // 4),
            }
            synth = SynthConfig(images=cfg.synth_images, seed=cfg.seed, shapes=cfg.synth_shapes)
            if ensure_synthetic(root, synth, splits):
                log(f"wrote the synthetic dataset ({cfg.synth_images} training images) to {root}")
        if is_dist():
            dist.barrier()
    else:
        root = Path(cfg.data)
    masks = bool(cfg.model.get("masks", False))
    sizes = TransformConfig.scaled(cfg.image_scale)
    augmentation = training_augmentation(cfg)
    if cfg.panoptic:
        train_ann, train_dir, train_png = resolve_panoptic(root, cfg.train_split)
        val_ann, val_dir, val_png = resolve_panoptic(root, cfg.val_split)
        train = CocoPanoptic(train_dir, train_ann, train_png, augmentation)
        val = CocoPanoptic(val_dir, val_ann, val_png, eval_transforms(sizes), category_map=train.category_map)
        log(
            f"data: {len(train)} training images ({train_ann}), {len(val)} validation images, "
            f"{train.category_map.num_classes} classes ({len(train.stuff_ids)} stuff)"
        )
        check_some_image_loads(val, "validation")
        return Datasets(train, val, lambda: train)
    data_format = "coco" if cfg.data == "synthetic" else cfg.data_format
    train_split = open_split(root, cfg.train_split, data_format)
    val_split = open_split(root, cfg.val_split, data_format)
    if val_split.source == train_split.source:
        log(
            f"WARNING: --data {cfg.data} has one set of annotations: it is used for training and validation "
            "alike, so validation measures memorisation. Give a dataset with both splits."
        )
    train = CocoDetection(train_split.images, train_split.annotations, augmentation, masks=masks)
    # COCO AP reads the whole annotation file (crowd regions included); targets drop crowds.
    val = CocoDetection(
        val_split.images, val_split.annotations, eval_transforms(sizes), masks=masks,
        category_map=train.category_map,
    )  # fmt: skip
    log(
        f"data ({train_split.format}): {len(train)} training images, {_objects(train)} objects "
        f"({train_split.source}); {len(val)} validation images, {_objects(val)} objects ({val_split.source}); "
        f"{train.category_map.num_classes} classes "
        f"({', '.join(train.category_map.names[:8])}{', ...' if train.category_map.num_classes > 8 else ''})"
    )
    check_some_image_loads(val, "validation")
    # The dense backbone pretraining needs the masks even when DETR itself does not.
    return Datasets(
        train,
        val,
        lambda: CocoDetection(
            train_split.images,
            train_split.annotations,
            augmentation,
            masks=True,
            category_map=train.category_map,
        ),
    )


def check_some_image_loads(dataset: CocoDetection | CocoPanoptic, what: str) -> None:
    """Refuse a split none of whose images can be read (a wrong folder, a broken export): its
    metrics would be those of an empty set. Reads images until one loads: one, when all is well."""
    if dataset.image_dir is None:
        return
    for image in dataset.data["images"]:
        try:
            load_image(dataset.image_dir / image["file_name"])
            return
        except ImageLoadError:
            continue
    raise DatasetError(
        f"none of the {len(dataset.data['images'])} {what} images of {dataset.source} can be read from "
        f"{dataset.image_dir}: check the image folder"
    )


def build_model(
    cfg: TrainConfig, train_set: CocoDetection | CocoPanoptic, log: Log, source: Detr | None = None
) -> Detr:
    """A new model for ``train_set``'s classes: ``cfg.model`` on top of ``cfg.init_from``'s
    architecture when fine-tuning (its weights loaded wherever the shapes agree). ``source``: the
    model ``cfg.init_from`` names, when already loaded (read before any data is built, so that a
    mistyped name costs no dataset synthesis)."""
    cmap = train_set.category_map
    labels: dict[str, Any] = {
        "num_classes": cmap.num_classes,
        "class_names": cmap.names,
        "category_ids": cmap.category_ids,
    }
    if cfg.panoptic:
        labels.update(masks=True, stuff_ids=train_set.stuff_ids)
    fields = dict(cfg.model)
    if cfg.init_from:
        source = source if source is not None else load_model(cfg.init_from)
        base = source.config.to_dict()
        for key in ("class_names", "category_ids", "num_classes", "extra"):
            base.pop(key)
        if base.get("masks") and not cfg.panoptic and "masks" not in fields:
            # Box data (no --masks): the mask head has nothing to learn from; it is left out.
            base.update(masks=False, stuff_ids=None)
            log(f"init: the mask head of {cfg.init_from} is not trained (give --masks to train it too)")
        fields = {**base, **fields}
    if cfg.freeze_backbone:
        fields["train_backbone"] = False
    # Evaluation and inference resize images as in training: keep the scale with the model.
    fields["extra"] = {**fields.get("extra", {}), "image_scale": cfg.image_scale}
    model = Detr(DetrConfig(**{**fields, **labels}))
    if source is not None:
        init_from(model, source, log, cfg.init_from)
    return model


def resumed_model(saved_config: dict[str, Any], train_set: CocoDetection | CocoPanoptic, out: Path) -> Detr:
    """The architecture of a saved run (its weights are restored afterwards), refused when the
    dataset's classes are not the run's."""
    # Resumed weights replace the initial ones: no ImageNet download for them.
    config = dataclasses.replace(DetrConfig.from_dict(saved_config), pretrained_backbone=False)
    cmap = train_set.category_map
    saved_classes = (tuple(config.category_ids or ()), tuple(config.class_names or ()))
    if saved_classes != (cmap.category_ids, cmap.names):
        raise ConfigError(
            f"--resume: the dataset's classes {dict(zip(cmap.category_ids, cmap.names))} are not the "
            f"run's {dict(zip(*saved_classes))}; resuming would train (and name) them wrongly. "
            f"To fine-tune on these classes, start a new run: --init-from {out} --output-dir NEW_DIR"
        )
    return Detr(config)


def init_from(model: Detr, source: Detr, log: Log, name: str) -> None:
    """Copy ``source``'s weights (read from ``name``) into ``model`` wherever name and shape agree;
    log what is re-initialised, and why: another class count, query count or size, or absent."""
    own = model.state_dict()
    loadable, mismatched = {}, set()
    for key, value in source.state_dict().items():
        if key in own and own[key].shape == value.shape:
            loadable[key] = value
        elif key in own:
            mismatched.add(key)
    missing, _ = model.load_state_dict(loadable, strict=False)
    old, new = source.config, model.config
    heads = {"class_embed": "num_classes", "query_embed": "num_queries"}
    if any(k.startswith("class_embed") for k in mismatched) and old.num_classes != new.num_classes:
        log(
            f"init: class head re-initialised: the checkpoint has {old.num_classes} classes, "
            f"this dataset {new.num_classes}"
        )
    if any(k.startswith("query_embed") for k in mismatched) and old.num_queries != new.num_queries:
        log(f"init: object queries re-initialised: {old.num_queries} -> {new.num_queries}")
    counted = tuple(p for p, f in heads.items() if getattr(old, f) != getattr(new, f))
    resized = sorted({k.split(".")[0] for k in mismatched if not k.startswith(counted)})
    if resized:
        sizes = [f"{f} {getattr(old, f)} -> {getattr(new, f)}" for f in ("d_model", "dim_feedforward", "nheads")
                 if getattr(old, f) != getattr(new, f)]  # fmt: skip
        log(
            f"init: re-initialised, their shapes differ from the checkpoint's"
            f"{' (' + ', '.join(sizes) + ')' if sizes else ''}: {', '.join(resized)}"
        )
    fresh = sorted({k.split(".")[0] for k in missing if k not in mismatched})
    if fresh:
        log(f"init: randomly initialised (not in the checkpoint): {', '.join(fresh)}")
    log(f"init: {len(loadable)} tensors loaded from {name}")


def build_optimizer(cfg: TrainConfig, model: Detr, extra: list[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """AdamW with DETR's two parameter groups: the transformer and heads (with ``extra``, the
    training aids' parameters) at ``cfg.lr``, the trainable backbone at ``cfg.lr_backbone``."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    groups = [{"params": rest + list(extra), "lr": cfg.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr_backbone})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_loader(cfg: TrainConfig, dataset: Dataset, epoch: int) -> DataLoader:
    """This epoch's shuffled, aspect-ratio-grouped batches (the order depends on seed and epoch)."""
    generator = torch.Generator().manual_seed(cfg.seed + epoch)
    # One global order of the images per (seed, epoch), split over the processes: N processes
    # with batch size B see the same images in each step as one process with batch size N * B
    # (exactly so when all images fall in one aspect-ratio group; the grouping is per process).
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=cfg.seed)
    sampler.set_epoch(epoch)
    batches = AspectRatioBatchSampler(sampler, dataset.aspect_ratios(), cfg.batch_size)
    return DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, num_workers=cfg.num_workers, generator=generator
    )


def val_loader(cfg: TrainConfig, dataset: Dataset) -> DataLoader:
    """This process's share of the validation images, each evaluated exactly once."""
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=ShardSampler(len(dataset)),
        collate_fn=collate,
        num_workers=cfg.num_workers,
    )


def random_backbone_warning(cfg: TrainConfig, model: DetrConfig) -> str | None:
    """Why this run cannot learn, when its backbone starts from random weights without what a
    random backbone needs (trainable BatchNorm and the dense pretraining stage), or None.

    DETR's recipe (the ``detr-*`` presets) assumes an ImageNet-initialised ResNet with frozen
    BatchNorm; offline and without ``init_from`` that backbone is random and stays useless."""
    if cfg.init_from or model.pretrained_backbone:
        return None
    frozen = cfg.freeze_backbone or not model.train_backbone
    if not frozen and not model.frozen_bn and cfg.backbone_pretrain_steps > 0:
        return None
    problems = []
    if frozen:
        problems.append("is not trained (frozen)")
    if model.frozen_bn:
        problems.append("has frozen BatchNorm (frozen_bn=true) with random statistics")
    if cfg.backbone_pretrain_steps == 0:
        problems.append("gets no pretraining stage (backbone_pretrain_steps=0)")
    return (
        f"the {model.backbone} backbone starts from random weights and {', '.join(problems)}: "
        "DETR's recipe needs a pretrained backbone, and this run is unlikely to learn anything. "
        "Use one of: --init-from a trained DETR (e.g. detr-r50, facebook/detr-resnet-50, or a checkpoint); "
        "--set model.pretrained_backbone=true (ImageNet weights, downloaded by torchvision); or train "
        "the backbone from scratch with --set model.frozen_bn=false --set backbone_pretrain_steps=800 "
        "(as the cpu-tiny preset does)."
    )


def build_aid(
    cfg: TrainConfig, model: Detr, criterion: SetCriterion, device: torch.device
) -> TrainingAids | None:
    """The training-only wrapper of ``model`` (never saved as the model) when ``cfg`` asks for query
    groups or denoising; ``criterion`` then also weighs the denoising losses."""
    if cfg.query_groups == 1 and not cfg.denoising_groups:
        return None
    try:
        aid = TrainingAids(model, cfg.query_groups, cfg.denoising_groups).to(device)
    except ValueError as e:
        raise ConfigError(
            f"query_groups={cfg.query_groups}, denoising_groups={cfg.denoising_groups}: {e} "
            "(set query_groups=1 and denoising_groups=0 for this model)"
        ) from None
    if cfg.denoising_groups:
        criterion.add_denoising_weights()
    return aid


def describe(model: Detr, device: torch.device) -> str:
    """One line on the model's size and where it trains."""
    config = model.config
    return (
        f"model: {config.backbone}, {config.enc_layers}+{config.dec_layers} layers, "
        f"{config.num_queries} queries, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters; device {device}, {world_size()} process(es)"
    )


def build_precision(
    cfg: TrainConfig, device: torch.device, log: Log
) -> tuple[str, torch.amp.GradScaler | None]:
    """The mixed precision ``cfg.amp`` resolves to on ``device`` ("auto": what is faster on this
    machine, logged), and the gradient scaler fp16 needs."""
    amp = resolve_amp(cfg.amp, device)
    if cfg.amp == "auto":
        log(f"amp='auto': {amp} on this {device.type}")
    if amp != "fp16":
        return amp, None
    if device.type != "cuda":
        raise ConfigError("amp='fp16' needs a CUDA device; use amp='bf16' on CPU")
    return amp, torch.amp.GradScaler("cuda")


def build_ema(cfg: TrainConfig, model: Detr) -> AveragedModel | None:
    """The exponential moving average of ``model``'s weights and buffers, with ``cfg.ema_decay``."""
    if cfg.ema_decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
