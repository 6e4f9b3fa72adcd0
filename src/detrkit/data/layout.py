"""Where a dataset's annotation files and images are: the COCO layout and Roboflow-style exports."""

from __future__ import annotations

from pathlib import Path

from .coco import DatasetError


def resolve_split(root: Path, split: str) -> tuple[Path, Path]:
    """(instances JSON, image folder) of ``split`` in a COCO layout (``annotations/instances_{split}.json``
    + ``{split}/``) or a Roboflow-style export (``{split}/_annotations.coco.json``)."""
    if root.is_file() and root.suffix == ".json":
        # annotations/instances_{split}.json of a COCO layout: the images are in {split}/ beside it.
        if root.parent.name == "annotations" and root.stem.startswith("instances_"):
            images = root.parent.parent / root.stem.removeprefix("instances_")
            if images.is_dir():
                return root, images
        return root, root.parent
    candidates = [
        (root / "annotations" / f"instances_{split}.json", root / split),
        (root / split / "_annotations.coco.json", root / split),
        (root / split / "annotations.json", root / split / "images"),
    ]
    for ann, images in candidates:
        if ann.is_file():
            return ann, images
    tried = ", ".join(str(a) for a, _ in candidates)
    raise DatasetError(f"{root}: no annotations for split {split!r} (looked for {tried})")


def resolve_panoptic(root: Path, split: str) -> tuple[Path, Path, Path]:
    """(panoptic JSON, image folder, PNG folder) of ``split`` in the COCO panoptic layout."""
    ann = root / "annotations" / f"panoptic_{split}.json"
    if not ann.is_file():
        raise DatasetError(f"{root}: no panoptic annotations for split {split!r} (looked for {ann})")
    for pngs in (root / "annotations" / f"panoptic_{split}", root / f"panoptic_{split}"):
        if pngs.is_dir():
            return ann, root / split, pngs
    raise DatasetError(f"{root}: no folder of panoptic PNGs panoptic_{split} next to {ann}")
