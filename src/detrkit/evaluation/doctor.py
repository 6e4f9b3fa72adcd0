"""Why is my AP zero? The usual causes, found in a dataset for a given model before hours of training
or evaluation are lost (``detrkit data check DATA --model WEIGHTS``):

- category ids that match no class of the model (and names that contradict it);
- boxes written as [x1, y1, x2, y2] where COCO's bbox is [x, y, width, height];
- objects too small to be seen once the image is resized to the model's input size;
- images far larger than that size (everything in them shrinks);
- classes with too few examples to learn;
- images with more objects than the model has queries.

Each finding is added to a :class:`~detrkit.data.check.CheckReport`: an error where the model cannot
work as meant, a warning where it will work poorly.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from ..data.check import CheckReport
from ..data.coco import DatasetError
from ..data.transforms import TransformConfig, resized_shape
from ..models.config import DetrConfig
from .loop import model_category_map, name_clashes

MIN_EXAMPLES = 10  # objects of a class below which it is flagged as too rare to learn
XYXY_SHARE = 0.2  # share of boxes running off their image (as xywh) that flags a whole file


def stride_of(config: DetrConfig) -> int:
    """The feature stride of the model's backbone (32 for the paper's ResNet; 16 with DC5)."""
    stride = 2 ** (config.last_stage + 1)
    return stride // 2 if config.dilation and config.last_stage == 4 else stride


def check_for_model(data: dict[str, Any], config: DetrConfig, report: CheckReport) -> None:
    """Add to ``report`` what in the COCO instances dict ``data`` would keep ``config``'s model
    from scoring (a structurally sound file: run the plain checks first)."""
    categories = data.get("categories", [])
    annotations = [a for a in data.get("annotations", []) if not a.get("iscrowd", 0)]
    images = {img.get("id"): img for img in data.get("images", [])}
    _check_classes(categories, annotations, config, report)
    boxes, sizes = [], []
    for ann in annotations:
        image, bbox = images.get(ann.get("image_id")), ann.get("bbox")
        if image and isinstance(bbox, list) and len(bbox) == 4 and image.get("width") and image.get("height"):
            boxes.append(bbox)
            sizes.append((image["width"], image["height"]))
    boxes_np = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sizes_np = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    _check_xyxy(boxes_np, sizes_np, report)
    _check_scale(boxes_np, sizes_np, list(images.values()), config, report)
    per_image = Counter(a.get("image_id") for a in annotations)
    most = max(per_image.values(), default=0)
    crowded = [i for i, n in per_image.items() if n > config.num_queries]
    if crowded:
        report.error(
            "more objects than queries",
            f"{len(crowded)} image(s) hold more objects than the model's {config.num_queries} queries (up to "
            f"{most}, e.g. image {crowded[0]}): the rest can never be found; raise model.num_queries",
        )
    elif most > 0.7 * config.num_queries:
        report.warn(
            "nearly as many objects as queries",
            f"up to {most} objects in an image for {config.num_queries} queries: recall suffers when queries "
            "run short; consider a larger model.num_queries",
        )


def _check_classes(categories, annotations, config: DetrConfig, report: CheckReport) -> None:
    try:
        cmap = model_category_map(config, categories)
    except DatasetError as e:
        report.error("classes the model cannot map", str(e))
        return
    used = Counter(a.get("category_id") for a in annotations)
    unknown = sorted((c for c in used if c not in set(cmap.category_ids)), key=str)
    if unknown:
        count = sum(used[c] for c in unknown)
        report.error(
            "category ids that match no model class",
            f"{len(unknown)} category id(s) ({', '.join(map(str, unknown[:8]))}) with {count} objects: the "
            f"model predicts ids {', '.join(map(str, cmap.category_ids[:8]))}"
            + ("..." if len(cmap.category_ids) > 8 else "")
            + "; fine-tune on this data (train --init-from) so that its head learns these classes",
        )
    for clash in name_clashes(cmap, categories):
        report.warn("classes the model names differently (id: model / data)", clash)
    names = {c.get("id"): c.get("name", c.get("id")) for c in categories}
    for category in cmap.category_ids:
        if category in names and used[category] < MIN_EXAMPLES:
            report.warn(
                f"classes with fewer than {MIN_EXAMPLES} objects",
                f"{names[category]!r} (id {category}): {used[category]} object(s)",
            )


def _check_xyxy(boxes: np.ndarray, sizes: np.ndarray, report: CheckReport) -> None:
    """Flag a file whose boxes run off their images as [x, y, w, h] but fit as [x1, y1, x2, y2]."""
    if not len(boxes):
        return
    x, y, w, h = boxes.T
    width, height = sizes.T
    off = (x + w > width + 1) | (y + h > height + 1)
    as_xyxy = (w > x) & (h > y) & (w <= width + 1) & (h <= height + 1)
    if off.mean() >= XYXY_SHARE and (off & as_xyxy).sum() >= 0.8 * off.sum():
        report.error(
            "boxes that look like [x1, y1, x2, y2]",
            f"{int(off.sum())} of {len(boxes)} boxes run off their image read as COCO's [x, y, width, height] "
            "but fit as [x1, y1, x2, y2]: convert them (width = x2 - x1, height = y2 - y1)",
        )


def _check_scale(boxes, sizes, images: list[dict], config: DetrConfig, report: CheckReport) -> None:
    """Objects and images against the model's input size (``eval_size`` x its ``image_scale``)."""
    scale = config.image_scale
    transforms = TransformConfig.scaled(scale)
    stride = stride_of(config)
    if len(boxes):
        factors = np.array([_factor(w, h, transforms) for w, h in sizes])
        seen = np.maximum(boxes[:, 2], boxes[:, 3]) * factors
        tiny = seen < stride / 2
        if tiny.mean() > 0.1:
            report.warn(
                "objects too small for the model's input size",
                f"{int(tiny.sum())} of {len(boxes)} objects ({tiny.mean():.0%}) are under {stride // 2} px once "
                f"the image is resized to a shorter side of {transforms.eval_size} px (image_scale={scale:g}), half "
                f"a cell of the stride-{stride} features: train and evaluate with a larger --image-scale",
            )
    sized = [(img["width"], img["height"]) for img in images if img.get("width") and img.get("height")]
    if sized:
        factors = np.array([_factor(w, h, transforms) for w, h in sized])
        if np.median(factors) < 0.25:
            width, height = np.median(np.asarray(sized, dtype=np.float64), axis=0)
            report.warn(
                "images much larger than the model's input size",
                f"the median image ({width:.0f}x{height:.0f}) is shrunk {1 / np.median(factors):.1f}x to a shorter "
                f"side of {transforms.eval_size} px (image_scale={scale:g}): small objects vanish; a larger "
                "--image-scale keeps them",
            )


def _factor(width: float, height: float, transforms: TransformConfig) -> float:
    """How much the evaluation resize scales an image of this size."""
    new_height, _ = resized_shape(int(height), int(width), transforms.eval_size, transforms.max_size)
    return new_height / max(height, 1) if math.isfinite(height) else 1.0
