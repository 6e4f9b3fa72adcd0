"""Datasets (COCO detection/panoptic, synthetic), transforms, batching and validation."""

from .coco import CategoryMap, CocoDetection, DatasetError, SkippedSample
from .collate import AspectRatioBatchSampler, Batch, SkipTracker, collate, pad_images
from .images import ImageLoadError, load_image
from .panoptic import CocoPanoptic, rgb_to_id
from .synthetic import SynthConfig, make_synthetic, write_synthetic
from .transforms import TransformConfig, eval_transforms, train_transforms

__all__ = [
    "AspectRatioBatchSampler",
    "Batch",
    "CategoryMap",
    "CocoDetection",
    "CocoPanoptic",
    "DatasetError",
    "ImageLoadError",
    "SkipTracker",
    "SkippedSample",
    "SynthConfig",
    "TransformConfig",
    "collate",
    "eval_transforms",
    "load_image",
    "make_synthetic",
    "pad_images",
    "rgb_to_id",
    "train_transforms",
    "write_synthetic",
]
