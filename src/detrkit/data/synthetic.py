"""A deterministic synthetic dataset in real COCO formats (instances + panoptic).

Each image has a two-region background ("sky" over "ground", the *stuff* categories) and 0..N
shapes (the *thing* categories: rectangles, ellipses, triangles, diamonds; or, with
``shapes="other"``, another class set for fine-tuning: crosses, rings, hexagons, half-discs) of
random colours and sizes that may overlap (every shape keeps at least half of itself visible). Boxes, masks and
panoptic segments are computed from what is actually visible, like human annotation. Category ids
are deliberately not contiguous (1, 2, 4, 7), as in real exports, so label mapping is exercised.

The files written are laid out like COCO 2017, so every loader treats them as COCO:

    OUT/train2017/*.jpg          OUT/annotations/instances_train2017.json
    OUT/val2017/*.jpg            OUT/annotations/panoptic_train2017.json (+ panoptic_train2017/*.png)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError
from ..fileio import atomic_write, write_json_atomic

THINGS = {1: "rectangle", 2: "ellipse", 4: "triangle", 7: "diamond"}
# A second, disjoint class set: a model trained on THINGS can be fine-tuned to it.
OTHER_THINGS = {3: "cross", 5: "ring", 6: "hexagon", 8: "half-disc"}
SHAPE_SETS = {"basic": THINGS, "other": OTHER_THINGS}
STUFF = {100: "sky", 101: "ground"}
MIN_VISIBLE = 0.5  # a new shape may not hide more than half of an earlier one


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Sizes are in pixels; ``empty_fraction`` of the images get no shapes."""

    images: int = 64
    seed: int = 0
    min_size: int = 128
    max_size: int = 192
    max_objects: int = 5
    empty_fraction: float = 0.1
    image_format: str = "jpg"  # or "png"
    shapes: str = "basic"  # the class set: "basic" (THINGS) or "other" (OTHER_THINGS)

    def __post_init__(self) -> None:
        if self.shapes not in SHAPE_SETS:
            raise ConfigError(f"shapes={self.shapes!r}: expected one of {', '.join(SHAPE_SETS)}")
        if self.images < 1:
            raise ConfigError(f"images={self.images}: must be at least 1")
        if not 32 <= self.min_size <= self.max_size <= 4096:
            raise ConfigError(
                f"need 32 <= min_size <= max_size <= 4096, got {self.min_size}, {self.max_size}"
            )
        if self.image_format not in ("jpg", "png"):
            raise ConfigError(f"image_format={self.image_format!r}: expected 'jpg' or 'png'")


@dataclass
class SynthSample:
    """One generated image with its ground truth."""

    image: Image.Image
    objects: list[dict[str, Any]]  # {"category_id", "mask": bool[H, W]}, in drawing order
    segments: np.ndarray  # int32[H, W]: 1..n = objects, n+1 = sky, n+2 = ground


