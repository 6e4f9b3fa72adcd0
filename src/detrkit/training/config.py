"""Typed training configuration, presets, and loading from YAML/TOML files with overrides.

Precedence, lowest first: ``TrainConfig`` defaults (the paper's recipe) < preset < config file <
command-line options. On ``--resume`` the run's saved config replaces the first three, and only
options given explicitly on the command line override it (each one reported).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileio import read_text_file
from ..models.config import MIN_IMAGE_SCALE, DetrConfig, check_types, construct
from .schedule import SCHEDULES


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: bool = True, **kwargs: Any) -> Any:
    """A :class:`TrainConfig` field with its help text: the one place an option is described.
    ``detrkit train`` makes a ``--flag`` of every field (``flag=False``: deliberately none)."""
    return field(default=default, metadata={"help": help, "flag": flag}, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. ``model`` holds DetrConfig fields (the number of classes,
    class names and category ids come from the dataset).

    Each field's help text (``dataclasses.fields(TrainConfig)[i].metadata["help"]``) is the help of
    its ``detrkit train --flag``."""

    data: str = option(
        "synthetic", 'dataset root (COCO layout or Roboflow-style export), an instances JSON, or "synthetic"'
    )
    data_format: str = option("auto", "format of --data: auto (detected), coco, yolo, voc or labelme")
    train_split: str = option("train2017", "name of the training split (annotations/instances_<split>.json)")
    val_split: str = option("val2017", "name of the validation split")
    output_dir: str = option("runs/detr", "run folder: checkpoints, metrics.jsonl, results")
    # Set with --set model.KEY=VALUE (and --masks): a dict has no single flag.
    model: dict[str, Any] = option(help="DetrConfig fields of the model", flag=False, default_factory=dict)
    image_scale: float = option(1.0, "scale all augmentation sizes (1.0 = the paper's 800/1333; 0.2 for CPU)")
    augment: str = option(
        "paper",
        "augmentation preset: none (the evaluation resize only), light, paper (DETR's flips, multi-scale "
        "resizes and crops) or strong (paper + colour jitter)",
    )
    hflip: bool | None = option(
        None, "horizontal flips (--no-hflip: data that must not be mirrored; default: the preset's)"
    )
    crop: bool | None = option(None, "random crops (default: the preset's)")
    scale_min: int | None = option(
        None, "smallest training shorter side in the paper's pixels, times --image-scale (480)"
    )
    scale_max: int | None = option(
        None, "largest training shorter side in the paper's pixels, times --image-scale (800)"
    )
    color_jitter: float | None = option(
        None,
        "brightness/contrast/saturation jitter strength in [0, 1] (default: the preset's: 0.3 for strong)",
    )
    # COCO panoptic data (annotations/panoptic_{split}.json + PNGs): things and stuff, mask head on,
    # evaluated with PQ. Otherwise instances JSON (boxes; masks too with model.masks).
    panoptic: bool = option(False, "COCO panoptic data: things + stuff with masks, PQ evaluation")
    epochs: int = option(300, "number of epochs")
    max_steps: int | None = option(None, "stop after this many optimizer steps (overrides epochs)")
    time_budget: float | None = option(
        None,
        "minutes of training (backbone pretraining included, evaluation not); the epoch that crosses it is the last",
    )
    batch_size: int = option(2, "images per process and step")
    grad_accum: int = option(1, "accumulate gradients over this many batches")
    lr: float = option(1e-4, "learning rate of the transformer and heads (1e-4)")
    lr_backbone: float = option(1e-5, "learning rate of the backbone (1e-5)")
    weight_decay: float = option(1e-4, "AdamW weight decay (1e-4)")
    lr_drop: int = option(200, "epochs before the learning rate drops 10x (lr_schedule step)")
    # "step": the paper's single drop after lr_drop epochs; "linear"/"cosine": decay to 0 over the
    # last lr_decay_fraction of the run (its epochs, or its time budget when that ends it first),
    # constant before (detrkit.training.schedule).
    lr_schedule: str = option(
        "step",
        "step (the paper's drop after --lr-drop epochs), linear or cosine (decay to 0 over the run or its --time-budget)",
    )
    lr_decay_fraction: float = option(
        1.0, "linear/cosine: decay over this last share of the run, constant before (1.0)"
    )
    clip_max_norm: float = option(0.1, "gradient clipping (0.1); 0 disables")
    # bf16 under "auto" only where the CPU has native bf16 instructions (AVX512-BF16/AMX): there it
    # is faster; elsewhere it is emulated (detrkit.amp.resolve_amp).
    amp: str = option(
        "none",
        "mixed precision: none, bf16, fp16 (CUDA) or auto (bf16 on CPUs with native bf16)",
    )
    ema_decay: float | None = option(
        None, "keep an exponential moving average of the weights (e.g. 0.9997); evaluation uses it"
    )
    eval_every: int = option(1, "evaluate every N epochs (0: at the end only)")
    monitor: str = option(
        "auto",
        "metric that picks checkpoint_best and early stopping: bbox/AP (auto; PQ for panoptic runs), "
        "bbox/AP50, segm/AP, PQ, val/loss, bbox/AP_per_class/<class name>, ...",
    )
    patience: int | None = option(
        None, "stop after this many evaluations in a row without improving --monitor by more than --min-delta"
    )
    min_delta: float = option(0.0, "the smallest change of --monitor that counts as an improvement (0)")
    num_workers: int = option(2, "DataLoader worker processes")
    log: str = option(
        "", "experiment trackers, comma-separated: tensorboard, wandb, mlflow (e.g. --log tensorboard,mlflow)"
    )
    seed: int = option(42, "random seed")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    init_from: str | None = option(
        None, "fine-tune from a checkpoint (any format load_model reads, or an official name)"
    )
    freeze_backbone: bool = option(False, "do not train the backbone")
    max_bad_steps: int = option(5, "consecutive non-finite losses before training stops")
    synth_images: int = option(64, "training images of the synthetic dataset (--data synthetic)")
    synth_shapes: str = option("basic", "class set of the synthetic dataset: basic or other")
    # A from-scratch backbone's substitute for ImageNet weights (detrkit.training.pretrain).
    backbone_pretrain_steps: int = option(
        0, "steps of dense pretraining of the backbone on the training masks before DETR trains (0: none)"
    )
    backbone_pretrain_lr: float = option(1e-3, "learning rate of the backbone pretraining stage")
    # Training-only convergence aids (detrkit.training.aids); the saved model stays a plain DETR.
    query_groups: int = option(1, "Group DETR: train this many query groups (training only; 1 = off)")
    denoising_groups: int = option(
        0,
        "DN-DETR: train with this many noised copies of the ground truth as queries (training only; 0 = off)",
    )

    def __post_init__(self) -> None:
        if isinstance(self.augment, bool):  # on/off, as older configs (and checkpoints) hold it
            object.__setattr__(self, "augment", "paper" if self.augment else "none")
        check_types(self)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the option for any value out of its range."""

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        for name in ("lr", "lr_backbone", "backbone_pretrain_lr"):
            if not 0 < getattr(self, name) <= 1:
                raise bad(name, "a learning rate must be in (0, 1]")
        if not 0 <= self.weight_decay <= 1:
            raise bad("weight_decay", "must be in [0, 1]")
        if self.clip_max_norm < 0:
            raise bad("clip_max_norm", "must be 0 (no clipping) or positive")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise bad("ema_decay", "must be in (0, 1), e.g. 0.9997")
        if self.time_budget is not None and self.time_budget <= 0:
            raise bad("time_budget", "must be a positive number of minutes")
        if not MIN_IMAGE_SCALE <= self.image_scale <= 10:
            raise bad("image_scale", f"must be in [{MIN_IMAGE_SCALE}, 10] (1.0 = the paper's sizes)")
        for name in ("eval_every", "num_workers"):
            if getattr(self, name) < 0:
                raise bad(name, "must be 0 or more")
        if self.data_format not in ("auto", "coco", "yolo", "voc", "labelme"):
            raise bad("data_format", "expected auto, coco, yolo, voc or labelme")
        from ..data.transforms import augmentation

        # Built once here to refuse a bad preset or switch, naming it, before any work.
        augmentation(
            self.augment,
            self.image_scale,
            hflip=self.hflip,
            crop=self.crop,
            scale_min=self.scale_min,
            scale_max=self.scale_max,
            color_jitter=self.color_jitter,
        )  # fmt: skip
        if self.synth_shapes not in ("basic", "other"):
            raise bad("synth_shapes", "expected 'basic' or 'other'")
        if self.synth_images < 1:
            raise bad("synth_images", "must be at least 1")
        if not 0 <= self.seed < 2**63:
            raise bad("seed", "must be in [0, 2**63)")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise bad("device", "expected auto, cpu, mps, cuda or cuda:N")
        for name in ("data", "output_dir", "train_split", "val_split"):
            if not getattr(self, name).strip():
                raise bad(name, "must not be empty")
        if not 0 < self.lr_decay_fraction <= 1:
            raise bad("lr_decay_fraction", "must be in (0, 1] (1 = decay over the whole run)")
        if self.lr_schedule not in SCHEDULES:
            raise bad("lr_schedule", f"expected one of {', '.join(SCHEDULES)}")
        if self.amp not in ("none", "bf16", "fp16", "auto"):
            raise ConfigError(f"amp={self.amp!r}: expected 'none', 'bf16', 'fp16' or 'auto'")
        for name in ("epochs", "batch_size", "grad_accum", "max_bad_steps", "lr_drop"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be at least 1")
        from .loggers import parse_loggers

        parse_loggers(self.log)
        if self.patience is not None and self.patience < 1:
            raise bad("patience", "must be at least 1 evaluation")
        if not (0 <= self.min_delta < float("inf")):
            raise bad("min_delta", "must be 0 or a positive number")
        from .monitor import monitored_key

        monitored_key(self.monitor, panoptic=self.panoptic, masks=bool(self.model.get("masks")))
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps}: must be at least 1")
        if not 1 <= self.query_groups <= 64:
            raise ConfigError(f"query_groups={self.query_groups}: must be in [1, 64] (1 = plain DETR)")
        if not 0 <= self.denoising_groups <= 100:
            raise ConfigError(f"denoising_groups={self.denoising_groups}: must be in [0, 100] (0 = off)")
        if self.synth_images > 1_000_000:
            raise bad("synth_images", "must be at most 1000000")
        if self.panoptic or self.model.get("masks"):
            for name, off in (("query_groups", 1), ("denoising_groups", 0)):
                if getattr(self, name) != off:
                    raise ConfigError(
                        f"{name}={getattr(self, name)}: this training aid trains detection models only "
                        f"(the mask head would run on every query); use {off} with masks or panoptic"
                    )
        if self.backbone_pretrain_steps < 0:
            raise ConfigError(f"backbone_pretrain_steps={self.backbone_pretrain_steps}: must be 0 or more")
        model_fields = {f.name for f in dataclasses.fields(DetrConfig)}
        unknown = sorted(set(self.model) - model_fields)
        if unknown:
            raise ConfigError(f"model: unknown DetrConfig field(s) {', '.join(unknown)}")
        # The model's own checks, now rather than after the dataset is loaded (the label fields come
        # from the dataset and are checked with it).
        # With init_from, the other fields come from the checkpoint: checked when they are merged.
        labels = ("num_classes", "class_names", "category_ids", "stuff_ids")
        given = [name for name in labels if name in self.model]
        if given:
            raise ConfigError(
                f"model.{given[0]}: a run's classes come from its dataset's categories (their ids and "
                "names), not from options; edit the annotation file's 'categories' instead"
            )
        if self.init_from is None:
            DetrConfig(**{k: v for k, v in self.model.items() if k not in labels})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return construct(cls, data, "training option")


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into ``base``; the ``model`` sub-dict merges key by key."""
    out = dict(base)
    for key, value in update.items():
        if key == "model" and isinstance(value, dict):
            out["model"] = {**out.get("model", {}), **value}
        else:
            out[key] = value
    return out


