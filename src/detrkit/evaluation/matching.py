"""Detections matched to ground truth at one IoU, as COCO matches them: what per-class precision,
recall and F1 at a score threshold, the best threshold, the confusion matrix and the worst images
are computed from.

Matching follows COCOeval at IoU 0.5, per image and class: detections in descending score take the
unmatched non-crowd ground-truth object of highest IoU >= 0.5; a detection that finds none but
overlaps a crowd region (intersection over the detection's area >= 0.5) is ignored, neither true
nor false; the rest are false positives. Because a detection's match depends only on the
detections scored above it, one matching of all detections gives the counts at every threshold.

The confusion matrix is class-agnostic, as detection tools draw it: each detection above the score
threshold is paired with an object it overlaps (IoU >= 0.5), whatever the two classes, each object
and detection used once: pairs of the same class first (a correct detection is not called a
confusion because a wrong-class duplicate overlaps a little more), then by IoU. Unpaired objects
are misses (predicted "background"), unpaired detections false alarms (true "background").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

IOU = 0.5


@dataclass
class ImageMatch:
    """One image's matching: per detection its category id, score and outcome."""

    image_id: int
    categories: np.ndarray  # int64[D]
    scores: np.ndarray  # float64[D]
    true_positive: np.ndarray  # bool[D]: matched an object of its class
    ignored: np.ndarray  # bool[D]: on a crowd region of its class
    gt_categories: np.ndarray  # int64[G] of the non-crowd objects
    gt_found_at: np.ndarray  # float64[G]: score of the detection that matched it (-inf: none)
    gt_boxes: np.ndarray = field(repr=False)  # float64[G, 4] xywh, non-crowd
    boxes: np.ndarray = field(repr=False)  # float64[D, 4] xywh

    def missed(self, threshold: float) -> np.ndarray:
        """bool[G]: the objects no detection scored above ``threshold`` found."""
        return self.gt_found_at <= threshold

    def false_positives(self, threshold: float) -> np.ndarray:
        """bool[D]: the detections scored above ``threshold`` that found no object of their class."""
        return (self.scores > threshold) & ~self.true_positive & ~self.ignored


def _iou(dt: np.ndarray, gt: np.ndarray, crowd: Sequence[int]) -> np.ndarray:
    """float[D, G] IoU of xywh boxes (against a crowd object: intersection over the detection's area)."""
    if len(dt) == 0 or len(gt) == 0:
        return np.zeros((len(dt), len(gt)))
    return np.asarray(mask_utils.iou(dt.tolist(), gt.tolist(), list(crowd)), dtype=np.float64)


def match_image(
    image_id: int,
    ground_truth: Sequence[Mapping[str, Any]],
    detections: Sequence[Mapping[str, Any]],
    iou_threshold: float = IOU,
) -> ImageMatch:
    """Match one image's COCO results (``bbox``, ``category_id``, ``score``) to its annotations."""
    detections = sorted(detections, key=lambda d: -d["score"])
    boxes = np.array([d["bbox"] for d in detections], dtype=np.float64).reshape(-1, 4)
    categories = np.array([d["category_id"] for d in detections], dtype=np.int64)
    scores = np.array([d["score"] for d in detections], dtype=np.float64)
    true_positive = np.zeros(len(detections), bool)
    ignored = np.zeros(len(detections), bool)
    gt_boxes = np.array([a["bbox"] for a in ground_truth], dtype=np.float64).reshape(-1, 4)
    gt_categories = np.array([a["category_id"] for a in ground_truth], dtype=np.int64)
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in ground_truth], dtype=bool)
    found_at = np.full(len(ground_truth), -np.inf)
    for category in np.unique(categories):
        dt_index = np.flatnonzero(categories == category)
        gt_index = np.flatnonzero(gt_categories == category)
        iou = _iou(boxes[dt_index], gt_boxes[gt_index], crowd[gt_index].astype(int).tolist())
        is_crowd = crowd[gt_index]
        taken = np.zeros(len(gt_index), bool)
        for row, d in enumerate(dt_index):  # in score order: earlier detections choose first
            candidates = np.where(~taken & ~is_crowd & (iou[row] >= iou_threshold), iou[row], -1.0)
            if len(candidates) and candidates.max() >= 0:
                taken[candidates.argmax()] = True
                found_at[gt_index[candidates.argmax()]] = scores[d]
                true_positive[d] = True
            elif (is_crowd & (iou[row] >= iou_threshold)).any():
                ignored[d] = True
    keep = ~crowd
    return ImageMatch(
        image_id, categories, scores, true_positive, ignored,
        gt_categories[keep], found_at[keep], gt_boxes[keep], boxes,
    )  # fmt: skip


def match_dataset(
    ground_truth: Mapping[str, Any], results: Sequence[Mapping[str, Any]], image_ids: Sequence[int]
) -> list[ImageMatch]:
    """:func:`match_image` over ``image_ids`` of a COCO instances dict and its results list."""
    gt_of: dict[int, list] = defaultdict(list)
    for a in ground_truth.get("annotations", []):
        gt_of[int(a["image_id"])].append(a)
    dt_of: dict[int, list] = defaultdict(list)
    for r in results:
        dt_of[int(r["image_id"])].append(r)
    return [match_image(i, gt_of[i], dt_of[i]) for i in sorted(image_ids)]


