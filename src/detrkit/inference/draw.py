"""Annotated pictures of detections: boxes with class names and scores, translucent instance masks,
colourised panoptic and semantic segmentations (Pillow only)."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .detector import Detections


def color_of(key: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per category id (golden-ratio hues)."""
    hue = (key * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(255 * r), int(255 * g), int(255 * b)


def _font(image: Image.Image) -> ImageFont.ImageFont:
    size = max(10, min(image.size) // 40)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


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

    draw = ImageDraw.Draw(image)
    font = _font(image)
    width = max(1, min(image.size) // 200)
    boxes = detections.boxes.tolist() if isinstance(detections.boxes, torch.Tensor) else detections.boxes
    for box, score, label, name in zip(
        boxes, detections.scores.tolist(), detections.labels.tolist(), detections.names
    ):
        color = color_of(int(label))
        draw.rectangle(box, outline=color, width=width)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
        y = box[1] - (bottom - top) - 2 if box[1] - (bottom - top) - 2 >= 0 else box[1]
        # Shift the label left when it would run off the right edge (boxes near the border).
        x = max(0.0, min(box[0], image.width - (right - left) - 2))
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=color)
        draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return image
