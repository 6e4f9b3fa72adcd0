"""YOLO datasets (Ultralytics' layout): a ``data.yaml`` naming the classes and where each split's
images are, and one ``.txt`` label file per image under ``labels/`` (the image path with its last
``images`` folder replaced by ``labels``) or beside the image.

A label line is ``class cx cy w h`` (a box; normalised to the image) or ``class x1 y1 x2 y2 ...``
(a polygon of at least three normalised points; its box is the polygon's extent). Class ``i`` is
category id ``i`` with the ``names[i]`` of the YAML. An image without a label file is an image
without objects, as in Ultralytics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .coco import DatasetError
from .formats import IMAGE_SUFFIXES, Annotations, Split, link_or_copy, output_name, read_size, split_names

YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml")


def find_yaml(root: Path) -> Path:
    if root.is_file():
        return root
    for name in YAML_NAMES:
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"{root}: no {' or '.join(YAML_NAMES)} (a YOLO dataset names its classes there)")


def read_yaml(path: Path) -> dict[str, Any]:
    """The dataset YAML, checked: ``names`` (a list, or a dict of index -> name)."""
    import yaml

    from ..fileio import read_text_file

    try:
        data = yaml.safe_load(read_text_file(path, error=DatasetError, what="dataset YAML"))
    except yaml.YAMLError as e:
        raise DatasetError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping with 'names' and the splits")
    names = data.get("names")
    if isinstance(names, dict) and all(isinstance(k, int) for k in names):
        if sorted(names) != list(range(len(names))):
            raise DatasetError(f"{path}: 'names' must number the classes 0..{len(names) - 1}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: 'names' must list the class names (or map 0.. to them)")
    return {**data, "names": [str(n) for n in names]}


def split_images(yaml_path: Path, data: dict[str, Any], split: str) -> tuple[str, list[Path]]:
    """(the YAML key, the image files) of ``split``; its entry may be a folder, a ``.txt`` list of
    image paths, or a list of either, relative to the YAML's ``path`` (else to the YAML's folder)."""
    base = Path(str(data.get("path") or ""))
    base = base if base.is_absolute() else yaml_path.parent / base
    for key in split_names(split):
        if data.get(key):
            entries = data[key] if isinstance(data[key], list) else [data[key]]
            files: list[Path] = []
            for entry in entries:
                target = base / str(entry)
                if not target.exists() and str(entry).startswith("../"):
                    # Roboflow writes train: ../train/images beside a data.yaml in the root, as
                    # Ultralytics reads it (the ../ dropped when it leads nowhere).
                    target = base / str(entry)[3:]
                if target.is_dir():
                    files += sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
                elif target.is_file() and target.suffix == ".txt":
                    for line in target.read_text().splitlines():
                        if line.strip():
                            image = Path(line.strip())
                            files.append(image if image.is_absolute() else target.parent / image)
                else:
                    raise DatasetError(
                        f"{yaml_path}: {key}: {target} is neither a folder nor a .txt list of images"
                    )
            return key, files
    # No entry (as supervision's as_yolo writes the YAML): the conventional images/<split>/ folders.
    for key in split_names(split):
        folder = yaml_path.parent / "images" / key
        if folder.is_dir():
            return key, sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    raise DatasetError(
        f"{yaml_path}: no entry for split {split!r}, nor an images/<split> folder beside it "
        f"(tried {', '.join(split_names(split))})"
    )


def label_path(image: Path) -> Path:
    """``.../images/a/b.jpg`` -> ``.../labels/a/b.txt`` (the last ``images`` folder); else beside it."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def parse_label_line(line: str, classes: int) -> tuple[int, list[float], list[float] | None]:
    """(class, [x, y, w, h] normalised, the polygon's normalised points or None); raises ValueError."""
    values = line.split()
    try:
        numbers = [float(v) for v in values[1:]]
        label = int(values[0])
    except (ValueError, IndexError):
        raise ValueError("expected 'class cx cy w h' or 'class x1 y1 x2 y2 ...' (numbers)") from None
    if not 0 <= label < classes:
        raise ValueError(f"class {label} is not among the {classes} classes of the YAML")
    if any(v != v or abs(v) == float("inf") for v in numbers):
        raise ValueError("a coordinate is not a finite number")
    if len(numbers) == 4:
        cx, cy, w, h = numbers
        return label, [cx - w / 2, cy - h / 2, w, h], None
    if len(numbers) >= 6 and len(numbers) % 2 == 0:
        xs, ys = numbers[0::2], numbers[1::2]
        return label, [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], numbers
    raise ValueError(
        f"{len(numbers)} coordinates: expected 4 (a box) or an even number of at least 6 (a polygon)"
    )


