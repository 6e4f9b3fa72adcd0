"""Typed configuration of a DETR model and its training losses.

One frozen dataclass holds everything needed to rebuild a model (architecture) and its criterion
(matcher costs and loss weights), so that ``build_criterion(model.config)`` always matches the model.
Defaults are those of the paper / the original training script (R50, 6+6 layers, 100 queries, COCO's
91-id class layout).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")  # torchvision's; or "timm:<any timm CNN>"
TIMM_PREFIX = "timm:"
POSITION_EMBEDDINGS = ("sine", "learned")
MAX_SIZES = {
    "num_queries": 10_000, "d_model": 8192, "nheads": 256, "dim_feedforward": 65_536,
    "enc_layers": 100, "dec_layers": 100, "num_classes": 100_000,
}  # fmt: skip
# The smallest scale of the paper's sizes (800-1333 px) that leaves an image of 32 px, a stride of stage 4.
MIN_IMAGE_SCALE = 0.04


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type annotation ``hint`` (ints count as floats; bools are not
    ints; lists fit tuples, as JSON and YAML give them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is dict:
        return isinstance(value, dict)
    if origin in (tuple, list):
        item = args[0] if args else Any
        return isinstance(value, (tuple, list)) and all(_matches(v, item) for v in value)
    return True


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_types(instance: Any) -> None:
    """Type-check every field of a config dataclass (values from YAML, TOML, JSON or ``--set``
    arrive as whatever the file said) and refuse non-finite numbers: one :class:`ConfigError`
    naming the field, the value and the type expected. Whole floats are stored as floats."""
    owner = type(instance).__name__
    for name, hint in typing.get_type_hints(type(instance)).items():
        value = getattr(instance, name)
        if isinstance(value, os.PathLike) and _matches("", hint):  # a Path where a str is expected
            value = os.fspath(value)
            object.__setattr__(instance, name, value)
        if (
            isinstance(value, str)
            and float in typing.get_args(hint) + (hint,)
            and _NUMBER.fullmatch(value.strip())
        ):
            # YAML 1.1 (PyYAML) reads `lr: 1e-4` as a string: a number written so is one.
            value = float(value)
            object.__setattr__(instance, name, value)
        if not _matches(value, hint):
            raise ConfigError(f"{owner}.{name}={value!r}: expected {_type_name(hint)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{owner}.{name}={value!r}: must be a finite number")
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and float in typing.get_args(hint) + (hint,)
        ):
            object.__setattr__(instance, name, float(value))


def construct(cls, data: dict[str, Any], what: str):
    """``cls(**data)`` with a clear error for keys that are not fields of the dataclass."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what}(s): {', '.join(unknown)}")
    return cls(**data)


