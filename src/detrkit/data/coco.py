"""COCO-format datasets: detection (+ instance masks); the panoptic one is in :mod:`detrkit.data.panoptic`.

Each sample is ``(image, target)``: ``image`` a normalised Tensor[3, H, W]; ``target`` a dict with
``labels`` Int64Tensor[N] (contiguous training labels, see :class:`CategoryMap`), ``boxes``
Tensor[N, 4] normalised (cx, cy, w, h), ``image_id``, ``orig_size`` and ``size`` (h, w), and
``masks`` Bool Tensor[N, H, W] when asked for. A sample whose image cannot be read is returned as
a :class:`SkippedSample` (``on_error="skip"``, the default) for the collate function and the
training loop to count and report, or raises (``on_error="raise"``).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as TF

from ..fileio import read_json_file
from .images import ImageLoadError, load_image, to_rgb
from .schema import structure_problems
from .segmentations import find_bad_segmentations


class DatasetError(ValueError):
    """An annotation file is unusable; the message names the file and the field."""


@dataclass(frozen=True)
class SkippedSample:
    """Stands in for a sample whose image could not be loaded."""

    path: str
    reason: str
    image_id: int


@dataclass(frozen=True)
class CategoryMap:
    """Dataset category ids <-> contiguous training labels ``0..K-1``, and names.

    Built from the annotation file (ids sorted ascending), or given explicitly, e.g. a model's
    ``config.category_ids`` so that a dataset is labelled the way a checkpoint expects (the
    original COCO checkpoints use ``range(91)``: label = COCO id).
    """

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_categories(cls, categories: Sequence[Mapping[str, Any]]) -> CategoryMap:
        ordered = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(int(c["id"]) for c in ordered), tuple(str(c.get("name", c["id"])) for c in ordered))

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def label_of(self) -> dict[int, int]:
        return {cid: label for label, cid in enumerate(self.category_ids)}

    def to_category_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """Contiguous labels -> dataset category ids (same shape)."""
        table = torch.tensor(self.category_ids, dtype=torch.int64, device=labels.device)
        return table[labels]


def _load_json(source: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(source, Mapping):
        # A reader's dict of another format (detrkit.data.formats.Annotations) names its source.
        return dict(source), getattr(source, "source", "<in-memory annotations>")
    path = Path(source)
    data = read_json_file(path, error=DatasetError, what="annotation file")
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    return data, str(path)


def _require(data: dict[str, Any], where: str, *keys: str) -> None:
    """Refuse a file whose structure is broken (the check ``detrkit data check`` reports in full)."""
    for key in keys:
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{where}: missing or invalid '{key}' list")
    problems = structure_problems(data)
    if problems:
        more = (
            f" (and {len(problems) - 1} more problem(s): run `detrkit data check {where}`)"
            if len(problems) > 1
            else ""
        )
        raise DatasetError(f"{where}: {problems[0][1]}{more}")


def _image_tensor(image: Image.Image) -> tv_tensors.Image:
    return tv_tensors.Image(TF.pil_to_tensor(image))


def _finish_target(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Absolute XYXY boxes of the transformed image -> normalised cxcywh; plain tensors."""
    height, width = image.shape[-2:]
    boxes = box_convert(target["boxes"].as_subclass(torch.Tensor), "xyxy", "cxcywh")
    target["boxes"] = boxes / torch.tensor([width, height, width, height], dtype=boxes.dtype)
    target["size"] = torch.tensor([height, width])
    if "masks" in target:
        target["masks"] = target["masks"].as_subclass(torch.Tensor).bool()
    return image.as_subclass(torch.Tensor), target


