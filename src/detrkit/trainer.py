"""A training run: data, model, optimizer, checkpoints, resume, evaluation, logging, distribution.

Launch with ``detrkit train ...`` on one process, or ``torchrun --nproc_per_node=N -m detrkit train
...`` for DDP (gloo on CPU, NCCL on GPU). Rank 0 logs and writes checkpoints; every rank evaluates
its shard and the results are gathered.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .aids import TrainingAids
from .checkpoints import load_model, torch_load_safe
from .config import DetrConfig
from .criterion import build_criterion
from .data.coco import CocoDetection, CocoPanoptic, DatasetError
from .data.collate import AspectRatioBatchSampler, ShardSampler, SkipTracker, collate
from .data.layout import resolve_panoptic, resolve_split
from .data.synthetic import SynthConfig, write_synthetic
from .data.transforms import TransformConfig, eval_transforms, train_transforms
from .distributed import (
    any_process,
    is_dist,
    is_main_process,
    max_over_processes,
    pick_device,
    rank,
    world_size,
)
from .engine import TrainState, evaluate, resolve_amp, train_one_epoch
from .errors import ConfigError
from .evaluation import CocoEvaluator, format_metrics
from .fileio import atomic_write, check_output, write_json_atomic
from .model import Detr
from .pq import PanopticEvaluator
from .pretrain import pretrain_backbone
from .schedule import lr_factor, run_progress
from .train_config import TrainConfig, merge, nest

LAST = "checkpoint_last.pth"
BEST = "checkpoint_best.pth"
METRICS = "metrics.jsonl"
FINAL = "final_metrics.json"
RUN_FILES = (LAST, BEST, METRICS, FINAL)  # what makes a folder another run's
BEST_METRIC = "bbox/AP"  # panoptic runs keep the best panoptic/PQ


def _plain(value: Any) -> Any:
    """Tuples as lists, so a value from a config file compares equal to the same saved value."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _setup_distributed(device_pref: str) -> None:
    if is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs it (``fit()``).

    Args:
        config: the run's configuration.
        resume: continue ``config.output_dir``'s last checkpoint; ``overrides`` (explicit options)
            are applied on top of the saved config and reported.
        log: where messages go (rank 0 only).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        overrides: dict[str, Any] | None = None,
        log: Callable[[str], None] = print,
        overwrite: bool = False,
    ) -> None:
        _setup_distributed((overrides or {}).get("device", config.device))
        self.log = log if is_main_process() else (lambda msg: None)
        self.out = Path(config.output_dir)
        if not resume:
            self._claim_output_dir(overwrite, config.init_from)
        saved = None
        if resume:
            path = self.out / LAST
            if not path.exists():
                raise FileNotFoundError(f"--resume: no checkpoint at {path}")
            saved = torch_load_safe(path)
            config = self._resumed_config(saved, overrides or {})
        self.config = config
        self.device = pick_device(config.device)
        self.state = TrainState()

        self.train_set, self.val_set = self._datasets()
        _seed_everything(config.seed)  # the initial weights depend on the seed only
        self.model = self._build_model(saved).to(self.device)
        self.criterion = build_criterion(self.model.config).to(self.device)
        # What trains: the model, or the model inside a training-only aid (never saved as the model).
        self.aid: TrainingAids | None = None
        if config.query_groups > 1 or config.denoising_groups:
            try:
                self.aid = TrainingAids(self.model, config.query_groups, config.denoising_groups).to(
                    self.device
                )
            except ValueError as e:
                raise ConfigError(
                    f"query_groups={config.query_groups}, denoising_groups={config.denoising_groups}: {e} "
                    "(set query_groups=1 and denoising_groups=0 for this model)"
                ) from None
            if config.denoising_groups:
                self.criterion.add_denoising_weights()
        self.module: nn.Module = self.aid if self.aid is not None else self.model
        if is_dist():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=config.lr_drop)
        self.scaler = None
        self.amp = resolve_amp(config.amp, self.device)  # what "auto" means on this machine
        if config.amp == "auto":
            self.log(f"amp='auto': {self.amp} on this {self.device.type}")
        if self.amp == "fp16":
            if self.device.type != "cuda":
                raise ConfigError("amp='fp16' needs a CUDA device; use amp='bf16' on CPU")
            self.scaler = torch.amp.GradScaler("cuda")
        self.ema = None
        if config.ema_decay is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True
            )
        if saved is not None:
            self._restore(saved, overrides or {})
        else:
            warning = self.random_backbone_warning()
            if warning:
                self.log(f"WARNING: {warning}")

    # --- construction -----------------------------------------------------------------------------
    def _claim_output_dir(self, overwrite: bool, source: str | None) -> None:
        """A new run must not silently replace another run's checkpoints and extend its metrics:
        refuse a folder that holds one, unless ``overwrite`` (then its run files are removed)."""
        previous = [name for name in RUN_FILES if (self.out / name).exists()]
        if overwrite and source and any(Path(source).resolve() == (self.out / n).resolve() for n in previous):
            raise ConfigError(
                f"--overwrite would delete {source}, the checkpoint --init-from starts from: "
                "choose another --output-dir"
            )
        check_output(
            self.out, option="--output-dir", kind="dir", overwrite=overwrite,
            replaceable=lambda _: not previous,
        )  # fmt: skip
        if previous and is_main_process():
            for name in previous:
                (self.out / name).unlink()
            self.log(f"--overwrite: removed the previous run's {', '.join(previous)} from {self.out}")
        if is_dist():
            dist.barrier()

    def _resumed_config(self, saved: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
        base = saved["train_config"]
        model = saved["detrkit_config"]
        # Options built into the saved model (its input size, trainable parts, heads, architecture):
        # the resumed model is the saved one, so reporting such a change without making it would lie.
        defaults = TrainConfig()  # for options an older run's config did not record
        fixed = {
            key: base.get(key, getattr(defaults, key))
            for key in ("image_scale", "freeze_backbone", "panoptic", "query_groups", "denoising_groups")
        }
        fixed.update({f"model.{field}": value for field, value in model.items()})
        for key, value in overrides.items():
            if (key in fixed or key.startswith("model.")) and _plain(fixed.get(key)) != _plain(value):
                raise ConfigError(
                    f"--resume: {key}={value!r} would change the model of a run in progress (it has "
                    f"{key}={fixed.get(key)!r}). Start a new run from it instead: "
                    f"--init-from {self.out / LAST} --set {key}=... --output-dir NEW_DIR"
                )
        for key, value in overrides.items():
            old = base.get(key) if not key.startswith("model.") else base["model"].get(key[6:])
            if old != value:
                self.log(f"resume: {key} {old!r} -> {value!r} (from the command line)")
        return TrainConfig.from_dict(merge(base, nest(overrides)))

    def _datasets(self) -> tuple[CocoDetection, CocoDetection]:
        cfg = self.config
        if cfg.data == "synthetic":
            root = self.out / (
                "synthetic-data" if cfg.synth_shapes == "basic" else f"synthetic-{cfg.synth_shapes}"
            )
            if is_main_process() and not (root / "annotations" / f"instances_{cfg.val_split}.json").exists():
                self.log(f"writing the synthetic dataset ({cfg.synth_images} training images) to {root}")
                splits = {
                    cfg.train_split.removesuffix("2017"): cfg.synth_images,
                    cfg.val_split.removesuffix("2017"): max(8, cfg.synth_images // 4),
                }
                synth = SynthConfig(images=cfg.synth_images, seed=cfg.seed, shapes=cfg.synth_shapes)
                write_synthetic(root, synth, splits)
            if is_dist():
                dist.barrier()
        else:
            root = Path(cfg.data)
        masks = bool(cfg.model.get("masks", False))
        sizes = TransformConfig.scaled(cfg.image_scale)
        augmentation = train_transforms(sizes) if cfg.augment else eval_transforms(sizes)
        if cfg.panoptic:
            train_ann, train_dir, train_png = resolve_panoptic(root, cfg.train_split)
            val_ann, val_dir, val_png = resolve_panoptic(root, cfg.val_split)
            train = CocoPanoptic(train_dir, train_ann, train_png, augmentation)
            self._mask_train_set = lambda: train
            val = CocoPanoptic(
                val_dir, val_ann, val_png, eval_transforms(sizes), category_map=train.category_map
            )
            self.log(
                f"data: {len(train)} training images ({train_ann}), {len(val)} validation images, "
                f"{train.category_map.num_classes} classes ({len(train.stuff_ids)} stuff)"
            )
            return train, val
        train_ann, train_dir = resolve_split(root, cfg.train_split)
        val_ann, val_dir = resolve_split(root, cfg.val_split)
        if val_ann == train_ann:
            self.log(
                f"WARNING: --data {cfg.data} is one annotation file: it is used for training and validation "
                "alike, so validation measures memorisation. Give a dataset root with both splits."
            )
        train = CocoDetection(train_dir, train_ann, augmentation, masks=masks)
        # The dense backbone pretraining needs the masks even when DETR itself does not.
        self._mask_train_set = lambda: CocoDetection(
            train_dir, train_ann, augmentation, masks=True, category_map=train.category_map
        )
        # COCO AP reads the whole annotation file (crowd regions included); targets drop crowds.
        val = CocoDetection(
            val_dir, val_ann, eval_transforms(sizes), masks=masks, category_map=train.category_map
        )
        self.log(
            f"data: {len(train)} training images ({train_ann}), {len(val)} validation images ({val_ann}), "
            f"{train.category_map.num_classes} classes"
        )
        return train, val

    def _build_model(self, saved: dict[str, Any] | None) -> Detr:
        cfg = self.config
        cmap = self.train_set.category_map
        labels = {
            "num_classes": cmap.num_classes,
            "class_names": cmap.names,
            "category_ids": cmap.category_ids,
        }
        if cfg.panoptic:
            labels.update(masks=True, stuff_ids=self.train_set.stuff_ids)
        if saved is not None:
            # Resumed weights replace the initial ones: no ImageNet download for them.
            config = dataclasses.replace(
                DetrConfig.from_dict(saved["detrkit_config"]), pretrained_backbone=False
            )
            saved_classes = (tuple(config.category_ids or ()), tuple(config.class_names or ()))
            if saved_classes != (cmap.category_ids, cmap.names):
                raise ConfigError(
                    f"--resume: the dataset's classes {dict(zip(cmap.category_ids, cmap.names))} are not the "
                    f"run's {dict(zip(*saved_classes))}; resuming would train (and name) them wrongly. "
                    f"To fine-tune on these classes, start a new run: --init-from {self.out / LAST} "
                    "--output-dir NEW_DIR"
                )
            return Detr(config)
        source = None
        fields = dict(cfg.model)
        if cfg.init_from:
            source = load_model(cfg.init_from)
            base = source.config.to_dict()
            for key in ("class_names", "category_ids", "num_classes", "extra"):
                base.pop(key)
            fields = {**base, **fields}
        if cfg.freeze_backbone:
            fields["train_backbone"] = False
        # Evaluation and inference resize images as in training: keep the scale with the model.
        fields["extra"] = {**fields.get("extra", {}), "image_scale": cfg.image_scale}
        model = Detr(DetrConfig(**{**fields, **labels}))
        if source is not None:
            self._init_from(model, source)
        return model

    def _init_from(self, model: Detr, source: Detr) -> None:
        own = model.state_dict()
        loadable, reinit = {}, set()
        for key, value in source.state_dict().items():
            if key in own and own[key].shape == value.shape:
                loadable[key] = value
            elif key in own:
                reinit.add(key.rsplit(".", 1)[0])
        missing, _ = model.load_state_dict(loadable, strict=False)
        if any(k.startswith("class_embed") for k in reinit):
            self.log(
                f"init: class head re-initialised: the checkpoint has {source.config.num_classes} classes, "
                f"this dataset {model.config.num_classes}"
            )
        if any(k.startswith("query_embed") for k in reinit):
            self.log(
                f"init: object queries re-initialised: {source.config.num_queries} -> {model.config.num_queries}"
            )
        fresh = sorted({k.split(".")[0] for k in missing if not k.startswith(("class_embed", "query_embed"))})
        if fresh:
            self.log(f"init: randomly initialised (not in the checkpoint): {', '.join(fresh)}")
        self.log(f"init: {len(loadable)} tensors loaded from {self.config.init_from}")

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        backbone = [
            p for n, p in self.model.named_parameters() if n.startswith("backbone.") and p.requires_grad
        ]
        rest = [
            p for n, p in self.model.named_parameters() if not n.startswith("backbone.") and p.requires_grad
        ]
        if self.aid is not None:
            rest += self.aid.aid_parameters()
        groups = [{"params": rest, "lr": cfg.lr}]
        if backbone:
            groups.append({"params": backbone, "lr": cfg.lr_backbone})
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _train_loader(self, epoch: int, dataset: Dataset | None = None) -> DataLoader:
        """This epoch's shuffled, aspect-ratio-grouped batches (the order depends on seed and epoch)."""
        cfg = self.config
        dataset = dataset if dataset is not None else self.train_set
        generator = torch.Generator().manual_seed(cfg.seed + epoch)
        # One global order of the images per (seed, epoch), split over the processes: N processes
        # with batch size B see the same images in each step as one process with batch size N * B
        # (exactly so when all images fall in one aspect-ratio group; the grouping is per process).
        sampler = DistributedSampler(
            dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=cfg.seed
        )
        sampler.set_epoch(epoch)
        batches = AspectRatioBatchSampler(sampler, dataset.aspect_ratios(), cfg.batch_size)
        return DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=collate,
            num_workers=cfg.num_workers,
            generator=generator,
        )

    def _val_loader(self) -> DataLoader:
        """This process's share of the validation images, each evaluated exactly once."""
        return DataLoader(
            self.val_set,
            batch_size=self.config.batch_size,
            sampler=ShardSampler(len(self.val_set)),
            collate_fn=collate,
            num_workers=self.config.num_workers,
        )

    # --- checkpoints --------------------------------------------------------------------------------
    def evaluated_model(self) -> Detr:
        """The weights that are evaluated and saved as the model: the EMA average when there is one
        (once it has averaged anything: before the first step it is a copy of the initial weights)."""
        if self.ema is not None and int(self.ema.n_averaged) > 0:
            return self.ema.module
        return self.model

    def _checkpoint(self) -> dict[str, Any]:
        # "model" holds the evaluated weights, so every reader of the checkpoint (load_model, eval,
        # predict, serve, convert) gets the weights whose metrics were logged; with EMA, the raw
        # training weights go to "train_model" for --resume.
        return {
            "model": self.evaluated_model().state_dict(),
            "train_model": self.model.state_dict() if self.ema is not None else None,
            "detrkit_config": self.model.config.to_dict(),
            "train_config": self.config.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": {"n_averaged": self.ema.n_averaged} if self.ema is not None else None,
            "aids": self.aid.aid_state_dict() if self.aid is not None else None,
            "state": dataclasses.asdict(self.state),
            "epoch": self.state.epoch,
        }

    def _save(self, name: str) -> None:
        if not is_main_process():
            return
        payload = self._checkpoint()
        atomic_write(self.out / name, lambda tmp: torch.save(payload, tmp))

    def _restore(self, saved: dict[str, Any], overrides: dict[str, Any]) -> None:
        raw = saved.get("train_model")
        self.model.load_state_dict(raw if raw is not None else saved["model"])
        if self.aid is not None:
            self.aid.load_aid_state_dict(saved["aids"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["lr_scheduler"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        ema = saved.get("ema")
        if self.ema is not None and ema:
            if raw is not None:  # "model" holds the average
                self.ema.module.load_state_dict(saved["model"])
                self.ema.n_averaged.copy_(ema["n_averaged"])
            else:  # a checkpoint of detrkit 0.1, which saved the whole AveragedModel
                self.ema.load_state_dict(ema)
        self.state = TrainState(**saved["state"])
        # The optimizer's saved state carries the old learning rates: apply explicit new ones.
        cfg = self.config
        decay = 0.1 ** (self.state.epoch // cfg.lr_drop)
        base = [cfg.lr, cfg.lr_backbone][: len(self.optimizer.param_groups)]
        if "lr" in overrides or "lr_backbone" in overrides or "lr_drop" in overrides:
            self.scheduler.base_lrs = base
            self.scheduler.step_size = cfg.lr_drop
            for group, lr in zip(self.optimizer.param_groups, base, strict=True):
                group["lr"] = lr * decay
                group["initial_lr"] = lr
        if "weight_decay" in overrides:
            for group in self.optimizer.param_groups:
                group["weight_decay"] = cfg.weight_decay
        self.log(f"resumed from {self.out / LAST} after epoch {self.state.epoch} (step {self.state.step})")

    # --- the run ------------------------------------------------------------------------------------
    def _log_metrics(self, record: dict[str, Any]) -> None:
        if not is_main_process():
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def evaluate(self) -> dict[str, float]:
        val_loader = self._val_loader()
        if self.config.panoptic:
            # Categories the validation file does not list can still be predicted: know them all.
            isthing = {**self.train_set.isthing, **self.val_set.isthing}
            evaluator = PanopticEvaluator(
                isthing, self.val_set.ground_truth, self.val_set.category_map.category_ids
            )
        else:
            iou_types = ("bbox", "segm") if self.model.config.masks else ("bbox",)
            evaluator = CocoEvaluator(self.val_set.data, self.val_set.category_map, iou_types)
        metrics = evaluate(
            self.evaluated_model(), val_loader, evaluator, self.device, amp=self.amp,
            criterion=self.criterion, skips=SkipTracker(warn=self.log),
        )  # fmt: skip
        if metrics["images_unreadable"]:
            self.log(
                f"WARNING: {metrics['images_unreadable']:.0f} of {metrics['images']:.0f} validation images "
                "could not be read; they count as images without detections"
            )
        return metrics

    def random_backbone_warning(self) -> str | None:
        """Why this run cannot learn, when its backbone starts from random weights without what a
        random backbone needs (trainable BatchNorm and the dense pretraining stage), or None.

        DETR's recipe (the ``detr-*`` presets) assumes an ImageNet-initialised ResNet with frozen
        BatchNorm; offline and without ``init_from`` that backbone is random and stays useless."""
        cfg, model = self.config, self.model.config
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

    def _no_pretraining_reason(self) -> str | None:
        """Why the dense pretraining stage must not run here (it replaces a *missing* initialisation
        of a backbone DETR has not trained yet), or None."""
        cfg = self.config
        if self.state.epoch or self.state.step:
            return "DETR training has already started (resumed run); it would overwrite trained weights"
        if cfg.init_from:
            return f"the weights come from {cfg.init_from}"
        if self.model.config.pretrained_backbone:
            return "the backbone has ImageNet weights"
        if cfg.freeze_backbone or not self.model.config.train_backbone:
            return "the backbone is frozen"
        return None

    def _pretrain_backbone(self) -> None:
        cfg = self.config
        unmasked = [
            a.get("id")
            for a in self.train_set.data["annotations"]
            if not a.get("iscrowd") and not a.get("segmentation") and "segments_info" not in a
        ]
        if unmasked:
            shown = ", ".join(str(i) for i in unmasked[:5]) + (", ..." if len(unmasked) > 5 else "")
            raise ConfigError(
                f"backbone_pretrain_steps={cfg.backbone_pretrain_steps} needs instance masks, but "
                f"{len(unmasked)} annotation(s) in {self.train_set.source} have no segmentation (ids {shown}); "
                "set backbone_pretrain_steps=0 for box-only data"
            )
        dataset = self._mask_train_set()
        self.log(
            f"backbone pretraining: {cfg.backbone_pretrain_steps} steps of dense classification "
            f"on {len(dataset)} images (lr {cfg.backbone_pretrain_lr:g})"
        )
        # Seeded separately from the epochs, so a run that resumes later replays them identically.
        _seed_everything(cfg.seed + 7919)
        stats = pretrain_backbone(
            self.model,
            lambda epoch: self._train_loader(-1 - epoch, dataset),
            steps=cfg.backbone_pretrain_steps,
            lr=cfg.backbone_pretrain_lr,
            device=self.device,
            amp=self.amp,
            log=self.log,
        )
        self.state.backbone_pretrained = True
        self.state.train_seconds += stats["seconds"]
        self._log_metrics(
            {"epoch": 0, "step": 0, "train_seconds": round(self.state.train_seconds, 2), "pretrain": stats}
        )
        self._save(LAST)

    def _lr_factor(self, epoch_start: float, batches: int) -> Callable[[], float] | None:
        """The per-step learning-rate factor of a ``linear``/``cosine`` schedule in this epoch (which
        started at ``epoch_start`` and has ``batches`` batches); None for the paper's ``step``."""
        cfg = self.config
        if cfg.lr_schedule == "step":
            return None
        steps_per_epoch = -(-batches // cfg.grad_accum)
        total_steps = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total_steps = min(total_steps, cfg.max_steps)

        def factor() -> float:
            seconds = None
            if cfg.time_budget is not None:
                # The processes' clocks differ: all must use the same rate, or their weights drift apart.
                seconds = max_over_processes(
                    self.state.train_seconds + time.time() - epoch_start, self.device
                )
            progress = run_progress(self.state.step, total_steps, seconds, cfg.time_budget)
            return lr_factor(cfg.lr_schedule, progress, cfg.lr_decay_fraction)

        return factor

    def fit(self) -> dict[str, float]:
        from tqdm import tqdm

        cfg = self.config
        if is_main_process():
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "train_config.json", cfg.to_dict())
        self.log(
            f"model: {self.model.config.backbone}, {self.model.config.enc_layers}+{self.model.config.dec_layers} "
            f"layers, {self.model.config.num_queries} queries, "
            f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M parameters; device {self.device}, "
            f"{world_size()} process(es)"
        )
        skips = SkipTracker(warn=self.log)
        metrics: dict[str, float] = {}

        def out_of_budget() -> bool:
            # Training time of the whole run (pretraining included; evaluation and checkpointing
            # excluded, so the budget means the same with any eval_every, and a resumed run goes on
            # counting): the minutes bench/convergence.py plots.
            return cfg.time_budget is not None and self.state.train_seconds >= 60 * cfg.time_budget

        def more_epochs() -> bool:
            return self.state.epoch < cfg.epochs and (
                cfg.max_steps is None or self.state.step < cfg.max_steps
            )

        if more_epochs() and out_of_budget():  # only a resumed run can have spent it already
            raise ConfigError(
                f"time_budget={cfg.time_budget:g}: this run has already trained "
                f"{self.state.train_seconds / 60:.1f} minutes; give a larger --time-budget to go on"
            )
        if cfg.backbone_pretrain_steps and not self.state.backbone_pretrained:
            reason = self._no_pretraining_reason()
            if reason is None:
                self._pretrain_backbone()
                if more_epochs() and out_of_budget():
                    self.log(
                        f"backbone pretraining used the whole time budget ({cfg.time_budget:g} min): "
                        "DETR trains one epoch, so that there is a model to evaluate and save"
                    )
            else:
                self.log(f"backbone pretraining skipped: {reason}")

        while more_epochs():
            epoch = self.state.epoch
            # Seeding from (seed, epoch) makes an epoch replay identically after a resume.
            _seed_everything(cfg.seed + epoch * 1000 + rank())
            train_loader = self._train_loader(epoch)
            start = time.time()
            bar = tqdm(
                total=len(train_loader),
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=True if not is_main_process() else None,
                dynamic_ncols=True,
                leave=True,
            )

            def progress(values: dict[str, float], bar=bar) -> None:
                bar.update(int(values["batches"]))
                bar.set_postfix(
                    loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.1e}", ips=f"{values['img/s']:.1f}"
                )

            train_stats = train_one_epoch(
                self.module, self.criterion, train_loader, self.optimizer, self.device, self.state,
                clip_max_norm=cfg.clip_max_norm, grad_accum=cfg.grad_accum, amp=self.amp, scaler=self.scaler,
                ema=self.ema, max_steps=cfg.max_steps, max_bad_steps=cfg.max_bad_steps, skips=skips, progress=progress,
                lr_factor=self._lr_factor(start, len(train_loader)),
            )  # fmt: skip
            bar.close()
            share = len(train_loader.batch_sampler.sampler)  # this process's samples this epoch
            if not train_stats and any_process(share > 0 and skips.epoch_count >= share, self.device):
                # Nothing trained because nothing loaded (e.g. a wrong image folder): stop now rather
                # than run every epoch without a step and save an untrained "best" model.
                raise DatasetError(
                    f"no training image could be loaded in epoch {epoch + 1}, on at least one process (e.g. "
                    f"{min(skips.seen, default='on another process')}): check the image folder of {cfg.data}"
                )
            if cfg.lr_schedule == "step":
                self.scheduler.step()
            self.state.epoch += 1
            self.state.train_seconds += time.time() - start
            summary = skips.end_epoch()
            if summary:
                self.log(summary)
            finished = (
                self.state.epoch >= cfg.epochs
                or (cfg.max_steps is not None and self.state.step >= cfg.max_steps)
                or out_of_budget()
            )
            # Each process has its own clock: the time budget must end the run on all of them at once.
            finished = any_process(finished, self.device)
            record: dict[str, Any] = {
                "epoch": self.state.epoch,
                "step": self.state.step,
                "time": time.time() - start,
                "train_seconds": round(self.state.train_seconds, 2),
                "lr": self.optimizer.param_groups[0]["lr"],
                "train": {k: round(v, 6) for k, v in train_stats.items()},
            }
            line = f"epoch {self.state.epoch}/{cfg.epochs}: loss {train_stats.get('loss', float('nan')):.4f}"
            if finished or (cfg.eval_every and self.state.epoch % cfg.eval_every == 0):
                metrics = self.evaluate()
                record["val"] = metrics
                key, name = ("panoptic/PQ", "PQ") if cfg.panoptic else (BEST_METRIC, "box AP")
                line += (
                    f", val loss {metrics.get('val/loss', float('nan')):.4f}, {name} {100 * metrics[key]:.1f}"
                )
                if metrics[key] > self.state.best_metric:
                    self.state.best_metric = metrics[key]
                    self._save(BEST)
            self.log(f"{line} ({time.time() - start:.0f}s)")
            self._log_metrics(record)
            self._save(LAST)
            if finished:
                break
        if metrics and is_main_process():
            self.log(format_metrics(metrics))
            write_json_atomic(self.out / FINAL, metrics)
        return metrics
