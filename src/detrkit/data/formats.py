"""Datasets as users have them: COCO files (and the labelling tools' COCO exports), YOLO folders,
Pascal VOC and LabelMe, each read into one COCO instances dict so that every format goes through
the same :class:`~detrkit.data.coco.CocoDetection` (normalised boxes, labels, masks where the format
has polygons, one :class:`~detrkit.data.coco.CategoryMap`).

:func:`open_split` is what ``train``, ``eval`` and ``data check`` call: it detects the format of a
path (``--data-format`` forces one), finds the split under the names the layout uses, and returns
the annotations (a COCO file, or the dict a reader built) with the image folder. A reader names the
file and line of every entry it cannot read; with ``strict`` the first ones are raised as a
:class:`~detrkit.data.coco.DatasetError`, else they are returned for ``data check`` to report.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import UnidentifiedImageError

from .coco import DatasetError
from .images import image_size

FORMATS = ("auto", "coco", "yolo", "voc", "labelme")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class Annotations(dict):
    """A COCO instances dict built by a reader; ``source`` names what it was read from."""

    def __init__(self, data: dict[str, Any], source: str) -> None:
        super().__init__(data)
        self.source = source


@dataclass
class Split:
    """One split of a dataset: its annotations (a COCO JSON path, or a reader's dict), its image
    folder (file names are relative to it, or absolute), its format, and what could not be read
    (``(kind, "file:line: detail")``, for ``data check``)."""

    annotations: Path | Annotations
    images: Path
    format: str
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def source(self) -> str:
        return str(self.annotations.source if isinstance(self.annotations, Annotations) else self.annotations)


def read_size(path: Path, problems: list[tuple[str, str]]) -> tuple[int, int] | None:
    """:func:`image_size`, or None with the reason added to ``problems``."""
    try:
        return image_size(path)
    except FileNotFoundError:
        problems.append(("missing image files", str(path)))
    except (UnidentifiedImageError, OSError) as e:
        problems.append(("unreadable image files", f"{path}: {e}"))
    return None


def detect_format(path: Path) -> str:
    """The format of a dataset path: ``yolo`` (a ``*.yaml`` or a folder with ``data.yaml``),
    ``voc`` (``Annotations/`` of XML files), ``labelme`` (a folder of LabelMe JSON files, or of
    split folders of them), else ``coco``."""
    if path.is_file():
        return "yolo" if path.suffix.lower() in (".yaml", ".yml") else "coco"
    if any((path / name).is_file() for name in ("data.yaml", "data.yml", "dataset.yaml")):
        return "yolo"
    if (path / "Annotations").is_dir():
        return "voc"
    from .labelme import is_labelme_folder

    if is_labelme_folder(path) or any(is_labelme_folder(p) for p in _subfolders(path)):
        return "labelme"
    return "coco"


def _subfolders(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except OSError:
        return []


def open_split(
    root: str | os.PathLike, split: str, data_format: str = "auto", *, strict: bool = True
) -> Split:
    """``split`` of the dataset at ``root`` in its format (``auto``: detected)."""
    root = Path(root)
    if data_format not in FORMATS:
        raise DatasetError(f"data_format={data_format!r}: expected one of {', '.join(FORMATS)}")
    if not root.exists():
        raise DatasetError(f"{root}: no such file or directory")
    kind = detect_format(root) if data_format == "auto" else data_format
    if kind == "coco":
        from .layout import resolve_split

        annotations, images = resolve_split(root, split)
        return Split(annotations, images, "coco")
    if kind == "yolo":
        from .yolo import read_yolo

        result = read_yolo(root, split)
    elif kind == "voc":
        from .voc import read_voc

        result = read_voc(root, split)
    else:
        from .labelme import read_labelme

        result = read_labelme(root, split)
    if strict and result.problems:
        shown = "; ".join(f"{kind}: {detail}" for kind, detail in result.problems[:3])
        more = len(result.problems) - 3
        raise DatasetError(
            shown + (f" (and {more} more: run `detrkit data check {root}`)" if more > 0 else "")
        )
    return result


def split_names(split: str) -> tuple[str, ...]:
    """``split`` and the other names a layout may give it (``val2017``: val, valid, validation)."""
    from .layout import SPLIT_ALIASES

    base = split.removesuffix("2017")
    names = (split, base, *SPLIT_ALIASES.get(split, ()), *SPLIT_ALIASES.get(f"{base}2017", ()))
    return tuple(dict.fromkeys(names))


def categories_from_names(names: list[str], first_id: int) -> list[dict[str, Any]]:
    """COCO categories for class ``names`` in order, ids counting from ``first_id``."""
    return [{"id": first_id + i, "name": str(n), "supercategory": "none"} for i, n in enumerate(names)]


def splits_of(root: Path, kind: str) -> list[str]:
    """The splits a dataset of another format than COCO declares (what ``data check`` checks)."""
    if kind == "yolo":
        from .yolo import find_yaml, read_yaml

        path = find_yaml(root)
        data = read_yaml(path)
        keys = [key for key in ("train", "val", "valid", "test") if data.get(key)]
        return keys or [p.name for p in _subfolders(path.parent / "images")]
    if kind == "voc":
        lists = root / "ImageSets" / "Main"
        found = sorted(p.stem for p in lists.glob("*.txt") if "_" not in p.stem) if lists.is_dir() else []
        return found or ["all"]
    from .labelme import is_labelme_folder

    folders = [p.name for p in _subfolders(root) if is_labelme_folder(p)]
    return folders or ["all"]


def output_name(file_name: str, used: set[str]) -> Path:
    """Where an image goes in a written dataset: its relative path as it stands (an absolute one by
    its name), made unique with a counter against ``used`` (updated), so that no image overwrites
    another."""
    relative = Path(file_name)
    relative = Path(relative.name) if relative.is_absolute() else relative
    candidate, n = relative, 1
    while candidate.as_posix() in used:
        candidate = relative.with_name(f"{relative.stem}_{n}{relative.suffix}")
        n += 1
    used.add(candidate.as_posix())
    return candidate


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows it (no second copy of the images), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