def _shape_mask(
    rng: np.random.Generator, height: int, width: int, things: dict[int, str]
) -> tuple[int, np.ndarray]:
    category = int(rng.choice(list(things)))
    side = min(height, width)
    w = int(rng.uniform(0.15, 0.5) * side)
    h = int(np.clip(w * rng.uniform(0.6, 1.6), 0.12 * side, 0.6 * side))
    x0 = int(rng.integers(0, width - w))
    y0 = int(rng.integers(0, height - h))
    x1, y1 = x0 + w, y0 + h
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    name = things[category]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if name == "rectangle":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=1)
    elif name == "ellipse":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=1)
    elif name == "triangle":
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1) / 2, y0)], fill=1)
    elif name == "diamond":
        draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=1)
    elif name == "cross":  # two bars a third of the box thick
        tw, th = max(1, w // 3), max(1, h // 3)
        draw.rectangle([x0 + tw, y0, x1 - 1 - tw, y1 - 1], fill=1)
        draw.rectangle([x0, y0 + th, x1 - 1, y1 - 1 - th], fill=1)
    elif name == "ring":  # an ellipse with a hole half its size
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=1)
        draw.ellipse([x0 + w / 4, y0 + h / 4, x1 - 1 - w / 4, y1 - 1 - h / 4], fill=0)
    elif name == "hexagon":
        corners = np.linspace(0, 2 * np.pi, 7)[:-1]
        draw.polygon([(cx + (w - 1) / 2 * np.cos(a), cy + (h - 1) / 2 * np.sin(a)) for a in corners], fill=1)
    else:  # half-disc: the upper half of an ellipse twice the box's height
        draw.pieslice([x0, y0, x1 - 1, y0 + 2 * h - 1], 180, 360, fill=1)
    return category, np.asarray(canvas, dtype=bool)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def generate_sample(rng: np.random.Generator, config: SynthConfig) -> SynthSample:
    """One image, drawn with ``rng`` (so a seed fixes the whole dataset)."""
    height = int(rng.integers(config.min_size, config.max_size + 1))
    width = int(rng.integers(config.min_size, config.max_size + 1))
    horizon = int(rng.uniform(0.3, 0.7) * height)
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[:horizon] = _colour(rng)
    pixels[horizon:] = _colour(rng)
    owner = np.zeros((height, width), dtype=np.int32)  # 0 = background, k = k-th kept shape

    objects: list[dict[str, Any]] = []
    wanted = 0 if rng.random() < config.empty_fraction else int(rng.integers(1, config.max_objects + 1))
    for _ in range(wanted * 4):  # a few tries per shape to respect the visibility rule
        if len(objects) == wanted:
            break
        category, mask = _shape_mask(rng, height, width, SHAPE_SETS[config.shapes])
        # Each earlier shape must keep at least MIN_VISIBLE of its full area after this one.
        hides_too_much = any(
            (owner == k).sum() - (owner[mask] == k).sum() < MIN_VISIBLE * obj["full_area"]
            for k, obj in enumerate(objects, start=1)
        )
        if hides_too_much:
            continue
        colour = _colour(rng)
        pixels[mask] = colour
        owner[mask] = len(objects) + 1
        objects.append({"category_id": category, "full_area": int(mask.sum())})

    noise = rng.normal(0.0, 6.0, size=pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8), mode="RGB")
    for k, obj in enumerate(objects, start=1):
        obj["mask"] = owner == k
        del obj["full_area"]
    segments = owner.copy()
    n = len(objects)
    background = owner == 0
    segments[:horizon][background[:horizon]] = n + 1
    segments[horizon:][background[horizon:]] = n + 2
    return SynthSample(image, objects, segments)


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _id_to_rgb(segment_id: np.ndarray) -> np.ndarray:
    return np.stack([segment_id % 256, segment_id // 256 % 256, segment_id // 65536], axis=-1).astype(
        np.uint8
    )


def make_synthetic(config: SynthConfig, split: str = "train") -> dict[str, Any]:
    """Generate a split in memory: ``{"images": {file_name: PIL image}, "instances": COCO dict,
    "panoptic": COCO panoptic dict, "panoptic_pngs": {png name: PIL image}}``.

    The split name is mixed into the seed, so train and val differ for the same ``config.seed``.
    """
    rng = np.random.default_rng([config.seed, sum(split.encode())])
    images, pngs = {}, {}
    coco_images, annotations, panoptic_annotations = [], [], []
    ann_id = 1
    for index in range(config.images):
        sample = generate_sample(rng, config)
        image_id = index + 1
        file_name = f"{image_id:06d}.{config.image_format}"
        width, height = sample.image.size
        images[file_name] = sample.image
        coco_images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        segments_info = []
        for k, obj in enumerate(sample.objects, start=1):
            bbox, area = _bbox(obj["mask"]), int(obj["mask"].sum())
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": obj["category_id"],
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                    "segmentation": _rle(obj["mask"]),
                }
            )
            ann_id += 1
            segments_info.append(
                {"id": k, "category_id": obj["category_id"], "iscrowd": 0, "bbox": bbox, "area": area}
            )
        n = len(sample.objects)
        for segment_id, category_id in ((n + 1, 100), (n + 2, 101)):
            mask = sample.segments == segment_id
            if mask.any():
                segments_info.append(
                    {
                        "id": segment_id,
                        "category_id": category_id,
                        "iscrowd": 0,
                        "bbox": _bbox(mask),
                        "area": int(mask.sum()),
                    }
                )
        png_name = f"{image_id:06d}.png"
        pngs[png_name] = Image.fromarray(_id_to_rgb(sample.segments), mode="RGB")
        panoptic_annotations.append(
            {"image_id": image_id, "file_name": png_name, "segments_info": segments_info}
        )

    things = [{"id": i, "name": n, "supercategory": "shape"} for i, n in SHAPE_SETS[config.shapes].items()]
    info = {"description": f"detrkit synthetic shapes, seed {config.seed}, split {split}", "version": "1.0"}
    instances = {"info": info, "images": coco_images, "annotations": annotations, "categories": things}
    panoptic = {
        "info": info,
        "images": coco_images,
        "annotations": panoptic_annotations,
        "categories": [{**c, "isthing": 1} for c in things]
        + [{"id": i, "name": n, "supercategory": "background", "isthing": 0} for i, n in STUFF.items()],
    }
    return {"images": images, "instances": instances, "panoptic": panoptic, "panoptic_pngs": pngs}


