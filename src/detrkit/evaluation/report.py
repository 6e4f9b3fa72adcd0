"""An evaluation report a user can act on: which class fails, whether its errors are misses, false
alarms or confusions, and at which score threshold to deploy.

``write_report(evaluator, DIR)`` after an evaluation (``detrkit eval --report DIR``) writes:

- ``report.json``: everything below, machine-readable;
- ``per_class.csv``: per class AP, AP50, AP75, AR100 (from COCOeval's own arrays, per IoU type),
  objects, detections, and precision / recall / F1 at the threshold with the F1-best threshold;
- ``confusion_matrix.csv`` and ``.png`` (counts and row-normalised; background last);
- ``pr_curves.png`` (COCO's interpolated precision-recall at IoU 0.5, per class);
- ``thresholds.png`` (precision, recall and F1 against the score threshold);
- ``worst/``: the images with the most misses and false alarms, ground truth beside predictions;
- ``report.md``, which ties them together.

A panoptic evaluation gets the per-class PQ, SQ, RQ, TP, FP and FN (``report.json``,
``per_class.csv``, ``report.md``).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..drawing import draw_boxes
from ..errors import ConfigError
from ..fileio import atomic_write, write_json_atomic
from .coco import CocoEvaluator, with_areas
from .matching import IOU, confusion_matrix, f1_curves, image_errors, match_dataset, precision_recall_f1
from .pq import PanopticEvaluator


def write_report(
    evaluator: CocoEvaluator | PanopticEvaluator,
    out_dir: str | os.PathLike,
    *,
    threshold: float = 0.5,
    image_dir: str | os.PathLike | None = None,
    worst: int = 6,
    metrics: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Write the report of a summarised ``evaluator`` to ``out_dir``; returns ``report.json``'s content.

    Args:
        threshold: the score threshold for precision/recall/F1, the confusion matrix and the worst
            images (what ``predict --threshold`` would use).
        image_dir: where the dataset's images are (for the worst-image pictures; none without it).
        worst: how many worst images to draw.
        metrics: the headline metrics of the evaluation, repeated at the top of the report.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    if isinstance(evaluator, PanopticEvaluator):
        report = {"metrics": metrics or {}, "per_class": {"panoptic": panoptic_per_class(evaluator)}}
        _write_csv(out / "per_class.csv", report["per_class"]["panoptic"])
        write_json_atomic(out / "report.json", report)
        _write_bytes(out / "report.md", _markdown(report, []).encode())
        return report

    categories = sorted(int(c["id"]) for c in evaluator.ground_truth.get("categories", []))
    names = category_names(evaluator)
    # As COCOeval reads it: boxes and areas filled in from masks where the file has none.
    matches = match_dataset(
        with_areas(evaluator.ground_truth), evaluator.results, sorted(evaluator.image_ids)
    )
    prf = precision_recall_f1(matches, categories, threshold)
    per_class = {t: evaluator.per_class(t) for t in evaluator.iou_types}
    for row in per_class["bbox"]:
        row.update({k: prf[row["category_id"]][k] for k in ("precision", "recall", "f1")})
        row.update(best_threshold=prf[row["category_id"]]["best_threshold"])
        row.update(best_f1=prf[row["category_id"]]["best_f1"])
    matrix = confusion_matrix(matches, categories, threshold)
    labels = [names[c] for c in categories] + ["background"]
    errors = [e for e in image_errors(matches, threshold) if e["missed"] + e["false_positives"]][:worst]
    report: dict[str, Any] = {
        "metrics": metrics or {},
        "threshold": threshold,
        "match_iou": IOU,
        "images": evaluator.num_images,
        "overall": prf["all"],
        "per_class": per_class,
        "confusion_matrix": {
            "labels": labels,
            "rows": "true class",
            "columns": "predicted class",
            "counts": matrix.tolist(),
        },
        "worst_images": errors,
        "pr_curves": pr_curves(evaluator),
    }
    for iou_type, rows in per_class.items():
        _write_csv(out / ("per_class.csv" if iou_type == "bbox" else f"per_class_{iou_type}.csv"), rows)
    _write_csv(out / "confusion_matrix.csv", [{"true \\ predicted": labels[i], **dict(zip(labels, r))}
                                             for i, r in enumerate(matrix.tolist())])  # fmt: skip
    pictures = [
        _save(plt, _plot_confusion(plt, matrix, labels, threshold), out / "confusion_matrix.png"),
        _save(plt, _plot_pr_curves(plt, report["pr_curves"]), out / "pr_curves.png"),
        _save(plt, _plot_thresholds(plt, matches, categories, names, threshold), out / "thresholds.png"),
    ]
    if image_dir is not None:
        report["worst_images"] = _draw_worst(
            evaluator, matches, errors, Path(image_dir), out / "worst", threshold
        )
    write_json_atomic(out / "report.json", report)
    _write_bytes(out / "report.md", _markdown(report, pictures).encode())
    return report


def category_names(evaluator: CocoEvaluator) -> dict[int, str]:
    """``{category id: name}`` of the evaluator's ground truth (the id itself where it has no name)."""
    return {int(c["id"]): str(c.get("name", c["id"])) for c in evaluator.ground_truth.get("categories", [])}


