"""``detrkit data convert SRC DST --to coco|yolo|voc``: a dataset of any format read, every split
written in another (images hard-linked where the file system allows, else copied), and what the
target format cannot carry reported."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileio import write_json_atomic
from .coco import DatasetError
from .formats import detect_format, open_split, splits_of

TARGETS = ("coco", "yolo", "voc")


def read_all_splits(source: Path, data_format: str = "auto") -> dict[str, tuple[dict[str, Any], Path]]:
    """Every split of the dataset at ``source``: ``{split: (COCO instances dict, image folder)}``."""
    from .check import find_annotation_files
    from .coco import _load_json

    kind = detect_format(source) if data_format == "auto" else data_format
    splits: dict[str, tuple[dict[str, Any], Path]] = {}
    if kind == "coco":
        for ann, images in find_annotation_files(source):
            name = (
                ann.stem.removeprefix("instances_") if ann.stem.startswith("instances_") else ann.parent.name
            )
            data, _ = _load_json(ann)
            splits[name] = (data, images if images is not None else ann.parent)
    else:
        for name in splits_of(source, kind):
            opened = open_split(source, name, kind)
            splits[name] = (dict(opened.annotations), opened.images)
    if not splits:
        raise DatasetError(f"{source}: no dataset found to convert")
    return splits


def convert(
    source: str | os.PathLike, target: str | os.PathLike, to: str, *, data_format: str = "auto",
    segments: bool = False, overwrite: bool = False,
) -> list[str]:  # fmt: skip
    """Convert the dataset at ``source`` into ``to`` format at ``target``; returns the lines of what
    could not be carried. ``target`` must not be ``source``, lie inside it or hold it."""
    from ..fileio import check_output

    source, target = Path(source), Path(target)
    if to not in TARGETS:
        raise ConfigError(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    if not source.exists():
        raise DatasetError(f"{source}: no such file or directory")
    src, dst = source.resolve(), target.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ConfigError(f"{target}: the output would overlap the dataset it is made from ({source})")
    check_output(target, option="DST", kind="dir", overwrite=overwrite)
    splits = read_all_splits(source, data_format)
    if to == "yolo":
        from .yolo import write_yolo

        return write_yolo(splits, target, segments=segments)
    if to == "voc":
        from .voc import write_voc

        return write_voc(splits, target)
    return write_coco(splits, target)


def write_coco(splits: dict[str, tuple[dict[str, Any], Path]], out: Path) -> list[str]:
    """COCO layout: ``annotations/instances_<split>.json`` and the images in ``<split>/``."""
    from .formats import link_or_copy, output_name

    for split, (data, image_dir) in splits.items():
        images, used = [], set()
        for image in data["images"]:
            relative = output_name(image["file_name"], used)
            target = out / split / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(Path(image_dir) / image["file_name"], target)
            images.append({**image, "file_name": relative.as_posix()})
        write_json_atomic(out / "annotations" / f"instances_{split}.json", {**data, "images": images})
    return []
