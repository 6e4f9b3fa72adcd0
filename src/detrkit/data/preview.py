"""``detrkit data preview DATA --out grid.png``: a grid of training samples as the model will see
them (after the augmentation asked for), with their boxes drawn, so that flips, crops, scales and
colour changes can be judged before a run."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from PIL import Image
from torchvision.ops import box_convert

from ..drawing import draw_boxes
from ..fileio import atomic_write
from .coco import CocoDetection
from .transforms import denormalize


def preview_grid(dataset: CocoDetection, count: int = 16, *, seed: int = 0, columns: int = 4) -> Image.Image:
    """``count`` augmented samples of ``dataset`` (drawn at random with ``seed``) with their boxes,
    tiled ``columns`` wide; each tile as large as the largest sample."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(len(dataset), (count,), generator=generator).tolist()
    torch.manual_seed(seed)  # the augmentation's own draws
    names = dataset.category_map.names
    tiles = []
    for index in indices:
        sample = dataset[index]
        if not isinstance(sample, tuple):  # an unreadable image
            continue
        image, target = sample
        pixels = (denormalize(image) * 255).round().byte().permute(1, 2, 0).numpy()
        height, width = pixels.shape[:2]
        # Targets hold normalised (cx, cy, w, h): back to pixel corners for drawing.
        absolute = target["boxes"] * torch.tensor([width, height, width, height])
        boxes = box_convert(absolute, "cxcywh", "xyxy").tolist()
        labels = target["labels"].tolist()
        tiles.append(draw_boxes(Image.fromarray(pixels), boxes, [names[i] for i in labels], labels))
    if not tiles:
        raise ValueError("no sample of the dataset could be read")
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new(
        "RGB", (columns * cell_w + (columns - 1) * 4, rows * cell_h + (rows - 1) * 4), (255, 255, 255)
    )
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * (cell_w + 4), (i // columns) * (cell_h + 4)))
    return grid


def write_preview(dataset: CocoDetection, out: str | os.PathLike, **options) -> Path:
    grid = preview_grid(dataset, **options)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return atomic_write(Path(out), lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