def panoptic_per_class(evaluator: PanopticEvaluator) -> list[dict[str, Any]]:
    """Per category that appears: PQ, SQ, RQ (0..1) and the TP, FP, FN counts behind them."""
    rows = []
    for category, i in evaluator._row.items():
        tp, fp, fn, iou = (float(v) for v in evaluator.stats[i])
        if tp + fp + fn == 0:
            continue
        denominator = tp + 0.5 * fp + 0.5 * fn
        rows.append({
            "category_id": category, "isthing": evaluator.isthing[category],
            "PQ": iou / denominator, "SQ": iou / tp if tp else 0.0, "RQ": tp / denominator,
            "tp": int(tp), "fp": int(fp), "fn": int(fn),
        })  # fmt: skip
    return rows


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            "the evaluation report draws with matplotlib: pip install 'detrkit[plot]'"
        ) from None
    return plt


def _save(plt, figure, path: Path) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    _write_bytes(path, buffer.getvalue())
    return path.name


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    text = io.StringIO()
    if rows:
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    _write_bytes(path, text.getvalue().encode())


def _plot_confusion(plt, matrix: np.ndarray, labels: list[str], threshold: float):
    rows = matrix.sum(1, keepdims=True)
    normalised = matrix / np.maximum(rows, 1)
    size = 3 + 0.45 * len(labels)
    figure, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), layout="constrained")
    for ax, values, title, fmt in (
        (axes[0], matrix, "counts", "{:d}"),
        (axes[1], normalised, "row-normalised (share of each true class)", "{:.2f}"),
    ):
        ax.imshow(values, cmap="Blues", vmin=0)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        if len(labels) <= 30:
            top = values.max() if values.size else 0
            for (i, j), v in np.ndenumerate(values):
                if v:
                    color = "white" if v > 0.6 * top else "black"
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8, color=color)
    figure.suptitle(f"confusion matrix: score > {threshold:g}, IoU >= {IOU:g}")
    return figure


def pr_curves(evaluator: CocoEvaluator, iou_type: str = "bbox") -> dict[str, dict[str, list[float]]]:
    """COCO's interpolated precision at its 101 recall points, IoU 0.5, all areas, per class that
    has objects: ``{name: {"recall": [...], "precision": [...]}}`` (the mean of a class's precision
    is its AP50)."""
    evaluation = evaluator.cocoevals.get(iou_type)
    if evaluation is None:
        return {}
    names = category_names(evaluator)
    precision = np.asarray(evaluation.eval["precision"])  # [T, R, K, A, M]
    recall = np.asarray(evaluation.params.recThrs).tolist()
    iou = int(np.argmin(np.abs(np.asarray(evaluation.params.iouThrs) - 0.5)))
    curves = {}
    for k, category in enumerate(evaluation.params.catIds):
        curve = precision[iou, :, k, 0, -1]
        if (curve > -1).any():
            curves[names.get(category, str(category))] = {
                "recall": recall,
                "precision": np.clip(curve, 0, None).tolist(),
            }
    return curves


def _plot_pr_curves(plt, curves: dict[str, dict[str, list[float]]]):
    figure, ax = plt.subplots(figsize=(6, 5))
    for name, curve in curves.items():
        ax.plot(curve["recall"], curve["precision"], lw=1, label=f"{name} {np.mean(curve['precision']):.3f}")
    if curves and len(curves) <= 20:
        ax.legend(fontsize=7, loc="lower left")
    ax.set(
        xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="precision-recall, IoU 0.5"
    )
    ax.grid(alpha=0.3)
    return figure


