"""The evaluation report: per-class AP against pycocotools, precision/recall/F1 and the confusion
matrix on a hand-built case, and ``detrkit eval --report`` end to end."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import numpy as np
import pytest

from detrkit.data.coco import CategoryMap
from detrkit.evaluation.coco import CocoEvaluator
from detrkit.evaluation.matching import confusion_matrix, image_errors, match_dataset, precision_recall_f1

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}]


def random_dataset(seed: int = 0, images: int = 12):
    """Ground truth (some crowd) and results: jittered copies of the objects with their class or
    another, and random false alarms, with random scores."""
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": CATEGORIES}
    results = []
    for image_id in range(1, images + 1):
        gt["images"].append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 200, "height": 200})
        for _ in range(rng.integers(0, 6)):
            x, y = rng.uniform(0, 150, 2)
            w, h = rng.uniform(8, 50, 2)
            category = int(rng.choice([1, 2, 5]))
            crowd = int(rng.random() < 0.1)
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": category,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": crowd,
            })  # fmt: skip
            for _ in range(rng.integers(0, 3)):
                jitter = rng.normal(0, 4, 4)
                label = category if rng.random() < 0.8 else int(rng.choice([1, 2, 5]))
                box = [x + jitter[0], y + jitter[1], max(w + jitter[2], 1), max(h + jitter[3], 1)]
                results.append(
                    {"image_id": image_id, "category_id": label, "bbox": box, "score": float(rng.random())}
                )
        for _ in range(rng.integers(0, 4)):
            x, y = rng.uniform(0, 150, 2)
            results.append({
                "image_id": image_id, "category_id": int(rng.choice([1, 2, 5])),
                "bbox": [x, y, 20.0, 20.0], "score": float(rng.random()),
            })  # fmt: skip
    return gt, results


def pycocotools_eval(gt, results, max_dets=None, category=None):
    """pycocotools' COCOeval of ``results`` (bbox), evaluated and accumulated (and summarised)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
        reference = COCOeval(coco, coco.loadRes(json.loads(json.dumps(results))), "bbox")
        if max_dets is not None:
            reference.params.maxDets = [1, 10, max_dets]
        if category is not None:
            reference.params.catIds = [category]
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    return reference


def evaluator_for(gt, results) -> CocoEvaluator:
    evaluator = CocoEvaluator(gt, CategoryMap.from_categories(gt["categories"]))
    evaluator.results = results
    evaluator.image_ids = {i["id"] for i in gt["images"]}
    evaluator.summarize()
    return evaluator


@pytest.mark.parametrize("seed", [0, 1])
def test_per_class_ap_equals_pycocotools_run_on_that_class_alone(seed):
    gt, results = random_dataset(seed)
    rows = {r["category_id"]: r for r in evaluator_for(gt, results).per_class()}
    for category in (1, 2, 5):
        reference = pycocotools_eval(gt, results, category=category)
        row = rows[category]
        assert row["AP"] == pytest.approx(reference.stats[0], abs=1e-9)
        assert row["AP50"] == pytest.approx(reference.stats[1], abs=1e-9)
        assert row["AP75"] == pytest.approx(reference.stats[2], abs=1e-9)
        assert row["AR100"] == pytest.approx(reference.stats[8], abs=1e-9)
        objects = [a for a in gt["annotations"] if a["category_id"] == category and not a["iscrowd"]]
        assert row["objects"] == len(objects)
        assert row["detections"] == sum(r["category_id"] == category for r in results)


def test_precision_recall_agree_with_pycocotools_matching():
    """Recall at threshold 0 equals COCO's recall at IoU 0.5 (all detections kept, maxDets large)."""
    gt, results = random_dataset(3, images=20)
    matches = match_dataset(gt, results, [i["id"] for i in gt["images"]])
    prf = precision_recall_f1(matches, [1, 2, 5], 0.0)
    reference = pycocotools_eval(gt, results, max_dets=1000)
    recall = reference.eval["recall"][0, :, 0, -1]  # IoU 0.5, all areas, maxDets 1000
    for k, category in enumerate((1, 2, 5)):
        assert prf[category]["recall"] == pytest.approx(recall[k], abs=1e-9)


