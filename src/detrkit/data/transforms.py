"""DETR's augmentations on ``torchvision.transforms.v2``: boxes and masks move with the image.

Inputs are ``(image, target)`` with ``image`` a ``tv_tensors.Image`` (uint8) and ``target`` a dict
holding ``boxes`` (``tv_tensors.BoundingBoxes``, absolute XYXY), ``labels`` and optionally ``masks``
(``tv_tensors.Mask``). Boxes that become degenerate (after a crop) are removed together with their
labels and masks by ``SanitizeBoundingBoxes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def scaled_size(size: int, factor: float) -> int:
    """A size of the paper's recipe at scale ``factor`` (at least 8 px)."""
    return max(8, int(round(size * factor)))


@dataclass(frozen=True)
class TransformConfig:
    """Image sizes of the training recipe (the paper's by default).

    Training: horizontal flip; then, with equal probability, either a resize of the shorter side
    to one of ``train_scales`` (longer side at most ``max_size``), or a resize to one of
    ``crop_scales``, a random crop of ``crop_min``..``crop_max`` pixels per side and the same
    random resize. Evaluation: shorter side ``eval_size``, longer side at most ``max_size``.
    """

    train_scales: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int = 1333
    crop_scales: tuple[int, ...] = (400, 500, 600)
    crop_min: int = 384
    crop_max: int = 600
    eval_size: int = 800
    hflip_prob: float = 0.5
    crop_prob: float = 0.5  # the share of samples that take the crop branch
    color_jitter: float = 0.0  # brightness, contrast and saturation jitter (hue a quarter of it)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not self.train_scales or min(self.train_scales) < 1:
            raise ConfigError(f"train_scales={self.train_scales}: need at least one positive size")
        if not 1 <= self.crop_min <= self.crop_max:
            raise ConfigError(f"need 1 <= crop_min <= crop_max, got {self.crop_min}, {self.crop_max}")
        for name in ("hflip_prob", "crop_prob", "color_jitter"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be in [0, 1]")
        if self.max_size < max(self.train_scales + (self.eval_size,)):
            raise ConfigError(f"max_size={self.max_size} is smaller than a requested shorter side")
        object.__setattr__(self, "train_scales", tuple(self.train_scales))
        object.__setattr__(self, "crop_scales", tuple(self.crop_scales))

    @classmethod
    def scaled(cls, factor: float, **overrides: Any) -> TransformConfig:
        """The paper's recipe with every size multiplied by ``factor`` (e.g. 0.25 for CPU training)."""
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 10:
            raise ConfigError(f"TransformConfig.scaled({factor!r}): the scale must be a number in (0, 10]")

        def s(x: int) -> int:
            return scaled_size(x, factor)

        base = cls()
        fields = dict(
            train_scales=tuple(sorted({s(x) for x in base.train_scales})),
            max_size=s(base.max_size),
            crop_scales=tuple(s(x) for x in base.crop_scales),
            crop_min=s(base.crop_min),
            crop_max=s(base.crop_max),
            eval_size=s(base.eval_size),
        )
        fields.update(overrides)
        return cls(**fields)


def resized_shape(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """The original DETR's output size: shorter side ``size``, longer side at most ``max_size``."""
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            # At least a pixel: a 1x3000 strip would otherwise round to nothing.
            size = max(1, int(round(max_size * short / long)))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    # The original can overshoot max_size by a pixel through the rounding above; cap it.
    cap = max_size if max_size is not None else float("inf")
    if width < height:
        return int(min(size * height / width, cap)), size
    return size, int(min(size * width / height, cap))


class RandomResize(v2.Transform):
    """Resize so the shorter side is one of ``sizes`` (chosen at random), the longer side at most
    ``max_size``, with the original DETR's rounding (so evaluation sizes match it exactly).

    Masks use nearest-exact sampling, which keeps their edges within a pixel of the boxes even
    after several resizes (plain "nearest" drifts up and left by up to a pixel each time).
    """

    def __init__(self, sizes: list[int] | tuple[int, ...], max_size: int | None = None) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        size = self.sizes[int(torch.randint(len(self.sizes), ()))]
        return {"size": list(resized_shape(height, width, size, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            out = F.resize_image(
                inpt.as_subclass(torch.Tensor),
                params["size"],
                interpolation=v2.InterpolationMode.NEAREST_EXACT,
            )
            return tv_tensors.wrap(out, like=inpt)
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class RandomSizeCrop(v2.Transform):
    """Crop a random region whose sides are drawn uniformly in [min_size, max_size] (and fit)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h = int(torch.randint(min(self.min_size, height), min(height, self.max_size) + 1, ()))
        crop_w = int(torch.randint(min(self.min_size, width), min(width, self.max_size) + 1, ()))
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


# Plain tensors of a target with one entry per object; boxes and masks are tv_tensors, which
# torchvision filters by itself.
PER_OBJECT_FIELDS = ("labels", "iscrowd", "area")


def _per_object_fields(inputs: Any) -> tuple[torch.Tensor, ...]:
    """Every per-object field of the ``(image, target)`` sample, so that an object dropped by
    ``SanitizeBoundingBoxes`` is dropped from all of them and they stay aligned with the boxes."""
    samples = [inputs] if isinstance(inputs, dict) else list(inputs)
    target = next((x for x in samples if isinstance(x, dict)), {})
    return tuple(target[k] for k in PER_OBJECT_FIELDS if k in target)


def _finish(config: TransformConfig) -> list[v2.Transform]:
    return [
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_per_object_fields),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(config.mean), std=list(config.std)),
    ]


def train_transforms(config: TransformConfig | None = None) -> v2.Compose:
    """The paper's training augmentation (see :class:`TransformConfig`)."""
    config = config or TransformConfig()
    resize = RandomResize(config.train_scales, max_size=config.max_size)
    crop_then_resize = v2.Compose(
        [
            RandomResize(config.crop_scales),
            RandomSizeCrop(config.crop_min, config.crop_max),
            RandomResize(config.train_scales, max_size=config.max_size),
        ]
    )
    jitter = config.color_jitter
    colour = (
        [v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter / 4)]
        if jitter
        else []
    )
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(config.hflip_prob),
            v2.RandomChoice([resize, crop_then_resize], p=[1 - config.crop_prob, config.crop_prob]),
            *colour,
            *_finish(config),
        ]
    )


AUGMENT_PRESETS = ("none", "light", "paper", "strong")


def augmentation(
    preset: str = "paper",
    scale: float = 1.0,
    *,
    hflip: bool | None = None,
    crop: bool | None = None,
    scale_min: int | None = None,
    scale_max: int | None = None,
    color_jitter: float | None = None,
) -> v2.Compose:
    """The training transforms of an augmentation ``preset`` at image ``scale``, with switches
    (None: the preset's). Presets: ``none`` (the evaluation resize only), ``light`` (flips and
    resizes of the larger half of the paper's sizes), ``paper`` (DETR's: flips, resizes of the
    shorter side to 480-800, crops), ``strong`` (paper and colour jitter 0.3). ``scale_min`` /
    ``scale_max``: the range of training shorter sides in the paper's pixels (times ``scale``)."""
    if preset not in AUGMENT_PRESETS:
        raise ConfigError(f"augment={preset!r}: expected one of {', '.join(AUGMENT_PRESETS)}")
    paper = TransformConfig()
    low, high = {"none": (paper.eval_size, paper.eval_size), "light": (608, 800)}.get(preset, (480, 800))
    low, high = scale_min or low, scale_max or high
    if not 0 < low <= high:
        raise ConfigError(f"scale_min={low}, scale_max={high}: need 0 < scale_min <= scale_max")
    switches = (hflip, crop, scale_min, scale_max, color_jitter)
    if preset == "none" and all(v is None for v in switches):
        return eval_transforms(TransformConfig.scaled(scale))
    flips = preset != "none" if hflip is None else hflip
    crops = preset in ("paper", "strong") if crop is None else crop
    jitter = (0.3 if preset == "strong" else 0.0) if color_jitter is None else color_jitter
    base = TransformConfig.scaled(scale)
    if (low, high) == (480, 800):
        train_scales = base.train_scales  # the paper's, exactly
    else:
        if high > paper.max_size:
            raise ConfigError(f"scale_max={high}: at most {paper.max_size} (the longest side allowed)")
        sizes = set(range(low, high + 1, 32)) | {high}
        train_scales = tuple(sorted({scaled_size(x, scale) for x in sizes}))
    config = TransformConfig.scaled(
        scale, train_scales=train_scales, hflip_prob=0.5 if flips else 0.0,
        crop_prob=0.5 if crops else 0.0, color_jitter=jitter,
    )  # fmt: skip
    return train_transforms(config)


def eval_transforms(config: TransformConfig | None = None) -> v2.Compose:
    """Deterministic resize to ``eval_size`` (longer side capped at ``max_size``) and normalisation."""
    config = config or TransformConfig()
    return v2.Compose([RandomResize([config.eval_size], max_size=config.max_size), *_finish(config)])


def denormalize(image: torch.Tensor, config: TransformConfig | None = None) -> torch.Tensor:
    """Undo the normalisation: Tensor[3, H, W] -> values in [0, 1]."""
    config = config or TransformConfig()
    mean = torch.tensor(config.mean, device=image.device)[:, None, None]
    std = torch.tensor(config.std, device=image.device)[:, None, None]
    return (image * std + mean).clamp(0, 1)
