import contextlib
import io

import numpy as np
import pytest
import torch

from detrkit.data import CategoryMap, SynthConfig, make_synthetic
from detrkit.evaluation.coco import STAT_NAMES, CocoEvaluator, detections_to_coco, format_metrics


@pytest.fixture(scope="module")
def gt():
    return make_synthetic(SynthConfig(images=10, seed=11))["instances"]


def noisy_detections(gt, seed=0):
    """Ground-truth boxes jittered, some labels wrong, plus false positives: a realistic mix."""
    rng = np.random.default_rng(seed)
    cmap = CategoryMap.from_categories(gt["categories"])
    label_of = cmap.label_of()
    ids, dets = [], []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        boxes, labels, scores = [], [], []
        for a in anns:
            x, y, w, h = a["bbox"]
            j = rng.normal(0, 0.08, 4) * [w, h, w, h]
            boxes.append([x + j[0], y + j[1], x + w + j[2], y + h + j[3]])
            labels.append(label_of[a["category_id"]] if rng.random() > 0.2 else int(rng.integers(0, 4)))
            scores.append(float(rng.uniform(0.3, 1.0)))
        for _ in range(3):
            x, y = rng.uniform(0, img["width"] - 20), rng.uniform(0, img["height"] - 20)
            boxes.append([x, y, x + 20, y + 20])
            labels.append(int(rng.integers(0, 4)))
            scores.append(float(rng.uniform(0, 0.5)))
        ids.append(img["id"])
        dets.append(
            {
                "boxes": torch.tensor(boxes).reshape(-1, 4),
                "labels": torch.tensor(labels),
                "scores": torch.tensor(scores),
            }
        )
    return cmap, ids, dets


def test_same_numbers_as_pycocotools(gt):
    cmap, ids, dets = noisy_detections(gt)
    evaluator = CocoEvaluator(gt, cmap)
    evaluator.update(ids, dets)
    ours = evaluator.summarize()

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections_to_coco(ids, dets, cmap))
        reference = COCOeval(coco_gt, coco_dt, "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    assert 0.2 < ours["bbox/AP"] < 0.95
    for name, value in zip(STAT_NAMES, reference.stats):
        assert ours[f"bbox/{name}"] == pytest.approx(value, abs=1e-4), name


def test_results_use_dataset_category_ids(gt):
    cmap, ids, dets = noisy_detections(gt)
    results = detections_to_coco(ids, dets, cmap)
    assert {r["category_id"] for r in results} <= {1, 2, 4, 7}
    first = results[0]
    box = dets[0]["boxes"][0].tolist()
    assert first["bbox"] == pytest.approx([box[0], box[1], box[2] - box[0], box[3] - box[1]], abs=1e-4)


def test_no_detections_at_all(gt):
    evaluator = CocoEvaluator(gt, CategoryMap.from_categories(gt["categories"]))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    evaluator.update([1, 2], [empty, empty])
    metrics = evaluator.summarize()
    assert metrics["bbox/AP"] == 0.0
    assert "bbox" in format_metrics(metrics)


def test_an_image_without_detections_among_others(gt):
    cmap, ids, dets = noisy_detections(gt)
    dets[0] = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.long),
        "scores": torch.zeros(0),
    }
    evaluator = CocoEvaluator(gt, cmap)
    evaluator.update(ids, dets)
    assert 0 < evaluator.summarize()["bbox/AP"] < 1


def _diagonal_band(size: int, offset: int, width: int = 3) -> np.ndarray:
    """A thin band along a diagonal: a small mask (area ~ width * length) with a large box."""
    yy, xx = np.mgrid[:size, :size]
    return (np.abs(yy - xx - offset) < width) & (yy > 20) & (yy < size - 20)


