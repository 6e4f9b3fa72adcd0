"""LabelMe datasets: one JSON per image (``imagePath``, ``imageWidth``, ``imageHeight`` and
``shapes`` of ``rectangle`` or ``polygon`` type with a ``label``), in one folder, or in one folder
per split (``train/``, ``val/``...). A rectangle gives a box; a polygon a box (its extent) and a mask.
Class names become category ids 1..K in the order of their names over the whole dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

from .formats import Annotations, Split, categories_from_names, split_names


def _is_labelme(path: Path) -> bool:
    try:
        head = path.read_text(errors="replace")[:4096]
    except OSError:
        return False
    return '"shapes"' in head and '"imagePath"' in head


def is_labelme_folder(folder: Path) -> bool:
    """Whether ``folder`` holds LabelMe JSON files (judged by its first JSON file)."""
    first = next(iter(sorted(folder.glob("*.json"))), None)
    return first is not None and _is_labelme(first)


def split_folder(root: Path, split: str) -> tuple[Path, bool]:
    """The folder of ``split`` (under the names layouts use), or ``root`` itself when its files are
    not split (then True: one folder serves every split)."""
    for name in split_names(split):
        if (root / name).is_dir() and is_labelme_folder(root / name):
            return root / name, False
    return root, True


def read_labelme(root: Path, split: str) -> Split:
    """``split`` of a LabelMe dataset as a COCO dict."""
    folder, _ = split_folder(root, split)
    problems: list[tuple[str, str]] = []
    documents = []
    names = set()
    # Every JSON of the dataset is read once: the split's own are its images, and every split's
    # names make the class list, so that train and val share the ids.
    for path in sorted(root.rglob("*.json")):
        mine = path.parent == folder
        try:
            document = json.loads(path.read_text(encoding="utf-8-sig"))
        except (ValueError, OSError) as e:
            if mine:
                problems.append(("unreadable annotation files", f"{path}: {e}"))
            continue
        if not isinstance(document, dict) or not isinstance(document.get("shapes"), list):
            if mine:
                problems.append(
                    ("malformed annotation files", f"{path}: expected a LabelMe object with 'shapes'")
                )
            continue
        names.update(str(s.get("label")) for s in document["shapes"] if isinstance(s, dict))
        if mine:
            documents.append((path, document))
    categories = categories_from_names(sorted(names), 1)
    category_of = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for image_id, (path, document) in enumerate(documents, 1):
        width, height = document.get("imageWidth"), document.get("imageHeight")
        image_path = document.get("imagePath")
        if not isinstance(image_path, str) or not isinstance(width, int) or not isinstance(height, int):
            problems.append(
                ("malformed annotation files", f"{path}: needs imagePath, imageWidth and imageHeight")
            )
            continue
        file_name = str((path.parent / image_path).resolve())
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for number, shape in enumerate(document["shapes"], 1):
            where = f"{path}: shapes[{number - 1}]"
            try:
                points = [(float(x), float(y)) for x, y in shape["points"]]
                label, kind = str(shape["label"]), shape.get("shape_type", "polygon")
            except (KeyError, TypeError, ValueError):
                problems.append(("malformed shapes", f"{where}: needs a label and points [[x, y], ...]"))
                continue
            if not ((kind == "rectangle" and len(points) == 2) or (kind == "polygon" and len(points) >= 3)):
                problems.append(("unsupported shapes", f"{where}: {kind} with {len(points)} point(s)"))
                continue
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            x, y, w, h = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
            if w <= 0 or h <= 0:
                problems.append(("negative or zero box sizes", f"{where}: w={w:g}, h={h:g}"))
                continue
            entry = {
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_of[label],
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            }  # fmt: skip
            if kind == "polygon":
                entry["segmentation"] = [[v for p in points for v in p]]
            annotations.append(entry)
    coco = {"images": images, "annotations": annotations, "categories": categories}
    return Split(Annotations(coco, f"{folder} [{split}]"), Path("/"), "labelme", problems)
