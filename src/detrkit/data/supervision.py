"""A ``supervision.DetectionDataset`` (the companion library of the DETR-family tools) as detrkit
data: its classes, images and ``Detections`` read into a COCO instances dict, so that it trains and
evaluates through :class:`~detrkit.data.coco.CocoDetection` like any other format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .formats import Annotations
from .images import image_size


def from_supervision_dataset(dataset: Any) -> Annotations:
    """The COCO dict of a ``supervision.DetectionDataset``: class ``i`` is category id ``i`` named
    ``dataset.classes[i]``; image file names are the dataset's (absolute) paths; instance masks,
    where the detections have them, become RLE segmentations; ``data["iscrowd"]`` is kept."""
    from pycocotools import mask as mask_utils

    categories = [{"id": i, "name": str(n), "supercategory": "none"} for i, n in enumerate(dataset.classes)]
    images, annotations = [], []
    for image_id, path in enumerate(dataset.image_paths, 1):
        width, height = image_size(path)
        images.append(
            {"id": image_id, "file_name": str(Path(path).resolve()), "width": width, "height": height}
        )
        detections = dataset.annotations[path]
        crowd = detections.data.get("iscrowd", np.zeros(len(detections), dtype=int))
        for k in range(len(detections)):
            x1, y1, x2, y2 = (float(v) for v in detections.xyxy[k])
            entry = {
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(detections.class_id[k]),
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(crowd[k]),
            }  # fmt: skip
            if detections.mask is not None:
                rle = mask_utils.encode(np.asfortranarray(detections.mask[k].astype(np.uint8)))
                entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
                entry["area"] = float(mask_utils.area(rle))
            annotations.append(entry)
    coco = {"images": images, "annotations": annotations, "categories": categories}
    return Annotations(coco, f"supervision.DetectionDataset ({len(images)} images)")
