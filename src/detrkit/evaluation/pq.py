"""Panoptic Quality (PQ, SQ, RQ; all / things / stuff), as defined by Kirillov et al. 2019 and computed
by COCO's ``panopticapi``.

Per image, a predicted and a ground-truth segment of the same category match when their IoU exceeds
0.5 (then the match is unique); void pixels (id 0 in the ground truth) are left out of the union;
crowd ground-truth segments are never matched, and a prediction lying more than half on void or on a
crowd region of its category is not counted as a false positive. A ``segments_info`` entry with no
pixel in the PNG is left out: nothing could ever match it (panopticapi would count it as a miss, so
that even perfect predictions score below 1; the dataset drops such entries from the training targets
for the same reason). Per category,
``PQ = sum(IoU of matches) / (TP + FP/2 + FN/2)``; the reported PQ averages the categories that
appear (TP + FP + FN > 0). panopticapi itself is not on PyPI, and torchmetrics' ``PanopticQuality``
knows neither crowd regions nor COCO's JSON, so this is a direct implementation, checked in the tests
against hand-computed cases.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import is_dist

OFFSET = 256 * 256 * 256  # larger than any segment id: gt * OFFSET + pred is a unique pair key
VOID = 0


def image_pq_stats(
    gt_ids: np.ndarray,
    gt_segments: Sequence[Mapping[str, Any]],
    pred_ids: np.ndarray,
    pred_segments: Sequence[Mapping[str, Any]],
) -> dict[int, np.ndarray]:
    """PQ statistics of one image: ``{category_id: [tp, fp, fn, iou_sum]}``.

    Args:
        gt_ids, pred_ids: int[H, W] segment-id maps (0 = void).
        gt_segments: ``{"id", "category_id", "iscrowd" (optional)}`` per ground-truth segment.
        pred_segments: ``{"id", "category_id"}`` per predicted segment.
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"ground truth is {gt_ids.shape} but the prediction is {pred_ids.shape}")
    pairs, counts = np.unique(
        gt_ids.astype(np.int64) * OFFSET + pred_ids.astype(np.int64), return_counts=True
    )
    gt_of, pred_of = pairs // OFFSET, pairs % OFFSET
    intersections = {(int(g), int(p)): int(c) for g, p, c in zip(gt_of, pred_of, counts)}
    gt_area = dict(zip(*np.unique(gt_ids, return_counts=True)))
    pred_area = dict(zip(*np.unique(pred_ids, return_counts=True)))

    # Entries without a pixel in the map cannot be found: left out rather than counted as misses.
    gt = {int(s["id"]): s for s in gt_segments if gt_area.get(int(s["id"]), 0) > 0}
    pred = {int(s["id"]): s for s in pred_segments if pred_area.get(int(s["id"]), 0) > 0}
    unknown = set(int(i) for i in pred_area) - set(pred) - {VOID}
    if unknown:
        raise ValueError(f"segment ids {sorted(unknown)} are in the prediction map but not in its segments")
    stats: dict[int, np.ndarray] = {}

    def stat(category: int) -> np.ndarray:
        return stats.setdefault(int(category), np.zeros(4))

    matched_gt, matched_pred = set(), set()
    for (g, p), inter in intersections.items():
        if g not in gt or p not in pred or gt[g].get("iscrowd", 0):
            continue
        if gt[g]["category_id"] != pred[p]["category_id"]:
            continue
        union = pred_area[p] + gt_area.get(g, 0) - inter - intersections.get((VOID, p), 0)
        iou = inter / union
        if iou > 0.5:
            s = stat(gt[g]["category_id"])
            s[0] += 1
            s[3] += iou
            matched_gt.add(g)
            matched_pred.add(p)
    crowd_of_category = {}
    for g, segment in gt.items():
        if g in matched_gt:
            continue
        if segment.get("iscrowd", 0):
            crowd_of_category[segment["category_id"]] = g
            continue
        stat(segment["category_id"])[2] += 1
    for p, segment in pred.items():
        if p in matched_pred:
            continue
        ignored = intersections.get((VOID, p), 0)
        if segment["category_id"] in crowd_of_category:
            ignored += intersections.get((crowd_of_category[segment["category_id"]], p), 0)
        if ignored / pred_area[p] > 0.5:
            continue
        stat(segment["category_id"])[1] += 1
    return stats