def _save_image(image: Image.Image, path: Path) -> None:
    kind = "JPEG" if path.suffix == ".jpg" else "PNG"
    options = {"quality": 95} if kind == "JPEG" else {}
    atomic_write(path, lambda tmp: image.save(tmp, format=kind, **options))


def write_synthetic(
    out: str | os.PathLike, config: SynthConfig, splits: dict[str, int] | None = None
) -> Path:
    """Write a COCO-layout synthetic dataset under ``out``; ``splits`` maps split name to image
    count (default: ``{"train": config.images, "val": max(1, config.images // 4)}``)."""
    out = Path(out)
    splits = splits or {"train": config.images, "val": max(1, config.images // 4)}
    for split, count in splits.items():
        data = make_synthetic(SynthConfig(**{**config.__dict__, "images": count}), split)
        for name, image in data["images"].items():
            _save_image(image, out / f"{split}2017" / name)
        for name, png in data["panoptic_pngs"].items():
            _save_image(png, out / "annotations" / f"panoptic_{split}2017" / name)
        write_json_atomic(out / "annotations" / f"instances_{split}2017.json", data["instances"])
        write_json_atomic(out / "annotations" / f"panoptic_{split}2017.json", data["panoptic"])
    return out


def shape_set_for(class_names: Iterable[str] = (), category_ids: Iterable[int] = ()) -> str:
    """The class set (a key of ``SHAPE_SETS``) a model with these classes was trained on: the one
    sharing the most class names and category ids with it; "basic" when none tells."""
    names, ids = set(class_names), set(category_ids)

    def overlap(key: str) -> tuple[int, bool]:
        shapes = SHAPE_SETS[key]
        return len(names & set(shapes.values())) + len(ids & set(shapes)), key == "basic"

    return max(SHAPE_SETS, key=overlap)


def synthetic_root(parent: str | os.PathLike, shapes: str = "basic") -> Path:
    """Where a run or an evaluation under ``parent`` keeps the synthetic dataset of class set ``shapes``."""
    return Path(parent) / ("synthetic-data" if shapes == "basic" else f"synthetic-{shapes}")


def ensure_synthetic(root: str | os.PathLike, config: SynthConfig, splits: dict[str, int]) -> bool:
    """Write the synthetic dataset to ``root`` unless its last split's annotations are there already
    (written last, so their presence means a complete dataset); True when it was written now."""
    root = Path(root)
    last = list(splits)[-1]
    # What was written, and with what: a dataset of other images (another count, seed or class
    # set) is written anew, never silently reused.
    recipe = {"config": dataclasses.asdict(config), "splits": splits}
    marker = root / "synthetic.json"
    if (root / "annotations" / f"instances_{last}2017.json").exists() and marker.exists():
        try:
            if json.loads(marker.read_text()) == json.loads(json.dumps(recipe)):
                return False
        except ValueError:
            pass
    write_synthetic(root, config, splits)
    write_json_atomic(marker, recipe)
    return True