class CocoBase(Dataset):
    def __init__(
        self,
        image_dir: str | os.PathLike | None,
        transforms: Callable | None,
        on_error: str,
        images: Mapping[str, Image.Image] | None,
    ) -> None:
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error={on_error!r}: expected 'skip' or 'raise'")
        if image_dir is None and images is None:
            raise ValueError("give image_dir (a folder) or images (a file name -> PIL image mapping)")
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.transforms = transforms
        self.on_error = on_error
        self.in_memory = images

    def _read_annotations(
        self, annotations: str | os.PathLike | Mapping[str, Any], category_map: CategoryMap | None
    ) -> None:
        """Load the JSON and set ``data``, ``source``, ``category_map``, ``label_of``, ``images``."""
        self.data, self.source = _load_json(annotations)
        _require(self.data, self.source, "images", "annotations", "categories")
        self.category_map = category_map or CategoryMap.from_categories(self.data["categories"])
        self.label_of = self.category_map.label_of()  # built once, read for every sample
        self.images = {int(img["id"]): img for img in self.data["images"]}

    def _check_segmentations(self, anns: Sequence[Mapping[str, Any]]) -> None:
        """Raise DatasetError for the first annotation whose mask pycocotools must not decode."""
        items = []
        for ann in anns:
            info = self.images.get(ann.get("image_id"), {})
            items.append((ann, info.get("width"), info.get("height")))
        bad = find_bad_segmentations(items)
        if bad:
            ann = anns[bad[0][0]]
            more = [anns[i].get("id") for i, _ in bad[1:]]
            others = (
                f" ({len(more)} more: annotation ids {more[:10]}{', ...' if len(more) > 10 else ''})"
                if more
                else ""
            )
            raise DatasetError(
                f"{self.source}: annotation {ann.get('id')} (image {ann.get('image_id')}) has an unusable "
                f"segmentation: {bad[0][1]}{others}; fix or remove it (`detrkit data check` lists them all)"
            )

    def _check_category_ids(self, used: set[Any]) -> None:
        unknown = sorted(used - set(self.label_of), key=str)
        if unknown:
            raise DatasetError(
                f"{self.source}: annotations use category ids {unknown[:10]} that are not in the label map "
                f"{list(self.category_map.category_ids)[:20]}"
            )

    def _load(self, info: dict[str, Any], where: str) -> Image.Image:
        file_name = info["file_name"]
        if self.in_memory is not None:
            if file_name not in self.in_memory:
                raise ImageLoadError(file_name, f"not among the in-memory images ({where})")
            return to_rgb(self.in_memory[file_name], orient=False)
        path = self.image_dir / file_name
        try:
            image = load_image(path)
        except ImageLoadError as e:
            if e.reason == "file not found":
                raise ImageLoadError(path, f"file not found (image id {info['id']} in {where})") from None
            raise
        expected = (info.get("width"), info.get("height"))
        if None not in expected and image.size != expected:
            raise ImageLoadError(
                path,
                f"image is {image.size[0]}x{image.size[1]} (after EXIF orientation) but {where} says "
                f"{expected[0]}x{expected[1]}: the annotations would not line up",
            )
        return image

    def aspect_ratios(self) -> list[float]:
        """width / height of every image, from the annotation file (for batch grouping)."""
        return [self.images[i].get("width", 1) / max(self.images[i].get("height", 1), 1) for i in self.ids]

    def _skip_or_raise(self, error: ImageLoadError, image_id: int) -> SkippedSample:
        if self.on_error == "raise":
            raise error
        return SkippedSample(error.path, error.reason, image_id)

    def _apply(self, image: Image.Image, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        img = _image_tensor(image)
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        else:
            img = TF.to_dtype(img, torch.float32, scale=True)
        return _finish_target(img, target)


class CocoDetection(CocoBase):
    """A COCO instances file (or an in-memory dict) with its images.

    Args:
        image_dir: folder the ``file_name`` entries are relative to.
        annotations: path to the instances JSON, or the parsed dict.
        transforms: a ``transforms.v2`` pipeline (see :mod:`detrkit.data.transforms`).
        masks: also return instance masks (polygons and RLE are decoded by pycocotools, after
            :func:`find_bad_segmentations` checked them all when the file is loaded).
        category_map: the label space to use (default: the file's categories, sorted by id).
        keep_crowd: keep ``iscrowd`` objects (evaluation does; training drops them, as the original).
        on_error: ``"skip"`` (return :class:`SkippedSample`) or ``"raise"`` for unreadable images.
        images: file name -> PIL image, instead of reading ``image_dir`` (in-memory datasets).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike | None,
        annotations: str | os.PathLike | Mapping[str, Any],
        transforms: Callable | None = None,
        *,
        masks: bool = False,
        category_map: CategoryMap | None = None,
        keep_crowd: bool = False,
        on_error: str = "skip",
        images: Mapping[str, Image.Image] | None = None,
    ) -> None:
        super().__init__(image_dir, transforms, on_error, images)
        self._read_annotations(annotations, category_map)
        data = self.data
        self.masks = masks
        self.keep_crowd = keep_crowd
        self._check_category_ids({a.get("category_id") for a in data["annotations"]})
        self.ids = sorted(self.images)
        self._anns: dict[int, list[dict[str, Any]]] = {i: [] for i in self.ids}
        for ann in data["annotations"]:
            if ann.get("image_id") not in self._anns:
                raise DatasetError(
                    f"{self.source}: annotation {ann.get('id')} refers to unknown image {ann.get('image_id')}"
                )
            self._anns[ann["image_id"]].append(ann)
        self._segmentations_checked = False
        if masks:  # before pycocotools ever sees them (a NaN would exhaust memory, an inf crash)
            self._check_segmentations(data["annotations"])
            self._segmentations_checked = True
        self.degenerate = self._find_degenerate()
        if masks:
            # Found now, not by one DataLoader worker in the middle of an epoch (other processes
            # of a DDP run would wait for it forever).
            unmasked = [
                a.get("id")
                for anns in self._anns.values()
                for a in anns
                if (keep_crowd or not a.get("iscrowd", 0))
                and a.get("id") not in self.degenerate
                and not a.get("segmentation")
            ]
            if unmasked:
                shown = ", ".join(map(str, unmasked[:10])) + (", ..." if len(unmasked) > 10 else "")
                raise DatasetError(
                    f"{self.source}: {len(unmasked)} annotation(s) have no segmentation (ids {shown}), "
                    "but masks were asked for (masks=True); train boxes only, or add the masks"
                )
        if self.degenerate:
            warnings.warn(
                f"{self.source}: {len(self.degenerate)} box(es) with zero area after clipping to the image will "
                f"be dropped (annotation ids {sorted(self.degenerate)[:10]}{'...' if len(self.degenerate) > 10 else ''})",
                stacklevel=2,
            )
        self._coco = None

    def _find_degenerate(self) -> set[int]:
        bad = set()
        for image_id, anns in self._anns.items():
            info = self.images[image_id]
            for ann in anns:
                box = self._clip(ann.get("bbox"), info)
                if box is None or box[2] <= box[0] or box[3] <= box[1]:
                    bad.add(ann.get("id"))
        return bad

    @staticmethod
    def _clip(bbox: Any, info: dict[str, Any]) -> list[float] | None:
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            return None
        x, y, w, h = (float(v) for v in bbox)
        x0, y0, x1, y1 = x, y, x + w, y + h
        width, height = info.get("width"), info.get("height")
        if width is not None and height is not None:
            x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
            y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
        return [x0, y0, x1, y1]

    @property
    def coco(self):
        """A pycocotools ``COCO`` over the same annotations (for masks and evaluation)."""
        if self._coco is None:
            from pycocotools.coco import COCO

            if not self._segmentations_checked:  # masks=False: checked now, for whoever decodes one here
                self._check_segmentations(self.data["annotations"])
                self._segmentations_checked = True

            coco = COCO()
            coco.dataset = self.data
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __len__(self) -> int:
        return len(self.ids)

    def raw_target(self, image_id: int, width: int, height: int) -> dict[str, Any]:
        """Labels, absolute XYXY boxes (clipped, degenerate and crowd objects dropped) and masks."""
        info = {**self.images[image_id], "width": width, "height": height}
        label_of = self.label_of
        anns = [
            a
            for a in self._anns[image_id]
            if (self.keep_crowd or not a.get("iscrowd", 0)) and a.get("id") not in self.degenerate
        ]
        boxes = [self._clip(a["bbox"], info) for a in anns]
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                format="XYXY",
                canvas_size=(height, width),
            ),
            "labels": torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "image_id": image_id,
            "orig_size": torch.tensor([height, width]),
        }
        if self.masks:
            unmasked = [a.get("id") for a in anns if not a.get("segmentation")]
            if unmasked:
                raise DatasetError(
                    f"{self.source}: annotation(s) {unmasked[:10]} of image {image_id} have no segmentation, "
                    "but masks were asked for (masks=True)"
                )
            if anns:
                masks = np.stack([self.coco.annToMask(a) for a in anns])
            else:
                masks = np.zeros((0, height, width), dtype=np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks).bool())
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]] | SkippedSample:
        image_id = self.ids[index]
        try:
            image = self._load(self.images[image_id], self.source)
        except ImageLoadError as e:
            return self._skip_or_raise(e, image_id)
        target = self.raw_target(image_id, *image.size)
        return self._apply(image, target)
