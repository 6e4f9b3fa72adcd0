"""Annotated pictures of detections: boxes with class names and scores, translucent instance masks,
colourised panoptic and semantic segmentations (Pillow only)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..drawing import color_of, draw_boxes
from .detector import Detections


def _blend(image: Image.Image, colors: np.ndarray, where: np.ndarray, alpha: float) -> Image.Image:
    """Mix ``colors`` uint8[H, W, 3] into ``image`` where ``where`` Bool[H, W] holds."""
    array = np.asarray(image, dtype=np.float32).copy()
    array[where] = (1 - alpha) * array[where] + alpha * colors[where]
    return Image.fromarray(array.round().astype(np.uint8), mode="RGB")


def draw_detections(image: Image.Image, detections: Detections, *, alpha: float = 0.45) -> Image.Image:
    """A copy of ``image`` (RGB) with the detections drawn on it.

    Instance masks and panoptic/semantic segmentations are blended translucently underneath the boxes;
    each box is labelled ``name score``.
    """
    image = image.convert("RGB")
    if detections.segments is not None and detections.segments_info:
        segments = detections.segments.numpy()
        palette = np.zeros((int(segments.max()) + 1, 3), dtype=np.uint8)
        for s in detections.segments_info:
            base = np.array(color_of(s["category_id"]), dtype=np.int32)
            # Things of one class get slightly different shades so neighbours stay distinguishable.
            jitter = (s["id"] * 37 % 61 - 30) if s["isthing"] else 0
            palette[s["id"]] = np.clip(base + jitter, 0, 255)
        image = _blend(image, palette[segments], segments > 0, alpha)
    elif detections.semantic is not None:
        semantic = detections.semantic.numpy()
        ids = np.unique(semantic)
        palette = {int(i): color_of(int(i)) for i in ids}
        colors = np.zeros((*semantic.shape, 3), dtype=np.uint8)
        for i, color in palette.items():
            colors[semantic == i] = color
        image = _blend(image, colors, np.ones(semantic.shape, bool), alpha)
    if detections.masks is not None and len(detections.masks):
        masks = detections.masks.numpy()
        colors = np.array([color_of(int(c)) for c in detections.labels.tolist()], dtype=np.uint8)
        # The highest-scoring mask wins where masks overlap (detections are sorted by score).
        top = np.where(masks.any(0), masks.argmax(0), -1)
        image = _blend(image, colors[np.maximum(top, 0)], top >= 0, alpha)

    boxes = detections.boxes.tolist() if isinstance(detections.boxes, torch.Tensor) else detections.boxes
    texts = [f"{name} {score:.2f}" for name, score in zip(detections.names, detections.scores.tolist())]
    return draw_boxes(image, boxes, texts, detections.labels.tolist())