# --- a hand-built image: every kind of error once ---------------------------------------------------
A, B, C, D = [10, 10, 20, 20], [60, 10, 20, 20], [10, 60, 20, 20], [60, 60, 20, 20]
HAND_GT = {
    "images": [{"id": 1, "file_name": "1.jpg", "width": 100, "height": 100}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": A, "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": B, "area": 400, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": C, "area": 400, "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
}
HAND_RESULTS = [
    {"image_id": 1, "category_id": 1, "bbox": [11, 10, 20, 20], "score": 0.9},  # found: a on A
    {"image_id": 1, "category_id": 1, "bbox": [60, 11, 20, 20], "score": 0.8},  # confusion: b taken for a
    {"image_id": 1, "category_id": 1, "bbox": D, "score": 0.7},  # false alarm
    {"image_id": 1, "category_id": 2, "bbox": A, "score": 0.3},  # below the threshold
]  # object C (an a) is missed


def test_confusion_matrix_on_known_misses_false_alarms_and_confusions():
    matches = match_dataset(HAND_GT, HAND_RESULTS, [1])
    matrix = confusion_matrix(matches, [1, 2], threshold=0.5)
    # rows: true a, b, background; columns: predicted a, b, background
    assert matrix.tolist() == [[1, 0, 1], [1, 0, 0], [1, 0, 0]]
    # At threshold 0 the low b on A joins, pairing with nothing left (A is taken): a false alarm.
    assert confusion_matrix(matches, [1, 2], threshold=0.0).tolist() == [[1, 0, 1], [1, 0, 0], [1, 1, 0]]


def test_precision_recall_f1_and_the_best_threshold_on_the_hand_built_image():
    matches = match_dataset(HAND_GT, HAND_RESULTS, [1])
    prf = precision_recall_f1(matches, [1, 2], threshold=0.5)
    a, b, overall = prf[1], prf[2], prf["all"]
    assert (a["tp"], a["fp"], a["fn"]) == (1, 2, 1)
    assert a["precision"] == pytest.approx(1 / 3) and a["recall"] == pytest.approx(1 / 2)
    assert a["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert (b["tp"], b["fp"], b["fn"]) == (0, 0, 1) and b["f1"] == 0
    assert (overall["tp"], overall["fp"], overall["fn"]) == (1, 2, 2)
    # F1 over thresholds: keeping the 0.9 alone, 2/(1+0+3) = 0.5, is the best (every later detection
    # is false); predict keeps scores above its threshold, so that threshold is the next score, 0.8.
    assert overall["best_threshold"] == pytest.approx(0.8) and overall["best_f1"] == pytest.approx(0.5)
    assert a["best_threshold"] == pytest.approx(0.8) and a["best_f1"] == pytest.approx(2 / 3)
    assert image_errors(matches, 0.5) == [{"image_id": 1, "missed": 2, "false_positives": 2}]


def test_a_detection_on_a_crowd_region_is_neither_found_nor_false():
    gt = json.loads(json.dumps(HAND_GT))
    gt["annotations"][2]["iscrowd"] = 1  # C becomes a crowd region of a
    results = [{"image_id": 1, "category_id": 1, "bbox": C, "score": 0.9}]
    prf = precision_recall_f1(match_dataset(gt, results, [1]), [1, 2], 0.5)
    assert (prf[1]["tp"], prf[1]["fp"], prf[1]["fn"]) == (0, 0, 1)  # A missed; C is not an object


def test_eval_report_on_the_synthetic_validation_set(tmp_path, capsys):
    """``detrkit eval --report`` writes every part, and its numbers are the evaluation's."""
    import torch

    import detrkit
    import detrkit.cli
    from conftest import shapes_config

    torch.manual_seed(0)
    weights = tmp_path / "model.safetensors"
    detrkit.save_model(detrkit.build_model(shapes_config()), weights)
    report_dir, out = tmp_path / "report", tmp_path / "eval"
    argv = ["eval", "--weights", str(weights), "--data", "synthetic", "--out", str(out)]
    assert (
        detrkit.cli.main([*argv, "--report", str(report_dir), "--threshold", "0.2", "--num-workers", "0"])
        == 0
    )
    for name in ("report.md", "per_class.csv", "confusion_matrix.csv", "confusion_matrix.png", "pr_curves.png",
                 "thresholds.png"):  # fmt: skip
        assert (report_dir / name).stat().st_size > 0, name
    report = json.loads((report_dir / "report.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert report["metrics"]["bbox/AP"] == metrics["bbox/AP"]
    names = [r["name"] for r in report["per_class"]["bbox"]]
    assert names == ["rectangle", "ellipse", "triangle", "diamond"]
    counts = np.array(report["confusion_matrix"]["counts"])
    objects = sum(r["objects"] for r in report["per_class"]["bbox"])
    assert counts[:-1].sum() == objects  # every object is found, confused or missed exactly once
    with open(report_dir / "per_class.csv") as f:
        assert [row["name"] for row in csv.DictReader(f)] == names
    # The PR curves drawn are COCO's: each class's mean precision is its AP50.
    ap50 = {r["name"]: r["AP50"] for r in report["per_class"]["bbox"]}
    assert report["pr_curves"] and all(len(c["precision"]) == 101 for c in report["pr_curves"].values())
    for name, curve in report["pr_curves"].items():
        assert np.mean(curve["precision"]) == pytest.approx(ap50[name], abs=1e-9)
    worst = report["worst_images"]
    assert worst and all((report_dir / w["picture"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for w in worst)
    markdown = (report_dir / "report.md").read_text()
    assert "worst/" in markdown and "| name | AP | AP50 | AP75 | AR100 |" in markdown
    assert "|---|---|---|" in markdown and "| rectangle |" in markdown
    best = report["overall"]["best_threshold"]
    assert f"F1 is highest, {report['overall']['best_f1']:.3f}, at score > {best:.6g}" in markdown
    # A second report into the same folder is refused unless --overwrite.
    capsys.readouterr()
    assert detrkit.cli.main([*argv[:5], "--report", str(report_dir)]) == 2
    assert "--report" in capsys.readouterr().err
    # ...and written again over the first with it.
    again = [
        *argv[:5],
        "--report",
        str(report_dir),
        "--overwrite",
        "--threshold",
        "0.2",
        "--num-workers",
        "0",
    ]
    assert detrkit.cli.main(again) == 0
    assert json.loads((report_dir / "report.json").read_text())["worst_images"] == worst


def test_a_warning_when_detections_fill_the_queries():
    from detrkit.evaluation.coco import queries_warning

    gt, _ = random_dataset(0, images=10)
    busy = [
        {"image_id": i, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9}
        for i in (1, 2)
        for _ in range(8)
    ]
    calm = [{"image_id": i, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9} for i in range(3, 11)]
    evaluator = CocoEvaluator(gt, CategoryMap.from_categories(gt["categories"]))
    evaluator.results, evaluator.image_ids = busy + calm, set(range(1, 11))
    message = queries_warning(evaluator, num_queries=10)
    assert message and "on 2 of 10 images" in message and "model.num_queries" in message
    evaluator.results = busy[:8] + calm  # one busy image of ten: below the share
    assert queries_warning(evaluator, num_queries=10) is None
    assert queries_warning(evaluator, num_queries=20) is None  # 8 of 20 queries: room left


def test_panoptic_report_per_class_averages_to_the_summary(tmp_path):
    from detrkit.evaluation.pq import PanopticEvaluator

    isthing = {1: True, 2: True, 100: False}
    evaluator = PanopticEvaluator(isthing, ground_truth=None, category_ids=[1, 2, 100])
    # tp, fp, fn, IoU sum per category (2 appears nowhere: left out of the averages)
    evaluator.stats[:] = [[3, 1, 2, 2.4], [0, 0, 0, 0], [1, 0, 1, 0.9]]
    summary = evaluator.summarize()
    report = evaluator.report(tmp_path, metrics=summary)
    rows = {r["category_id"]: r for r in report["per_class"]["panoptic"]}
    assert set(rows) == {1, 100}
    assert rows[1]["PQ"] == pytest.approx(2.4 / (3 + 0.5 + 1)) and rows[1]["SQ"] == pytest.approx(0.8)
    assert rows[100]["RQ"] == pytest.approx(1 / 1.5) and (rows[100]["tp"], rows[100]["fn"]) == (1, 1)
    assert np.mean([r["PQ"] for r in rows.values()]) == pytest.approx(summary["panoptic/PQ"])
    assert rows[1]["PQ"] == pytest.approx(summary["panoptic/PQ_th"])
    assert (tmp_path / "per_class.csv").read_text().splitlines()[0].startswith("category_id,isthing,PQ")
    assert "## Per class (panoptic)" in (tmp_path / "report.md").read_text()


def test_max_dets_is_cocos_max_dets():
    """``max_dets`` = pycocotools' last maxDets: AP and AR100 count that many detections per image
    and class."""

    gt, results = random_dataset(4, images=10)
    # Image 1: twelve confident false alarms of class 1, then the one detection that finds its object.
    target = next(a for a in gt["annotations"] if a["image_id"] == 1 and not a["iscrowd"])
    results = [r for r in results if r["image_id"] != 1]
    results += [
        {"image_id": 1, "category_id": target["category_id"], "bbox": [150, 150, 5, 5], "score": 0.9}
    ] * 12
    results += [{"image_id": 1, "category_id": target["category_id"], "bbox": target["bbox"], "score": 0.1}]
    evaluator = CocoEvaluator(gt, CategoryMap.from_categories(gt["categories"]))
    evaluator.results, evaluator.image_ids = results, {i["id"] for i in gt["images"]}
    evaluator.max_dets = 10
    few = evaluator.summarize()
    reference = pycocotools_eval(gt, results, max_dets=10)
    # pycocotools' own summary prints AP at maxDets=100 whatever maxDets holds: read its arrays.
    precision = reference.eval["precision"][:, :, :, 0, 2]  # all areas, maxDets[2] = 10
    recall = reference.eval["recall"][:, :, 0, 2]
    assert few["bbox/AP"] == pytest.approx(precision[precision > -1].mean(), abs=1e-9)
    assert few["bbox/AR100"] == pytest.approx(recall[recall > -1].mean(), abs=1e-9)
    evaluator.max_dets = 100
    assert evaluator.summarize()["bbox/AR100"] > few["bbox/AR100"]  # the 13th detection now counts
    with pytest.raises(ValueError, match="max_dets=5: at least 10"):
        evaluator.max_dets = 5
        evaluator.summarize()


def test_the_best_threshold_is_reproduced_by_predicts_rule_and_respects_ties():
    """Detections kept by ``score > best_threshold`` give ``best_f1``; equal scores go together."""
    gt = json.loads(json.dumps(HAND_GT))
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [11, 10, 20, 20], "score": 0.9},  # found
        {"image_id": 1, "category_id": 1, "bbox": D, "score": 0.6},  # false, tied with the next
        {"image_id": 1, "category_id": 1, "bbox": [10, 61, 20, 20], "score": 0.6},  # found (C)
        {"image_id": 1, "category_id": 2, "bbox": B, "score": 0.2},  # found
    ]
    matches = match_dataset(gt, results, [1])
    best = precision_recall_f1(matches, [1, 2], 0.5)["all"]
    # Kept by score > t: {0.9} F1 0.5; {0.9, 0.6, 0.6} 2*2/(3+3) = 0.667; all four 2*3/(4+3) = 0.857.
    assert best["best_f1"] == pytest.approx(6 / 7) and best["best_threshold"] == 0.0
    again = precision_recall_f1(matches, [1, 2], best["best_threshold"])["all"]
    assert again["f1"] == pytest.approx(best["best_f1"])
    a = precision_recall_f1(matches, [1, 2], 0.5)[1]
    # Class 1: {0.9} 2/(1+2) = 0.667, {0.9, 0.6, 0.6} 4/(3+2) = 0.8: never "0.9 and one 0.6".
    assert a["best_f1"] == pytest.approx(0.8) and a["best_threshold"] == 0.0
    assert precision_recall_f1(matches, [1, 2], a["best_threshold"])[1]["f1"] == pytest.approx(0.8)