# The paper's configurations, and small ones that train on a CPU in minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "detr-r50": {},
    "detr-r101": {"model": {"backbone": "resnet101"}},
    # DC5 models were trained with 1 image per GPU (padding costs them AP).
    "detr-r50-dc5": {"model": {"dilation": True}, "batch_size": 1},
    "detr-r101-dc5": {"model": {"backbone": "resnet101", "dilation": True}, "batch_size": 1},
    # Found by bench/convergence.py on a 2-core CPU (docs/benchmarks/convergence.md).
    "cpu-tiny": {
        "model": {
            "backbone": "resnet18",
            "d_model": 128,
            "nheads": 8,
            "enc_layers": 2,
            "dec_layers": 2,
            "dim_feedforward": 256,
            "num_queries": 16,
            "dropout": 0.0,
            # No ImageNet weights offline: the backbone learns from scratch, which frozen
            # (identity) BatchNorm statistics would cripple.
            "frozen_bn": False,
            # Stride-8 features (ResNet stages 1-2): ~12x15 cells on ~100 px images instead of 3x4.
            "last_stage": 2,
        },
        "image_scale": 0.12,
        "synth_images": 4096,  # unique images matter more than epochs
        "backbone_pretrain_steps": 800,  # dense pretraining replaces the missing ImageNet weights
        # Group DETR (training only): per epoch clearly ahead, per minute ahead by the end (docs/benchmarks/convergence.md, "Query groups").
        "query_groups": 4,
        "batch_size": 16,
        "lr": 3e-4,
        "lr_backbone": 1e-4,
        "epochs": 40,
        # Constant, then a linear decay to 0 over the last quarter of the run: its epochs, or its
        # --time-budget when that ends it first. 30 minutes: AP50 0.745 against 0.714 at a constant
        # rate (docs/benchmarks/convergence.md).
        "lr_schedule": "linear",
        "lr_decay_fraction": 0.25,
        "lr_drop": 30,
        "eval_every": 2,
        "num_workers": 0,
        # bf16 on CPUs with native bf16 instructions (a step at 0.75x the fp32 time), else fp32.
        "amp": "auto",
    },
}
# cpu-tiny with a timm MobileNetV3-Large (from scratch, stride 8) in place of the ResNet-18: fewer
# FLOPs per image, but on 2 CPU cores slower per epoch and under half as fast to converge per epoch
# (docs/benchmarks/convergence.md, "A timm backbone on a CPU"); needs the [timm] extra.
PRESETS["cpu-mobilenet"] = merge(PRESETS["cpu-tiny"], {"model": {"backbone": "timm:mobilenetv3_large_100"}})


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON training config as a dict."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"{path}: not a config file (expected .yaml, .yml, .toml or .json)")
    text = read_text_file(path, error=ConfigError, what="config file", max_bytes=1024**2)
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: not a config file (expected .yaml, .yml, .toml or .json)")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - parser errors of three libraries
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        if mark is not None and problem:  # PyYAML: say where, in one line
            e = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
        raise ConfigError(f"{path}: invalid config file ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of options")
    return data


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` (``model.key=value`` for model fields); the value is parsed as JSON when it can be."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key=value")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


# Sized to the data and the starting model when a run starts (detrkit.training.finetune).
FINETUNE = "finetune"


def build_config(
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> TrainConfig:
    """Defaults < ``preset`` < ``config_file`` < ``overrides``. The ``finetune`` preset reads the
    training split and the ``init_from`` checkpoint and logs its choices (``log``)."""
    if preset is not None and preset not in PRESETS and preset != FINETUNE:
        raise ConfigError(f"unknown preset {preset!r}: choose from {', '.join([*PRESETS, FINETUNE])}")
    chosen: dict[str, Any] = {}  # what the user chose: the config file, then the command line
    if config_file is not None:
        chosen = read_config_file(config_file)
    chosen = merge(chosen, nest(overrides or {}))
    data: dict[str, Any] = {}
    if preset == FINETUNE:
        from .finetune import finetune_options

        data = finetune_options(chosen, log)
    elif preset is not None:
        data = merge(data, PRESETS[preset])
    data = merge(data, chosen)
    # A preset's training aids are for detection: a mask or panoptic run of the preset trains
    # without them (an explicit query_groups/denoising_groups with masks is still refused, by validate).
    model = data.get("model", {})
    if data.get("panoptic") or (isinstance(model, dict) and model.get("masks")):
        for name in ("query_groups", "denoising_groups"):
            if name not in chosen:
                data.pop(name, None)
    return TrainConfig.from_dict(data)


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"model.num_queries": 20, "lr": 1e-4}`` -> ``{"model": {"num_queries": 20}, "lr": 1e-4}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith("model."):
            out.setdefault("model", {})[key[len("model.") :]] = value
        else:
            out[key] = value
    return out


def flatten(options: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`nest`: ``{"model": {"num_queries": 20}}`` -> ``{"model.num_queries": 20}``."""
    out = {}
    for key, value in options.items():
        if key == "model" and isinstance(value, dict):
            out.update({f"model.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out
