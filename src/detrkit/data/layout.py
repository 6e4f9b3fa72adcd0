"""Where a dataset's annotation files and images are: the COCO layout and Roboflow-style exports."""

from __future__ import annotations

from pathlib import Path

from .coco import DatasetError

# Other names of COCO's default split names, as labelling tools export them (Roboflow: train,
# valid, test; others: val, validation).
SPLIT_ALIASES = {"train2017": ("train",), "val2017": ("val", "valid", "validation"), "test2017": ("test",)}


def split_candidates(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Where ``split``'s (instances JSON, image folder) may be under ``root``, in the order tried:
    the COCO layout, a Roboflow-style export (``{split}/_annotations.coco.json``), an
    ``annotations.json`` + ``images/`` folder per split; for COCO's default split names, also under
    the names exports use (``train``, ``valid``...)."""
    candidates = []
    for name in (split, *SPLIT_ALIASES.get(split, ())):
        candidates += [
            (root / "annotations" / f"instances_{name}.json", root / name),
            (root / "annotations" / f"instances_{name}.json", root / "images" / name),  # CVAT subsets
            (root / name / "_annotations.coco.json", root / name),
            (root / name / "annotations.json", root / name / "images"),
        ]
    # One-file exports, whatever the split: CVAT's COCO 1.0 (file names relative to images/) and
    # Label Studio's COCO (file names such as images/abc.jpg, relative to the export's root).
    candidates += [
        (root / "annotations" / "instances_default.json", root / "images"),
        (root / "result.json", root),
    ]
    return candidates


def resolve_split(root: Path, split: str) -> tuple[Path, Path]:
    """(instances JSON, image folder) of ``split`` in a COCO layout (``annotations/instances_{split}.json``
    + ``{split}/``) or an export's layout (see :func:`split_candidates`)."""
    if root.is_file() and root.suffix == ".json":
        # annotations/instances_{split}.json of a COCO layout: the images are in {split}/ beside it.
        if root.parent.name == "annotations" and root.stem.startswith("instances_"):
            images = root.parent.parent / root.stem.removeprefix("instances_")
            if images.is_dir():
                return root, images
        return root, root.parent
    candidates = split_candidates(root, split)
    found = [(ann, images) for ann, images in candidates if ann.is_file()]
    for ann, images in found:  # the first whose image folder is there, else the first
        if images.is_dir():
            return ann, images
    if found:
        return found[0]
    tried = ", ".join(str(a) for a, _ in candidates[:3])
    raise DatasetError(
        f"{root}: no annotations for split {split!r} (looked for {tried}"
        + (f", and the same for {', '.join(SPLIT_ALIASES[split])}" if split in SPLIT_ALIASES else "")
        + ")"
    )


def resolve_panoptic(root: Path, split: str) -> tuple[Path, Path, Path]:
    """(panoptic JSON, image folder, PNG folder) of ``split`` in the COCO panoptic layout."""
    ann = root / "annotations" / f"panoptic_{split}.json"
    if not ann.is_file():
        raise DatasetError(f"{root}: no panoptic annotations for split {split!r} (looked for {ann})")
    for pngs in (root / "annotations" / f"panoptic_{split}", root / f"panoptic_{split}"):
        if pngs.is_dir():
            return ann, root / split, pngs
    raise DatasetError(f"{root}: no folder of panoptic PNGs panoptic_{split} next to {ann}")