def read_yolo(root: Path, split: str) -> Split:
    """``split`` of a YOLO dataset as a COCO dict (absolute image paths as file names)."""
    yaml_path = find_yaml(root)
    data = read_yaml(yaml_path)
    names = data["names"]
    _, files = split_images(yaml_path, data, split)
    problems: list[tuple[str, str]] = []
    images, annotations = [], []
    for image_id, image in enumerate(files, 1):
        size = read_size(image, problems)
        if size is None:
            continue
        width, height = size
        images.append({"id": image_id, "file_name": str(image.resolve()), "width": width, "height": height})
        labels = label_path(image)
        if not labels.is_file():
            continue
        for number, line in enumerate(labels.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                label, (x, y, w, h), polygon = parse_label_line(line, len(names))
            except ValueError as e:
                problems.append(("malformed label lines", f"{labels}:{number}: {e}"))
                continue
            if w <= 0 or h <= 0:
                problems.append(("negative or zero box sizes", f"{labels}:{number}: w={w:g}, h={h:g}"))
                continue
            box = [x * width, y * height, w * width, h * height]
            entry = {
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
            }  # fmt: skip
            if polygon is not None:
                entry["segmentation"] = [
                    [v * (width if i % 2 == 0 else height) for i, v in enumerate(polygon)]
                ]
            annotations.append(entry)
    if not files:
        problems.append(("no images", f"{yaml_path}: split {split!r} lists no image"))
    categories = [{"id": i, "name": n, "supercategory": "none"} for i, n in enumerate(names)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    return Split(Annotations(coco, f"{yaml_path} [{split}]"), Path("/"), "yolo", problems)


def write_yolo(
    splits: dict[str, tuple[dict[str, Any], Path]], out: Path, *, segments: bool = False
) -> list[str]:
    """Write COCO splits (``{split: (instances dict, image folder)}``) as a YOLO dataset in ``out``:
    ``images/<split>/``, ``labels/<split>/`` and ``data.yaml``. Class ``i`` is the ``i``-th category
    by id. Boxes are written, or with ``segments`` an object's polygon where it has one (its box is
    then the polygon's extent). Returns what could not be carried (crowd regions: YOLO has none)."""
    import yaml

    # Every split's categories (they normally agree): a class of a later split only has an index too.
    categories = sorted(
        {c["id"]: c for data, _ in splits.values() for c in data["categories"]}.values(),
        key=lambda c: c["id"],
    )
    index = {c["id"]: i for i, c in enumerate(categories)}
    dropped: list[str] = []
    for split, (data, image_dir) in splits.items():
        anns: dict[Any, list] = {}
        for a in data["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
        crowd = sum(1 for a in data["annotations"] if a.get("iscrowd", 0))
        if crowd:
            dropped.append(f"{split}: {crowd} crowd region(s) (YOLO has no crowd annotations)")
        used: set[str] = set()
        for image in data["images"]:
            source = Path(image_dir) / image["file_name"]
            relative = output_name(image["file_name"], used)
            target = out / "images" / split / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(source, target)
            lines = []
            w, h = image["width"], image["height"]
            for a in anns.get(image["id"], []):
                if a.get("iscrowd", 0):
                    continue
                polygon = a.get("segmentation") if segments else None
                if isinstance(polygon, list) and len(polygon) == 1 and len(polygon[0]) >= 6:
                    points = " ".join(f"{v / (w if i % 2 == 0 else h):.6f}" for i, v in enumerate(polygon[0]))
                    lines.append(f"{index[a['category_id']]} {points}")
                    continue
                x, y, bw, bh = a["bbox"]
                cx, cy = (x + bw / 2) / w, (y + bh / 2) / h
                lines.append(f"{index[a['category_id']]} {cx:.6f} {cy:.6f} {bw / w:.6f} {bh / h:.6f}")
            label = (out / "labels" / split / relative).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(line + "\n" for line in lines))
    spec = {
        "path": ".",
        **{split: f"images/{split}" for split in splits},
        "names": [c["name"] for c in categories],
    }
    (out / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return dropped