def _plot_thresholds(plt, matches, categories: list[int], names: dict[int, str], threshold: float):
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key, (scores, tp, fp, positives) in f1_curves(matches, categories).items():
        precision = tp / np.maximum(tp + fp, 1)
        recall = tp / max(positives, 1)
        f1 = 2 * tp / np.maximum(tp + fp + positives, 1)
        style = {"lw": 2.5, "color": "black", "label": "all classes"} if key == "all" else {"lw": 1}
        if key != "all" and len(categories) <= 20:
            style["label"] = names.get(key, str(key))
        for ax, values in zip(axes, (precision, recall, f1)):
            ax.plot(scores, values, **style)
    for ax, name in zip(axes, ("precision", "recall", "F1")):
        ax.axvline(threshold, ls="--", color="grey")
        ax.set(xlabel="score threshold", ylabel=name, xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    return figure


def _draw_worst(evaluator, matches, errors, image_dir: Path, out: Path, threshold: float) -> list[dict]:
    """Ground truth (left; missed objects marked) beside the detections >= ``threshold`` (right;
    false alarms marked) for each image in ``errors``."""
    from PIL import Image

    from ..data.images import ImageLoadError, load_image

    images = {int(i["id"]): i for i in evaluator.ground_truth.get("images", [])}
    names = category_names(evaluator)
    by_id = {m.image_id: m for m in matches}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, error in enumerate(errors, 1):
        m, info = by_id[error["image_id"]], images.get(error["image_id"], {})
        try:
            image = load_image(image_dir / str(info.get("file_name", ""))).convert("RGB")
        except ImageLoadError:
            written.append({**error, "picture": None})
            continue
        # Small images are enlarged so that the labels stay legible.
        zoom = max(1.0, 480 / max(image.size))
        if zoom > 1:
            image = image.resize(
                (round(image.width * zoom), round(image.height * zoom)), Image.Resampling.BICUBIC
            )
        missed = m.missed(threshold)
        left = draw_boxes(
            image.copy(), _xyxy(m.gt_boxes * zoom),
            [names.get(int(c), str(c)) + (" MISSED" if x else "") for c, x in zip(m.gt_categories, missed)],
            m.gt_categories.tolist(),
        )  # fmt: skip
        keep = (m.scores > threshold) & ~m.ignored
        false = m.false_positives(threshold)[keep]
        right = draw_boxes(
            image.copy(), _xyxy(m.boxes[keep] * zoom),
            [f"{names.get(int(c), str(c))} {s:.2f}" + (" FP" if f else "")
             for c, s, f in zip(m.categories[keep], m.scores[keep], false)],
            m.categories[keep].tolist(),
        )  # fmt: skip
        canvas = Image.new("RGB", (2 * image.width + 8, image.height), (255, 255, 255))
        canvas.paste(left, (0, 0))
        canvas.paste(right, (image.width + 8, 0))
        path = out / f"{rank:02d}_image{error['image_id']}.png"
        buffer = io.BytesIO()
        canvas.save(buffer, format="PNG")
        _write_bytes(path, buffer.getvalue())
        written.append({**error, "file_name": info.get("file_name"), "picture": f"worst/{path.name}"})
    return written


def _xyxy(boxes: np.ndarray) -> list[list[float]]:
    return [[x, y, x + w, y + h] for x, y, w, h in boxes.tolist()]


def _markdown(report: dict[str, Any], pictures: list[str]) -> str:
    lines = ["# Evaluation report", ""]
    metrics = {k: v for k, v in report.get("metrics", {}).items() if "/" in k}
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {100 * v:.1f} |" for k, v in metrics.items() if v >= 0]
        lines.append("")
    if "overall" in report:
        o, t = report["overall"], report["threshold"]
        lines += [
            f"At score > {t:g} (IoU >= {report['match_iou']:g}): precision {o['precision']:.3f}, "
            f"recall {o['recall']:.3f}, F1 {o['f1']:.3f} ({o['tp']:.0f} found, {o['fn']:.0f} missed, "
            f"{o['fp']:.0f} false alarms)."
            + (
                f" F1 is highest, {o['best_f1']:.3f}, at score > {o['best_threshold']:.6g}: the "
                "`--threshold` to deploy with."
                if o["best_threshold"] is not None
                else ""
            ),
            "",
        ]
    for iou_type, rows in report["per_class"].items():
        if not rows:
            continue
        lines += [f"## Per class ({iou_type})", ""]
        columns = [c for c in rows[0] if c not in ("category_id", "isthing")]
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in rows:
            lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
        lines.append("")
    titles = {
        "confusion_matrix.png": "Confusion matrix",
        "pr_curves.png": "Precision-recall curves",
        "thresholds.png": "Precision, recall and F1 against the score threshold",
    }
    for picture in pictures:
        lines += [f"## {titles.get(picture, picture)}", "", f"![{picture}]({picture})", ""]
    worst = [w for w in report.get("worst_images", []) if w.get("picture")]
    if worst:
        lines += ["## Worst images (ground truth | detections)", ""]
        for w in worst:
            lines += [
                f"{w.get('file_name')}: {w['missed']} missed, {w['false_positives']} false alarms",
                "",
                f"![{w['picture']}]({w['picture']})",
                "",
            ]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if value < 0 or value != value else f"{value:.3f}"
    return str(value)