def test_mask_ap_by_size_uses_mask_areas_as_pycocotools():
    """Objects whose masks are small but whose boxes are large: mask APs/APm/APl must equal
    pycocotools scoring the masks as the original submits them (segmentation without a box)."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    size = 200
    gt = {
        "images": [{"id": i, "width": size, "height": size, "file_name": f"{i}.jpg"} for i in (1, 2)],
        "categories": [{"id": 3, "name": "band"}],
        "annotations": [],
    }
    gt_masks = {}
    for image_id, offsets in ((1, (-40, 30)), (2, (0,))):
        for offset in offsets:
            mask = _diagonal_band(size, offset)
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            ann_id = len(gt["annotations"]) + 1
            gt["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": 3,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "area": float(mask.sum()),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
            gt_masks.setdefault(image_id, []).append(mask)
    cmap = CategoryMap.from_categories(gt["categories"])
    ids, dets = [], []
    for image_id, masks in gt_masks.items():
        # The true masks, then thin false positives with high scores (they decide APs).
        candidates = masks + [_diagonal_band(size, 60), _diagonal_band(size, -70)]
        scores = [0.6, 0.5, 0.9, 0.8][: len(masks)] + [0.95, 0.7]
        boxes = [
            [m.nonzero()[1].min(), m.nonzero()[0].min(), m.nonzero()[1].max() + 1, m.nonzero()[0].max() + 1]
            for m in candidates
        ]
        ids.append(image_id)
        dets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.zeros(len(candidates), dtype=torch.long),
                "scores": torch.tensor(scores[: len(candidates)]),
                "masks": torch.from_numpy(np.stack(candidates)),
            }
        )
    evaluator = CocoEvaluator(gt, cmap, ("bbox", "segm"))
    evaluator.update(ids, dets)
    ours = evaluator.summarize()

    segm_only = [{k: v for k, v in r.items() if k != "bbox"} for r in evaluator.results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        reference = COCOeval(coco_gt, coco_gt.loadRes(segm_only), "segm")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    expected = dict(zip(STAT_NAMES, reference.stats))
    assert expected["APs"] < 1.0  # the false positives count against the small objects
    for name in ("AP", "APs", "APm", "APl", "ARs", "ARm", "ARl"):
        assert ours[f"segm/{name}"] == pytest.approx(expected[name], abs=1e-4), name


def test_unreadable_images_count_as_images_without_detections(gt):
    """Their ground truth stays in the score (pycocotools over every image, no results for them)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cmap, ids, dets = noisy_detections(gt)
    evaluator = CocoEvaluator(gt, cmap)
    evaluator.update(ids[3:], dets[3:])
    evaluator.add_unreadable(ids[:3])
    ours = evaluator.summarize()
    assert evaluator.num_images == len(ids)

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        reference = COCOeval(coco_gt, coco_gt.loadRes(detections_to_coco(ids[3:], dets[3:], cmap)), "bbox")
        reference.params.imgIds = ids
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    for name, value in zip(STAT_NAMES, reference.stats):
        assert ours[f"bbox/{name}"] == pytest.approx(value, abs=1e-4), name


def test_ground_truth_without_area_gets_cocos_areas():
    # One 40x40 box (medium: 32^2 < 1600 < 96^2) and one 20x10 polygon (small), found exactly: without
    # areas, both would count as small (area 0) and APm would be -1 ("no medium object").
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "iscrowd": 0},
            {
                "id": 2, "image_id": 1, "category_id": 1, "bbox": [60, 60, 20, 10], "iscrowd": 0,
                "segmentation": [[60, 60, 80, 60, 80, 70, 60, 70]],
            },
        ],
    }  # fmt: skip
    evaluator = CocoEvaluator(gt, CategoryMap.from_categories(gt["categories"]))
    boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 80.0, 70.0]])
    evaluator.update(
        [1], [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0])}]
    )
    metrics = evaluator.summarize()
    assert metrics["bbox/APm"] == pytest.approx(1.0) and metrics["bbox/APs"] == pytest.approx(1.0)
    assert "area" not in gt["annotations"][0]  # the caller's ground truth is left as it was


def test_ground_truth_without_bbox_is_scored_by_its_mask():
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[10, 10, 50, 10, 50, 50, 10, 50]],
            },
            {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0},  # neither box nor mask: left out
        ],
    }
    evaluator = CocoEvaluator(gt, CategoryMap.from_categories(gt["categories"]))
    box = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    evaluator.update([1], [{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}])
    metrics = evaluator.summarize()
    assert metrics["bbox/AP"] == pytest.approx(1.0) and metrics["bbox/APm"] == pytest.approx(1.0)


def test_a_segmentation_pycocotools_must_not_decode_gives_way_to_the_box():
    # No area, and a polygon of odd length: the validator of data/segmentations.py refuses it, so
    # the area is the box's (40x40, medium) and pycocotools never sees the polygon.
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [10, 10, 40, 40],
             "segmentation": [[10, 10, 20, 10, 20]]},
        ],
    }  # fmt: skip
    evaluator = CocoEvaluator(gt, CategoryMap.from_categories(gt["categories"]))
    box = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    evaluator.update([1], [{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}])
    assert evaluator.summarize()["bbox/APm"] == pytest.approx(1.0)
