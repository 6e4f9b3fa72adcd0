"""Pascal VOC datasets: ``Annotations/<name>.xml`` per image, ``JPEGImages/`` and the split lists
``ImageSets/Main/<split>.txt`` (one image name per line; without the lists every XML file is in
every split).

VOC boxes are 1-based inclusive pixel indices; they become COCO's [x, y, w, h] as detectron2 reads
them, with the corners ``(xmin - 1, ymin - 1)`` and ``(xmax, ymax)``; written back, corners are
rounded to whole pixels as VOC tools expect. ``difficult`` objects become COCO crowd regions (``iscrowd``): neither required nor
penalised when scoring, as VOC's own evaluation treats them. Class names become category ids 1..K
in the order of their names over the whole dataset (every split shares them).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from .coco import DatasetError
from .formats import IMAGE_SUFFIXES, Annotations, Split, categories_from_names, split_names


def _text(node: ET.Element | None, tag: str) -> str | None:
    child = node.find(tag) if node is not None else None
    return child.text.strip() if child is not None and child.text else None


def _parse(path: Path) -> ET.Element:
    # Python's expat refuses entity expansion bombs (billion laughs) since 3.7.1 / expat 2.4.
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"not valid XML ({e})") from None


def class_names(root: Path) -> list[str]:
    """Every class name of the dataset's XML files, sorted."""
    names = set()
    for xml in sorted((root / "Annotations").glob("*.xml")):
        try:
            tree = _parse(xml)
        except ValueError:
            continue  # reported by read_voc
        names.update(n for n in (_text(o, "name") for o in tree.iter("object")) if n)
    return sorted(names)


def split_ids(root: Path, split: str) -> list[str]:
    """The image names of ``split`` (``ImageSets/Main/<split>.txt``, under the names layouts use)."""
    lists = root / "ImageSets" / "Main"
    for name in split_names(split):
        if (lists / f"{name}.txt").is_file():
            return [
                line.split()[0] for line in (lists / f"{name}.txt").read_text().splitlines() if line.strip()
            ]
    if lists.is_dir() and any(lists.glob("*.txt")):
        found = ", ".join(sorted(p.stem for p in lists.glob("*.txt"))[:8])
        raise DatasetError(
            f"{lists}: no list for split {split!r} (tried {', '.join(split_names(split))}; found {found})"
        )
    return sorted(p.stem for p in (root / "Annotations").glob("*.xml"))


def read_voc(root: Path, split: str) -> Split:
    """``split`` of a Pascal VOC dataset as a COCO dict."""
    names = class_names(root)
    categories = categories_from_names(names, 1)
    category_of = {c["name"]: c["id"] for c in categories}
    problems: list[tuple[str, str]] = []
    images, annotations = [], []
    for image_id, stem in enumerate(split_ids(root, split), 1):
        xml = root / "Annotations" / f"{stem}.xml"
        try:
            tree = _parse(xml)
        except FileNotFoundError:
            problems.append(("missing annotation files", str(xml)))
            continue
        except ValueError as e:
            problems.append(("unreadable annotation files", f"{xml}: {e}"))
            continue
        file_name = _text(tree, "filename") or f"{stem}.jpg"
        if not (root / "JPEGImages" / file_name).is_file():
            # Some exports name the image without its extension, or with another one.
            candidates = [root / "JPEGImages" / f"{stem}{s}" for s in IMAGE_SUFFIXES]
            file_name = next((c.name for c in candidates if c.is_file()), file_name)
        size = tree.find("size")
        try:
            width, height = int(float(_text(size, "width") or 0)), int(float(_text(size, "height") or 0))
        except ValueError:
            width = height = 0
        if width <= 0 or height <= 0:
            problems.append(("missing image sizes", f"{xml}: <size> has no positive width and height"))
            continue
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for number, obj in enumerate(tree.iter("object"), 1):
            name, box = _text(obj, "name"), obj.find("bndbox")
            where = f"{xml}: object {number}"
            try:
                xmin, ymin, xmax, ymax = (
                    float(_text(box, t) or "nan") for t in ("xmin", "ymin", "xmax", "ymax")
                )
            except ValueError:
                xmin = float("nan")
            if name is None or box is None or xmin != xmin or any(v != v for v in (ymin, xmax, ymax)):
                problems.append(("malformed objects", f"{where}: needs <name> and <bndbox> with 4 numbers"))
                continue
            x, y, w, h = xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1
            if w <= 0 or h <= 0:
                problems.append(("negative or zero box sizes", f"{where}: w={w:g}, h={h:g}"))
                continue
            difficult = _text(obj, "difficult") in ("1", "true")
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_of[name],
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(difficult),
            })  # fmt: skip
    coco = {"images": images, "annotations": annotations, "categories": categories}
    return Split(Annotations(coco, f"{root / 'Annotations'} [{split}]"), root / "JPEGImages", "voc", problems)


def write_voc(splits: dict[str, tuple[dict[str, Any], Path]], out: Path) -> list[str]:
    """Write COCO splits as a Pascal VOC dataset in ``out`` (``Annotations/``, ``JPEGImages/``,
    ``ImageSets/Main/<split>.txt``); crowd regions become ``difficult`` objects. Returns what could
    not be carried (masks: VOC detection has boxes only)."""
    from .formats import link_or_copy, output_name

    (out / "Annotations").mkdir(parents=True, exist_ok=True)
    (out / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    dropped: list[str] = []
    written: set[str] = set()
    for split, (data, image_dir) in splits.items():
        names = {c["id"]: c["name"] for c in data["categories"]}
        anns: dict[Any, list] = {}
        for a in data["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
        masks = sum(1 for a in data["annotations"] if a.get("segmentation"))
        if masks:
            dropped.append(f"{split}: {masks} mask(s) (VOC detection keeps boxes only)")
        stems = []
        for image in data["images"]:
            source = Path(image_dir) / image["file_name"]
            # VOC keeps every split's images in one folder, by stem: names must differ.
            stem = output_name(Path(image["file_name"]).stem, written).as_posix()
            stems.append(stem)
            link_or_copy(source, out / "JPEGImages" / f"{stem}{source.suffix}")
            objects = []
            for a in anns.get(image["id"], []):
                x, y, w, h = a["bbox"]
                objects.append(
                    f"  <object><name>{escape(str(names[a['category_id']]))}</name><pose>Unspecified</pose>"
                    f"<truncated>0</truncated><difficult>{int(bool(a.get('iscrowd', 0)))}</difficult>"
                    f"<bndbox><xmin>{round(x + 1)}</xmin><ymin>{round(y + 1)}</ymin>"
                    f"<xmax>{round(x + w)}</xmax><ymax>{round(y + h)}</ymax></bndbox></object>"
                )
            (out / "Annotations" / f"{stem}.xml").write_text(
                f"<annotation>\n  <folder>JPEGImages</folder>\n  <filename>{escape(stem + source.suffix)}</filename>\n"
                f"  <size><width>{image['width']}</width><height>{image['height']}</height><depth>3</depth></size>\n"
                + "\n".join(objects)
                + "\n</annotation>\n"
            )
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(s + "\n" for s in stems))
    return dropped