def summarize_pq(stats: Mapping[int, np.ndarray], isthing: Mapping[int, bool]) -> dict[str, float]:
    """``panoptic/PQ``, ``/SQ``, ``/RQ`` over all categories, ``_th`` things and ``_st`` stuff (0..1;
    -1 where no category of the group appears)."""
    out: dict[str, float] = {}
    for suffix, keep in (
        ("", lambda c: True),
        ("_th", lambda c: isthing[c]),
        ("_st", lambda c: not isthing[c]),
    ):
        pq = sq = rq = 0.0
        n = 0
        for category in isthing:
            if not keep(category) or category not in stats:
                continue
            tp, fp, fn, iou = stats[category]
            if tp + fp + fn == 0:
                continue
            n += 1
            pq += iou / (tp + 0.5 * fp + 0.5 * fn)
            sq += iou / tp if tp else 0.0
            rq += tp / (tp + 0.5 * fp + 0.5 * fn)
        for name, value in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
            out[f"panoptic/{name}{suffix}"] = (
                float(value / n) if n else -1.0
            )  # plain floats: JSON, checkpoints
    return out


class PanopticEvaluator:
    """Accumulates PQ statistics over a dataset (and over processes).

    Args:
        isthing: ``{category_id: is a thing}`` for every category of the dataset.
        ground_truth: ``image_id -> (segment-id map int[H, W], segments_info)`` of the dataset.
        category_ids: the dataset category id of each contiguous model label.
    """

    iou_types = ("panoptic",)

    def __init__(
        self,
        isthing: Mapping[int, bool],
        ground_truth: Callable[[int], tuple[np.ndarray, Sequence[Mapping[str, Any]]]],
        category_ids: Sequence[int],
    ) -> None:
        self.isthing = {int(k): bool(v) for k, v in isthing.items()}
        self.ground_truth = ground_truth
        self.category_ids = list(category_ids)
        self.categories = sorted(self.isthing)
        self.stats = np.zeros((len(self.categories), 4))
        self.num_images = 0  # images evaluated (over all processes after synchronize())
        self._row = {c: i for i, c in enumerate(self.categories)}

    def update(self, image_ids: Sequence[int], results: Sequence[dict[str, Any]]) -> None:
        """``results``: :class:`~detrkit.models.panoptic.PostProcessPanoptic` outputs at original size."""
        self.num_images += len(image_ids)
        for image_id, result in zip(image_ids, results, strict=True):
            gt_ids, gt_segments = self.ground_truth(int(image_id))
            pred_segments = [
                {"id": s["id"], "category_id": self.category_ids[s["label"]]} for s in result["segments_info"]
            ]
            pred_ids = result["segments"].cpu().numpy()
            for category, values in image_pq_stats(gt_ids, gt_segments, pred_ids, pred_segments).items():
                if category not in self._row:
                    raise ValueError(f"category id {category} of image {image_id} is not a dataset category")
                self.stats[self._row[category]] += values

    def add_unreadable(self, image_ids: Sequence[int]) -> None:
        """Images that could not be read: predicted as all void, so their segments count as missed."""
        self.num_images += len(image_ids)
        for image_id in image_ids:
            try:
                gt_ids, gt_segments = self.ground_truth(int(image_id))
            except Exception as e:  # noqa: BLE001 - the PNG may be what could not be read
                segments = getattr(e, "segments_info", None)
                if segments is None:
                    raise
                # Without the PNG every (non-crowd) segment is simply missed.
                for segment in segments:
                    if not segment.get("iscrowd", 0):
                        self.stats[self._row[segment["category_id"]], 2] += 1
                continue
            stats = image_pq_stats(gt_ids, gt_segments, np.zeros_like(gt_ids), [])
            for category, values in stats.items():
                self.stats[self._row[category]] += values

    def synchronize(self) -> None:
        """Sum every process's statistics (call on all ranks before :meth:`summarize`)."""
        if is_dist():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            total = torch.from_numpy(np.append(self.stats.ravel(), self.num_images)).to(device)
            dist.all_reduce(total)
            total = total.cpu().numpy()
            self.stats, self.num_images = total[:-1].reshape(self.stats.shape), int(total[-1])

    def report(self, out_dir: str | os.PathLike, **options: Any) -> dict[str, Any]:
        """Write the per-class PQ / SQ / RQ report to ``out_dir`` (see
        :func:`detrkit.evaluation.report.write_report`)."""
        from .report import write_report

        return write_report(self, out_dir, **options)

    def summarize(self) -> dict[str, float]:
        return summarize_pq({c: self.stats[i] for c, i in self._row.items()}, self.isthing)
