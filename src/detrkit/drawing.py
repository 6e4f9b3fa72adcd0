"""Labelled boxes on a picture (Pillow only): the drawing that inference's annotated images and the
evaluation report's pictures share."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def color_of(key: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per category id (golden-ratio hues)."""
    hue = (key * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(255 * r), int(255 * g), int(255 * b)


def font_for(image: Image.Image) -> ImageFont.ImageFont:
    """The default font at a size readable on ``image``."""
    size = max(10, min(image.size) // 40)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def draw_boxes(
    image: Image.Image, boxes: Sequence[Sequence[float]], texts: Sequence[str], keys: Sequence[int]
) -> Image.Image:
    """Draw absolute (x1, y1, x2, y2) ``boxes`` on ``image`` in place, each outlined in the colour of
    its ``keys`` entry and labelled with its ``texts`` entry; returns ``image``."""
    draw = ImageDraw.Draw(image)
    font = font_for(image)
    width = max(1, min(image.size) // 200)
    for box, text, key in zip(boxes, texts, keys, strict=True):
        color = color_of(int(key))
        draw.rectangle(list(box), outline=color, width=width)
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
        y = box[1] - (bottom - top) - 2 if box[1] - (bottom - top) - 2 >= 0 else box[1]
        # Shift the label left when it would run off the right edge (boxes near the border).
        x = max(0.0, min(box[0], image.width - (right - left) - 2))
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=color)
        draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return image
