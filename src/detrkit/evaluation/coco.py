"""COCO evaluation (box AP, and mask AP for segmentation models) with faster-coco-eval.

Detections are kept as a COCO *results* list — ``{"image_id", "category_id", "bbox": [x, y, w, h],
"score"}`` with the dataset's own category ids — which is both what the metric reads and what is
written to disk, so the saved JSON can be re-scored by any COCO tool.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchvision.ops import box_convert

from ..data.coco import CategoryMap
from ..data.segmentations import find_bad_segmentations
from ..distributed import is_dist
from ..fileio import write_json_atomic

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def image_results(
    image_id: int,
    boxes: torch.Tensor,
    category_ids: Sequence[int],
    scores: Sequence[float],
    masks: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """One image's COCO result entries: ``boxes`` Tensor[N, 4] absolute (x1, y1, x2, y2) become
    COCO's (x, y, w, h); ``masks`` Bool[N, H, W] in original image size become RLE ``segmentation``."""
    xywh = box_convert(boxes.detach().double().cpu(), "xyxy", "xywh").tolist()
    rles = encode_masks(masks) if masks is not None and len(xywh) else [None] * len(xywh)
    results = []
    for box, category, score, rle in zip(xywh, category_ids, scores, rles, strict=True):
        entry = {"image_id": int(image_id), "category_id": int(category), "bbox": box, "score": float(score)}
        if rle is not None:
            entry["segmentation"] = rle
        results.append(entry)
    return results


def detections_to_coco(
    image_ids: Sequence[int],
    detections: Sequence[dict[str, torch.Tensor]],
    category_map: CategoryMap,
    masks: bool = False,
) -> list[dict[str, Any]]:
    """Post-processed detections (absolute xyxy boxes, contiguous labels, optional ``masks``
    Bool[N, H, W] in original image size) -> COCO results with the dataset's category ids."""
    results = []
    for image_id, det in zip(image_ids, detections, strict=True):
        categories = category_map.to_category_ids(det["labels"].cpu()).tolist()
        scores = det["scores"].float().cpu().tolist()
        results += image_results(
            image_id, det["boxes"].float(), categories, scores, det["masks"] if masks else None
        )
    return results


def encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    from pycocotools import mask as mask_utils

    array = np.asfortranarray(masks.cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    rles = mask_utils.encode(array)
    return [{"size": list(r["size"]), "counts": r["counts"].decode("ascii")} for r in rles]


def with_areas(ground_truth: dict[str, Any]) -> dict[str, Any]:
    """``ground_truth`` completed as COCO's own files have it: every annotation with a ``bbox`` (from
    its mask where it has none; one with neither is left out, as the dataset drops it) and an
    ``area`` (of the mask, else of the box). Without them COCO evaluation fails, or counts every
    such object as small (area 0)."""
    incomplete = [a for a in ground_truth.get("annotations", []) if "area" not in a or "bbox" not in a]
    if not incomplete:
        return ground_truth
    from pycocotools import mask as mask_utils

    sizes = {img["id"]: (img["height"], img["width"]) for img in ground_truth.get("images", [])}
    # A segmentation pycocotools must not decode (NaN, inf, a broken RLE) is not used: the box is.
    items = [(a, *sizes.get(a.get("image_id"), (None, None))[::-1]) for a in incomplete]
    unusable = {id(incomplete[i]) for i, _ in find_bad_segmentations(items)}
    annotations = []
    for ann in ground_truth["annotations"]:
        if "area" in ann and "bbox" in ann:
            annotations.append(ann)
            continue
        usable = id(ann) not in unusable
        ann = dict(ann)
        segmentation, size = ann.get("segmentation"), sizes.get(ann.get("image_id"))
        rle = None
        if segmentation and size is not None and usable:
            polygons = isinstance(segmentation, list) or isinstance(segmentation.get("counts"), list)
            rles = mask_utils.frPyObjects(segmentation, *size) if polygons else segmentation
            rle = mask_utils.merge(rles) if isinstance(rles, list) else rles
        if "bbox" not in ann:
            if rle is None:
                continue  # no box, no mask: nothing to score it by
            ann["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
        if "area" not in ann:
            _, _, w, h = ann["bbox"]
            ann["area"] = float(mask_utils.area(rle)) if rle is not None else float(w * h)
        annotations.append(ann)
    return {**ground_truth, "annotations": annotations}


class CocoEvaluator:
    """Accumulates COCO results over a dataset (and over processes) and computes AP.

    Args:
        ground_truth: the COCO instances dict (``dataset.data``).
        category_map: label <-> category id mapping of the model's outputs.
        iou_types: ``("bbox",)`` or ``("bbox", "segm")``.
    """

    def __init__(self, ground_truth: dict[str, Any], category_map: CategoryMap, iou_types=("bbox",)) -> None:
        self.ground_truth = ground_truth
        self.category_map = category_map
        self.iou_types = tuple(iou_types)
        self.results: list[dict[str, Any]] = []
        self.image_ids: set[int] = set()
        # COCO's last maxDets: the detections per image and class that AP and "AR100" count.
        self.max_dets = 100
        self.cocoevals: dict[str, Any] = {}  # per IoU type, the evaluator of the last summarize()

    def update(self, image_ids: Sequence[int], detections: Sequence[dict[str, torch.Tensor]]) -> None:
        self.image_ids.update(int(i) for i in image_ids)
        self.results.extend(
            detections_to_coco(image_ids, detections, self.category_map, "segm" in self.iou_types)
        )

    @property
    def num_images(self) -> int:
        """Images evaluated (over all processes after :meth:`synchronize`)."""
        return len(self.image_ids)

    def add_unreadable(self, image_ids: Sequence[int]) -> None:
        """Images that could not be read: evaluated with no detections, so their objects count as
        missed instead of silently leaving the score."""
        self.image_ids.update(int(i) for i in image_ids)

    def synchronize(self) -> None:
        """Gather every process's results (call on all ranks before :meth:`summarize`)."""
        if not is_dist():
            return
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.results, sorted(self.image_ids)))
        self.results = [r for results, _ in gathered for r in results]
        self.image_ids = {i for _, ids in gathered for i in ids}

    def summarize(self, verbose: bool = False) -> dict[str, float]:
        """COCO metrics as ``{"bbox/AP": ..., "bbox/AP50": ..., ...}`` (-1 where undefined)."""
        from faster_coco_eval import COCO, COCOeval_faster

        if self.max_dets < 10:  # COCO's maxDets are [1, 10, max_dets]; faster-coco-eval sorts them
            raise ValueError(f"max_dets={self.max_dets}: at least 10 (COCO's AR10 comes before it)")
        metrics: dict[str, float] = {}
        self.cocoevals = {}
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(with_areas(self.ground_truth))
        for iou_type in self.iou_types:
            if not self.results:
                metrics.update({f"{iou_type}/{n}": 0.0 for n in STAT_NAMES})
                continue
            # Each IoU type gets the results as the original submits them: boxes only, or masks
            # only, so a mask's area (which decides small/medium/large) is the mask's, not its box's.
            drop = "segmentation" if iou_type == "bbox" else "bbox"
            results = [{k: v for k, v in r.items() if k != drop} for r in self.results]
            with contextlib.redirect_stdout(io.StringIO()):
                dt = gt.loadRes(results)
            printer = print if verbose else (lambda *a, **k: None)
            evaluator = COCOeval_faster(gt, dt, iou_type, print_function=printer)
            evaluator.params.imgIds = sorted(self.image_ids)
            evaluator.params.maxDets = [1, 10, self.max_dets]
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            metrics.update(
                {f"{iou_type}/{n}": float(v) for n, v in zip(STAT_NAMES, evaluator.stats, strict=False)}
            )
            self.cocoevals[iou_type] = evaluator
        return metrics

    def per_class(self, iou_type: str = "bbox") -> list[dict[str, Any]]:
        """Per category of the dataset, from the precision and recall arrays of the last
        :meth:`summarize` (as COCO's own per-class numbers are read): ``AP`` (IoU 0.5:0.95), ``AP50``,
        ``AP75``, ``AR100`` (all areas, ``max_dets`` per image; -1 where the class has no object),
        plus ``objects`` (non-crowd ground truth in the evaluated images) and ``detections``."""
        evaluator = self.cocoevals.get(iou_type)
        names = {int(c["id"]): c.get("name", str(c["id"])) for c in self.ground_truth.get("categories", [])}
        objects: dict[int, int] = {}
        for a in self.ground_truth.get("annotations", []):
            if int(a["image_id"]) in self.image_ids and not a.get("iscrowd", 0):
                objects[int(a["category_id"])] = objects.get(int(a["category_id"]), 0) + 1
        detections: dict[int, int] = {}
        for r in self.results:
            detections[int(r["category_id"])] = detections.get(int(r["category_id"]), 0) + 1
        rows = []
        for k, category in enumerate(sorted(names)):
            row: dict[str, Any] = {"category_id": category, "name": names[category]}
            if evaluator is None:  # no detection at all: nothing found
                row.update(AP=0.0, AP50=0.0, AP75=0.0, AR100=0.0 if objects.get(category) else -1.0)
            else:
                k = list(evaluator.params.catIds).index(category)
                precision = np.asarray(evaluator.eval["precision"])[:, :, k, 0, -1]  # [T, R]
                recall = np.asarray(evaluator.eval["recall"])[:, k, 0, -1]  # [T]
                iou_thrs = np.asarray(evaluator.params.iouThrs)
                row.update(
                    AP=_mean_defined(precision),
                    AP50=_mean_defined(precision[np.isclose(iou_thrs, 0.5)]),
                    AP75=_mean_defined(precision[np.isclose(iou_thrs, 0.75)]),
                    AR100=_mean_defined(recall),
                )
            row.update(objects=objects.get(category, 0), detections=detections.get(category, 0))
            rows.append(row)
        return rows

    def report(self, out_dir: str | os.PathLike, **options: Any) -> dict[str, Any]:
        """Write the evaluation report of the last :meth:`summarize` to ``out_dir`` (see
        :func:`detrkit.evaluation.report.write_report` for what it holds and its options)."""
        from .report import write_report

        return write_report(self, out_dir, **options)

    def write_results(self, path: str | os.PathLike) -> None:
        """The detections as a COCO results JSON (dataset category ids, xywh boxes)."""
        write_json_atomic(path, self.results)