def precision_recall_f1(
    matches: Sequence[ImageMatch], category_ids: Sequence[int], threshold: float
) -> dict[int | str, dict[str, Any]]:
    """Per category id (and ``"all"``, pooled over classes): ``precision``, ``recall``, ``f1``,
    ``tp``, ``fp``, ``fn`` of the detections scored above ``threshold`` (as ``predict`` keeps them),
    and ``best_threshold`` with ``best_f1``: the threshold that maximises F1 (None: no detection)."""
    curves = f1_curves(matches, category_ids)
    out: dict[int | str, dict[str, float]] = {}
    for key, (scores, tp, fp, positives) in curves.items():
        at = int(np.searchsorted(-scores, -threshold, side="left"))  # detections with score > t
        tp_t, fp_t = (float(tp[at - 1]), float(fp[at - 1])) if at else (0.0, 0.0)
        row = _prf(tp_t, fp_t, positives)
        # A threshold keeps whole groups of equal scores: F1 only where a group ends. Keeping the
        # top k is the threshold of the (k+1)-th score, as predict keeps scores above it (0: all).
        ends = np.flatnonzero(np.append(scores[1:] < scores[:-1], True)) if len(scores) else np.zeros(0, int)
        f1 = 2 * tp[ends] / np.maximum(tp[ends] + fp[ends] + positives, 1e-12)
        best = int(ends[np.argmax(f1)]) if len(ends) else -1
        row["best_threshold"] = (
            (float(scores[best + 1]) if best + 1 < len(scores) else 0.0) if best >= 0 else None
        )
        row["best_f1"] = float(f1.max()) if len(ends) else 0.0
        out[key] = row
    return out


def _prf(tp: float, fp: float, positives: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / positives if positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision, "recall": recall, "f1": f1,
        "tp": tp, "fp": fp, "fn": float(positives - tp), "objects": float(positives),
    }  # fmt: skip


def f1_curves(
    matches: Sequence[ImageMatch], category_ids: Sequence[int]
) -> dict[int | str, tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """Per category id and ``"all"``: (scores descending, cumulative TP, cumulative FP, objects)."""
    scores = np.concatenate([m.scores for m in matches]) if matches else np.zeros(0)
    cats = np.concatenate([m.categories for m in matches]) if matches else np.zeros(0, np.int64)
    tp = np.concatenate([m.true_positive for m in matches]) if matches else np.zeros(0, bool)
    ignored = np.concatenate([m.ignored for m in matches]) if matches else np.zeros(0, bool)
    gt = np.concatenate([m.gt_categories for m in matches]) if matches else np.zeros(0, np.int64)
    keep = ~ignored
    scores, cats, tp = scores[keep], cats[keep], tp[keep]
    out = {}
    for key in (*category_ids, "all"):
        sel = np.ones(len(scores), bool) if key == "all" else cats == key
        order = np.argsort(-scores[sel], kind="stable")
        hits = tp[sel][order]
        positives = int(len(gt) if key == "all" else (gt == key).sum())
        out[key] = (scores[sel][order], np.cumsum(hits), np.cumsum(~hits), positives)
    return out


def confusion_matrix(
    matches: Sequence[ImageMatch], category_ids: Sequence[int], threshold: float, iou_threshold: float = IOU
) -> np.ndarray:
    """int64[K + 1, K + 1]: rows the true class, columns the predicted class, in ``category_ids``
    order with background last (row K: false alarms; column K: misses)."""
    k = len(category_ids)
    index = {int(c): i for i, c in enumerate(category_ids)}
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    for m in matches:
        above = (m.scores > threshold) & ~m.ignored
        dt_boxes, dt_cats = m.boxes[above], m.categories[above]
        gt_rows = np.array([index.get(int(c), k) for c in m.gt_categories], dtype=np.int64)
        dt_cols = np.array([index.get(int(c), k) for c in dt_cats], dtype=np.int64)
        iou = _iou(dt_boxes, m.gt_boxes, [0] * len(m.gt_boxes))
        d, g = np.nonzero(iou >= iou_threshold)
        same = dt_cats[d] == m.gt_categories[g]
        order = np.lexsort((-iou[d, g], ~same))  # same-class pairs first, then by IoU
        used_d, used_g = set(), set()
        for i in order:  # each detection and object once
            if d[i] in used_d or g[i] in used_g:
                continue
            used_d.add(d[i])
            used_g.add(g[i])
            matrix[gt_rows[g[i]], dt_cols[d[i]]] += 1
        for j in set(range(len(gt_rows))) - used_g:
            matrix[gt_rows[j], k] += 1
        for j in set(range(len(dt_cols))) - used_d:
            matrix[k, dt_cols[j]] += 1
    return matrix


def image_errors(matches: Sequence[ImageMatch], threshold: float) -> list[dict[str, int]]:
    """Per image, at ``threshold``: ``missed`` objects and ``false_positives`` (class-aware, as in
    :func:`precision_recall_f1`), worst first."""
    rows = [
        {
            "image_id": m.image_id,
            "missed": int(m.missed(threshold).sum()),
            "false_positives": int(m.false_positives(threshold).sum()),
        }
        for m in matches
    ]
    return sorted(rows, key=lambda r: (-(r["missed"] + r["false_positives"]), r["image_id"]))
