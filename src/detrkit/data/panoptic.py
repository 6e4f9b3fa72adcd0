"""The COCO panoptic dataset: a JSON with ``segments_info`` per image and one PNG of segment ids each.

Samples are as :mod:`detrkit.data.coco`'s, with one mask per segment (things and stuff).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from .coco import CategoryMap, CocoBase, DatasetError, SkippedSample
from .images import ImageLoadError, load_image


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colours -> segment ids: ``R + 256 G + 256^2 B``."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


class CocoPanoptic(CocoBase):
    """COCO panoptic: a JSON with ``segments_info`` per image and one PNG of segment ids each.

    Targets hold one mask per segment (things and stuff), its label (contiguous over all panoptic
    categories), its box (from the mask), and ``iscrowd``; ``category_map.names``/``isthing``
    describe the categories.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike | None,
        annotations: str | os.PathLike | Mapping[str, Any],
        png_dir: str | os.PathLike | None,
        transforms: Callable | None = None,
        *,
        category_map: CategoryMap | None = None,
        on_error: str = "skip",
        images: Mapping[str, Image.Image] | None = None,
        pngs: Mapping[str, Image.Image] | None = None,
    ) -> None:
        super().__init__(image_dir, transforms, on_error, images)
        self._read_annotations(annotations, category_map)
        data = self.data
        self.png_dir = Path(png_dir) if png_dir is not None else None
        self.pngs = pngs
        self.isthing = {int(c["id"]): bool(c.get("isthing", 1)) for c in data["categories"]}
        self.annotations = {int(a["image_id"]): a for a in data["annotations"]}
        self._check_category_ids(
            {s.get("category_id") for a in data["annotations"] for s in a.get("segments_info", [])}
        )
        self.ids = [i for i in sorted(self.images) if i in self.annotations]
        if self.ids:  # one PNG read now: a wrong format fails here, not in every sample
            self._png_mode_check(self.ids[0])

    def _png_mode_check(self, image_id: int) -> None:
        """Refuse a single-channel PNG: its grey levels would decode to segment ids that match no
        ``segments_info`` entry, and every image would train as background only."""
        name = self.annotations[image_id]["file_name"]
        if self.pngs is not None:
            mode, where = self.pngs[name].mode, name
        else:
            where = self.png_dir / name
            try:
                with Image.open(where) as png:
                    mode = png.mode
            except (OSError, ValueError):
                return  # unreadable: reported as such when the sample is loaded
        if mode in ("1", "L", "LA", "I", "I;16", "F"):
            raise DatasetError(
                f"{where}: a single-channel ({mode}) PNG; COCO panoptic PNGs are RGB, with segment id = "
                "R + 256 G + 256^2 B (panopticapi's id2rgb)"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def stuff_ids(self) -> tuple[int, ...]:
        """Category ids of the stuff classes."""
        return tuple(i for i in self.category_map.category_ids if not self.isthing.get(i, True))

    def ground_truth(self, image_id: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """(segment-id map int64[H, W], segments_info) of ``image_id`` at its original size (for PQ)."""
        segments = self.annotations[image_id]["segments_info"]
        try:
            return self.segment_ids(image_id), segments
        except ImageLoadError as e:
            e.segments_info = segments  # what PanopticEvaluator.add_unreadable needs to count the misses
            raise

    def segment_ids(self, image_id: int) -> np.ndarray:
        """The PNG of ``image_id`` as int64[H, W] segment ids."""
        name = self.annotations[image_id]["file_name"]
        if self.pngs is not None:
            return rgb_to_id(np.asarray(self.pngs[name].convert("RGB")))
        return rgb_to_id(np.asarray(load_image(self.png_dir / name)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]] | SkippedSample:
        image_id = self.ids[index]
        try:
            image = self._load(self.images[image_id], self.source)
            ids = self.segment_ids(image_id)
        except ImageLoadError as e:
            return self._skip_or_raise(e, image_id)
        width, height = image.size
        if ids.shape != (height, width):
            return self._skip_or_raise(
                ImageLoadError(
                    self.annotations[image_id]["file_name"],
                    f"panoptic PNG is {ids.shape[1]}x{ids.shape[0]}, image is {width}x{height}",
                ),
                image_id,
            )
        label_of = self.label_of
        segments = self.annotations[image_id]["segments_info"]
        masks = torch.from_numpy(
            np.stack([ids == s["id"] for s in segments]) if segments else np.zeros((0, height, width), bool)
        )
        keep = masks.flatten(1).any(1) if len(masks) else torch.zeros(0, dtype=torch.bool)
        masks = masks[keep]
        segments = [s for s, k in zip(segments, keep.tolist()) if k]
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])
                if len(masks)
                else torch.zeros(0, 4),
                format="XYXY",
                canvas_size=(height, width),
            ),
            "labels": torch.tensor([label_of[s["category_id"]] for s in segments], dtype=torch.int64),
            "iscrowd": torch.tensor([int(s.get("iscrowd", 0)) for s in segments], dtype=torch.int64),
            "masks": tv_tensors.Mask(masks),
            "image_id": image_id,
            "orig_size": torch.tensor([height, width]),
        }
        return self._apply(image, target)