def queries_warning(
    evaluator: Any, num_queries: int, *, score: float = 0.5, share: float = 0.1
) -> str | None:
    """A warning when the model's confident detections fill most of its queries (>= 80%) on more than
    ``share`` of the images: the scenes hold more objects than ``num_queries`` can cover."""
    if not isinstance(evaluator, CocoEvaluator) or not evaluator.image_ids:
        return None
    confident: dict[int, int] = {}
    for r in evaluator.results:
        if r["score"] >= score:
            confident[r["image_id"]] = confident.get(r["image_id"], 0) + 1
    full = sum(n >= 0.8 * num_queries for n in confident.values())
    if full <= share * len(evaluator.image_ids):
        return None
    return (
        f"WARNING: on {full} of {len(evaluator.image_ids)} images the model's detections scored >= {score:g} "
        f"fill at least 80% of its {num_queries} queries: the scenes may hold more objects than it can "
        "find; train with a larger model.num_queries (and evaluate with --max-dets to match)"
    )


def per_class_ap(evaluator: Any) -> dict[str, float]:
    """``{"bbox/AP_per_class/<class name>": AP, ...}`` (and ``segm/AP_per_class/...``) of a summarised
    :class:`CocoEvaluator`, for the classes with ground truth; {} for other evaluators."""
    if not isinstance(evaluator, CocoEvaluator):
        return {}
    return {
        f"{iou_type}/AP_per_class/{row['name']}": row["AP"]
        for iou_type in evaluator.iou_types
        for row in evaluator.per_class(iou_type)
        if row["AP"] >= 0
    }


def _mean_defined(values: np.ndarray) -> float:
    """The mean of the entries COCO has defined (> -1), else -1."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else -1.0


def format_metrics(metrics: dict[str, float]) -> str:
    """A small table of the main metrics, one row per IoU type (and PQ / SQ / RQ when present)."""
    rows = []
    if "panoptic/PQ" in metrics:
        rows.append(f"{'':9}{'PQ':>7}{'SQ':>7}{'RQ':>7}")
        for suffix, name in (("", "all"), ("_th", "things"), ("_st", "stuff")):
            values = [metrics.get(f"panoptic/{m}{suffix}", -1.0) for m in ("PQ", "SQ", "RQ")]
            rows.append(f"{name:9}" + "".join(f"{100 * v:7.1f}" if v >= 0 else f"{'-':>7}" for v in values))
        if not any("/" in k and k.split("/")[1] in STAT_NAMES for k in metrics):
            return "\n".join(rows)
        rows.append("")
    return "\n".join(rows + [_format_ap(metrics)])


def _format_ap(metrics: dict[str, float]) -> str:
    types = sorted({k.split("/")[0] for k in metrics if "/" in k and k.split("/")[1] in STAT_NAMES})
    header = f"{'':6}" + "".join(f"{n:>7}" for n in STAT_NAMES[:6]) + f"{'AR100':>7}"
    rows = [header]
    for t in types:
        values = [metrics.get(f"{t}/{n}", float("nan")) for n in (*STAT_NAMES[:6], "AR100")]
        rows.append(f"{t:6}" + "".join(f"{100 * v:7.1f}" if v >= 0 else f"{'-':>7}" for v in values))
    return "\n".join(rows)
