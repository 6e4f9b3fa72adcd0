"""Validation of COCO instances files: everything that would silently hurt training, reported."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import UnidentifiedImageError

from ..fileio import read_json_file
from .images import image_size
from .schema import structure_problems
from .segmentations import find_bad_segmentations


@dataclass
class CheckReport:
    """Problems found in one annotation file, grouped by kind."""

    source: str
    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    warnings: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    stats: dict[str, int] = field(default_factory=dict)
    data: dict | None = field(default=None, repr=False)  # the annotations as read (None: unreadable)

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind].append(detail)

    def warn(self, kind: str, detail: str) -> None:
        self.warnings[kind].append(detail)

    def summary(self, examples: int = 5) -> str:
        lines = [f"{self.source}: " + ", ".join(f"{v} {k}" for k, v in self.stats.items())]
        for label, group in (("error", self.errors), ("warning", self.warnings)):
            for kind, details in group.items():
                shown = "; ".join(details[:examples]) + ("; ..." if len(details) > examples else "")
                lines.append(f"  {label}: {kind} ({len(details)}): {shown}")
        n_err = sum(len(v) for v in self.errors.values())
        n_warn = sum(len(v) for v in self.warnings.values())
        lines.append(f"  {'OK' if self.ok else 'FAILED'}: {n_err} error(s), {n_warn} warning(s)")
        return "\n".join(lines)


def check_annotations(
    ann_file: str | os.PathLike | dict,
    image_dir: str | os.PathLike | None = None,
    *,
    check_images: bool = True,
) -> CheckReport:
    """Check a COCO instances JSON, or the COCO dict a reader of another format built (and, with
    ``image_dir``, that its images exist and match)."""
    if isinstance(ann_file, dict):  # another format's annotations, read into a COCO dict
        report, data = CheckReport(str(getattr(ann_file, "source", "<annotations>"))), ann_file
    else:
        report = CheckReport(str(ann_file))
        try:
            data = read_json_file(ann_file, what="annotation file")
        except ValueError as e:
            report.error("unreadable annotation file", str(e))
            return report
    report.data = data
    # The loader's own structural check: the same problems, named the same way. The checks below
    # read the entries, so they run only on a file whose structure is sound.
    problems = structure_problems(data)
    for kind, detail in problems:
        report.error(kind, detail)
    if any(not kind.startswith("duplicate") for kind, _ in problems):
        return report
    images, annotations, categories = data["images"], data["annotations"], data["categories"]
    report.stats = {"images": len(images), "annotations": len(annotations), "categories": len(categories)}
    image_by_id = {img.get("id"): img for img in images}
    category_ids = {c.get("id") for c in categories}

    annotated = set()
    segmented = []  # (annotation, width, height): the masks, checked together after the loop
    for ann in annotations:
        aid = ann.get("id")
        image = image_by_id.get(ann.get("image_id"))
        if image is None:
            report.error("annotation of an unknown image", f"annotation {aid} -> image {ann.get('image_id')}")
            continue
        annotated.add(ann.get("image_id"))
        segmented.append((ann, image.get("width"), image.get("height")))
        if ann.get("category_id") not in category_ids:
            report.error("unknown category ids", f"annotation {aid}: category {ann.get('category_id')}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            report.error("malformed boxes", f"annotation {aid}: bbox {bbox!r}")
            continue
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            report.error("negative or zero box sizes", f"annotation {aid}: w={w}, h={h}")
            continue
        width, height = image.get("width"), image.get("height")
        if width and height and (x < 0 or y < 0 or x + w > width + 0.5 or y + h > height + 0.5):
            report.warn(
                "boxes outside the image (clipped on load)",
                f"annotation {aid}: [{x}, {y}, {w}, {h}] in a {width}x{height} image",
            )

    # What pycocotools would choke on (a NaN coordinate: unbounded memory; inf or 1e12: a crash).
    for index, reason in find_bad_segmentations(segmented):
        report.error("unusable segmentations", f"annotation {segmented[index][0].get('id')}: {reason}")

    for img in images:
        if img.get("id") not in annotated:
            report.warn("images without annotations (used as background-only)", f"image {img.get('id')}")

    if image_dir is not None and check_images:
        root = Path(image_dir)
        for img in images:
            path = root / str(img.get("file_name"))
            if not path.is_file():
                report.error("missing image files", str(path))
                continue
            try:
                size = image_size(path)
            except (UnidentifiedImageError, OSError) as e:
                report.error("unreadable image files", f"{path}: {e}")
                continue
            expected = (img.get("width"), img.get("height"))
            if None not in expected and size != expected:
                report.error(
                    "image sizes that differ from the annotation file",
                    f"{path}: {size[0]}x{size[1]} (after EXIF orientation), file says {expected[0]}x{expected[1]}",
                )
    return report


def find_annotation_files(root: str | os.PathLike) -> list[tuple[Path, Path | None]]:
    """``(instances json, image folder)`` pairs of a dataset root (COCO layout or an export with one
    annotation file per split folder), or of one JSON file."""
    root = Path(root)
    if root.is_file():
        split = root.stem.removeprefix("instances_")
        guess = root.parent.parent / split
        return [(root, guess if guess.is_dir() else None)]
    pairs = []
    for ann in sorted((root / "annotations").glob("instances_*.json")):
        split = ann.stem.removeprefix("instances_")
        # COCO: <split>/; CVAT: images/<split>/, or images/ for its one-file export (instances_default).
        folders = [root / split, root / "images" / split, root / "images"]
        pairs.append((ann, next((f for f in folders if f.is_dir()), None)))
    if (root / "result.json").is_file():  # Label Studio's COCO export: file names relative to the root
        pairs.append((root / "result.json", root))
    # Exports keep one annotation file per split folder (Roboflow: train/_annotations.coco.json).
    for pattern, images in (("*/_annotations.coco.json", "."), ("*/annotations.json", "images")):
        for ann in sorted(root.glob(pattern)):
            folder = ann.parent / images
            pairs.append((ann, folder if folder.is_dir() else None))
    return pairs


def check_dataset(
    root: str | os.PathLike, data_format: str, more: Callable[[dict, CheckReport], None] | None = None
) -> list[CheckReport]:
    """One report per split of a YOLO, VOC or LabelMe dataset: what its reader could not read
    (file and line or entry named), then the checks of a COCO file on what it read, then ``more``
    (e.g. the checks against a model) on a split without errors."""
    from .formats import open_split, splits_of

    reports = []
    for split in splits_of(Path(root), data_format):
        opened = open_split(root, split, data_format, strict=False)
        report = check_annotations(opened.annotations, opened.images)
        for kind, detail in opened.problems:
            report.error(kind, detail)
        if more is not None and report.ok:
            more(opened.annotations, report)
        reports.append(report)
    return reports