@dataclass(frozen=True)
class DetrConfig:
    """Architecture and loss configuration of DETR.

    ``num_classes`` counts the real classes; the class head has ``num_classes + 1`` outputs, the last
    one being "no object". Labels are contiguous indices ``0..num_classes-1``; ``category_ids`` maps
    them back to a dataset's own ids (e.g. COCO's 1..90), and ``class_names`` names them.
    """

    # --- backbone -------------------------------------------------------------------------------
    # One of BACKBONES (torchvision ResNets), or "timm:<name>" for any timm CNN with four stages
    # (e.g. "timm:tf_mobilenetv3_small_075"; needs `pip install 'detrkit[timm]'`).
    backbone: str = "resnet50"
    dilation: bool = False  # DC5: dilate the last ResNet stage instead of striding it
    train_backbone: bool = True  # layers 2-4 trainable (conv1 and layer1 are always frozen)
    pretrained_backbone: bool = False  # ImageNet weights (torchvision / timm); downloads, so opt-in only
    frozen_bn: bool = True  # DETR's frozen BatchNorm; False for a backbone trained from scratch
    # timm backbones: freeze BatchNorm as transformers does (plain BN with eps 1e-5, dropping the
    # activation timm fuses into BatchNormAct2d); set for checkpoints read from transformers.
    transformers_bn: bool = False
    # Deepest ResNet stage used (2, 3 or 4 = the paper's). Fewer stages give a finer feature map
    # (stride 8 / 16 / 32) for small images and a cheaper backbone; the later stages are not built.
    last_stage: int = 4
    # --- transformer ----------------------------------------------------------------------------
    position_embedding: str = "sine"  # "sine" (normalised, temperature 10000) or "learned"
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    # --- heads ----------------------------------------------------------------------------------
    num_queries: int = 100
    num_classes: int = 91
    aux_loss: bool = True
    masks: bool = False  # add the mask head (instance / panoptic segmentation)
    freeze_detector: bool = False  # train only the mask head (the paper's second stage)
    # --- matcher costs --------------------------------------------------------------------------
    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    # --- loss weights ---------------------------------------------------------------------------
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    mask_loss_coef: float = 1.0
    dice_loss_coef: float = 1.0
    eos_coef: float = 0.1  # relative weight of the "no object" class in the classification loss
    # --- labels ---------------------------------------------------------------------------------
    class_names: tuple[str, ...] | None = None
    category_ids: tuple[int, ...] | None = None  # dataset id of each contiguous label
    stuff_ids: tuple[int, ...] | None = None  # panoptic models: dataset ids of the stuff classes
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # free-form metadata

    def __post_init__(self) -> None:
        check_types(self)
        # Tuples may arrive as lists (JSON); normalise so the config stays hashable and comparable.
        for name in ("class_names", "category_ids", "stuff_ids"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for any inconsistent value."""

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"DetrConfig.{name}={getattr(self, name)!r}: {why}")

        if self.timm_name is not None:
            self._validate_timm(bad)
        elif self.backbone not in BACKBONES:
            raise bad("backbone", f"expected one of {', '.join(BACKBONES)}, or timm:<timm model name>")
        elif self.transformers_bn:
            raise bad("transformers_bn", "applies to timm backbones only")
        if self.dilation and self.backbone in ("resnet18", "resnet34"):
            raise bad("dilation", f"DC5 needs a bottleneck ResNet (resnet50/101), not {self.backbone}")
        if self.last_stage not in (2, 3, 4):
            raise bad(
                "last_stage", "expected 2, 3 or 4 (the ResNet stage whose output feeds the transformer)"
            )
        if self.dilation and self.last_stage != 4:
            raise bad("dilation", "DC5 dilates stage 4, which last_stage < 4 does not build")
        if self.masks and self.last_stage < 3:
            raise bad("last_stage", "the mask head needs at least 3 backbone stages")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise bad("position_embedding", f"expected one of {', '.join(POSITION_EMBEDDINGS)}")
        for name in ("d_model", "nheads", "dim_feedforward", "num_queries", "num_classes", "dec_layers"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if self.enc_layers < 0:
            raise bad("enc_layers", "must be >= 0")
        # Bounds far above any DETR (100 queries, 256 channels, 6 layers), below what would only
        # exhaust memory: a typo costs a message, not a machine.
        for name, most in MAX_SIZES.items():
            if getattr(self, name) > most:
                raise bad(name, f"must be at most {most}")
        costs = ("set_cost_class", "set_cost_bbox", "set_cost_giou")
        coefs = ("bbox_loss_coef", "giou_loss_coef", "mask_loss_coef", "dice_loss_coef")
        for name in costs + coefs:
            if getattr(self, name) < 0:
                raise bad(name, "must be 0 or more (a negative weight rewards the error)")
        if not any(getattr(self, name) for name in costs):
            raise bad("set_cost_class", "the matcher needs at least one of its three costs above 0")
        if self.category_ids is not None and any(not 0 <= i < 2**63 for i in self.category_ids):
            raise bad("category_ids", "ids must be in [0, 2**63)")
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise bad("extra", f"must be JSON data: it is saved with the weights ({e})") from None
        scale = self.extra.get("image_scale", 1.0) if isinstance(self.extra, dict) else 1.0
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not MIN_IMAGE_SCALE <= scale <= 10
        ):
            raise bad("extra", f"image_scale={scale!r} must be a number in [{MIN_IMAGE_SCALE}, 10]")
        if self.d_model % self.nheads:
            raise bad("nheads", f"d_model={self.d_model} must be divisible by the number of heads")
        if self.d_model % 2:
            raise bad("d_model", "must be even (half of it encodes x, half y)")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        if not 0.0 < self.eos_coef <= 1.0:
            raise bad("eos_coef", "the no-object class weight must be in (0, 1]")
        if self.masks and (self.d_model % 16 or (self.d_model + self.nheads) % 8):
            raise bad("d_model", "the mask head needs d_model divisible by 16 and d_model + nheads by 8")
        for name in ("class_names", "category_ids"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_classes:
                raise bad(name, f"has {len(value)} entries but num_classes={self.num_classes}")
        if self.category_ids is not None and len(set(self.category_ids)) != len(self.category_ids):
            raise bad("category_ids", "ids must be unique")
        if self.stuff_ids is not None:
            unknown = set(self.stuff_ids) - set(self.label_ids)
            if unknown:
                raise bad("stuff_ids", f"ids {sorted(unknown)} are not category ids of this model")

    def _validate_timm(self, bad) -> None:
        from .timm_backbone import timm_features

        if not self.timm_name:
            raise bad("backbone", "expected timm:<timm model name>")
        if self.transformers_bn and not self.frozen_bn:
            raise bad("transformers_bn", "freezes BatchNorm, which frozen_bn=False trains")
        try:
            timm_features(self.timm_name, self.dilation)  # cached; built without weights
        except ConfigError as e:
            raise bad(
                "dilation" if self.dilation and "output_stride" in str(e) else "backbone", str(e)
            ) from None

    # --- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("class_names", "category_ids", "stuff_ids"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetrConfig:
        return construct(cls, data, "DetrConfig field")

    @classmethod
    def from_json(cls, text: str) -> DetrConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> DetrConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def image_scale(self) -> float:
        """The scale of the paper's image sizes the model was trained at (``extra["image_scale"]``;
        1.0, the paper's, where the checkpoint does not say): what evaluation resizes to."""
        return float(self.extra.get("image_scale", 1.0))

    @property
    def label_ids(self) -> tuple[int, ...]:
        """The dataset category id of each contiguous label (the label itself without ``category_ids``)."""
        return self.category_ids if self.category_ids is not None else tuple(range(self.num_classes))

    @property
    def is_thing(self) -> tuple[bool, ...]:
        """Per contiguous label: a *thing* (countable object) rather than *stuff* (panoptic models)."""
        stuff = set(self.stuff_ids or ())
        return tuple(i not in stuff for i in self.label_ids)

    @property
    def timm_name(self) -> str | None:
        """The timm model name of a ``timm:<name>`` backbone, else None."""
        return self.backbone[len(TIMM_PREFIX) :] if self.backbone.startswith(TIMM_PREFIX) else None

    @property
    def num_channels(self) -> int:
        """Channels of the backbone's last feature map (timm: from its ``feature_info``, cached)."""
        if self.timm_name is not None:
            from .timm_backbone import timm_features

            return timm_features(self.timm_name, self.dilation).channels[self.last_stage - 1]
        expansion = 1 if self.backbone in ("resnet18", "resnet34") else 4
        return 64 * expansion * 2 ** (self.last_stage - 1)
