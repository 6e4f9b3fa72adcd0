"""Batching: pad images to the largest in the batch and return the padding mask."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Sampler

from ..distributed import rank, world_size
from .coco import SkippedSample


@dataclass
class Batch:
    """``images`` Tensor[B, 3, H, W] (zero-padded bottom/right), ``padding_mask`` Bool Tensor[B, H, W]
    (True on padding), ``targets`` one dict per image, ``skipped`` the samples that could not load."""

    images: torch.Tensor
    padding_mask: torch.Tensor
    targets: list[dict[str, Any]]
    skipped: list[SkippedSample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(v: Any) -> Any:
            return v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v

        return Batch(
            self.images.to(device, non_blocking=non_blocking),
            self.padding_mask.to(device, non_blocking=non_blocking),
            [{k: move(v) for k, v in t.items()} for t in self.targets],
            self.skipped,
        )

    def pin_memory(self) -> Batch:
        self.images = self.images.pin_memory()
        self.padding_mask = self.padding_mask.pin_memory()
        return self


def pad_images(
    images: Sequence[torch.Tensor], size_divisibility: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack Tensor[3, H_i, W_i] into Tensor[B, 3, H, W] (zero padding) and a Bool mask[B, H, W]."""
    if not images:
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, 1, 1, dtype=torch.bool)
    height = max(img.shape[-2] for img in images)
    width = max(img.shape[-1] for img in images)
    if size_divisibility > 1:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool)
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        batch[i, :, :h, :w] = img
        mask[i, :h, :w] = False
    return batch, mask


def collate(samples: Sequence[tuple[torch.Tensor, dict[str, Any]] | SkippedSample]) -> Batch:
    """``DataLoader`` collate function: padded batch + padding mask; skipped samples set aside."""
    skipped = [s for s in samples if isinstance(s, SkippedSample)]
    good = [s for s in samples if not isinstance(s, SkippedSample)]
    images, padding_mask = pad_images([img for img, _ in good])
    return Batch(images, padding_mask, [t for _, t in good], skipped)


class AspectRatioBatchSampler(Sampler[list[int]]):
    """Batches of images on the same side of square (landscape or portrait), so padding wastes less.

    Wraps an index sampler (random, sequential or distributed); leftovers of both groups are
    batched together at the end unless ``drop_last``.
    """

    def __init__(
        self, sampler: Sampler[int], aspect_ratios: Sequence[float], batch_size: int, drop_last: bool = False
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.sampler = sampler
        self.groups = [int(r >= 1.0) for r in aspect_ratios]
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {0: [], 1: []}
        for index in self.sampler:
            bucket = buckets[self.groups[index]]
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
        rest = buckets[0] + buckets[1]
        while rest:
            chunk, rest = rest[: self.batch_size], rest[self.batch_size :]
            if len(chunk) == self.batch_size or not self.drop_last:
                yield chunk

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class ShardSampler(Sampler[int]):
    """Every process takes every ``world_size``-th index, without padding (so no image is
    evaluated twice, unlike ``DistributedSampler``)."""

    def __init__(self, length: int) -> None:
        self.indices = list(range(rank(), length, world_size()))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SkipTracker:
    """Reports unreadable samples from the main process: one warning per file, a count per epoch.

    Feed it each batch's ``skipped`` list; ``end_epoch()`` returns the epoch's summary line (or
    None when nothing was skipped) and starts counting afresh.
    """

    def __init__(self, warn=None) -> None:
        import warnings

        self._warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
        self.seen: set[str] = set()
        self.epoch_count = 0

    def update(self, skipped: Sequence[SkippedSample]) -> None:
        for sample in skipped:
            self.epoch_count += 1
            if sample.path not in self.seen:
                self.seen.add(sample.path)
                self._warn(f"skipping {sample.path}: {sample.reason}")

    def end_epoch(self) -> str | None:
        count, self.epoch_count = self.epoch_count, 0
        if not count:
            return None
        return f"skipped {count} sample(s) this epoch that could not be loaded ({len(self.seen)} distinct file(s) so far)"
