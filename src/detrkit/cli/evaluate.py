"""``detrkit eval``: COCO AP (or PQ) of any checkpoint on a COCO-format dataset."""

from __future__ import annotations

import argparse
import sys

from .args import (
    add_data_format,
    add_precision,
    bounded,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="COCO AP of a checkpoint on a COCO-format dataset")
    p.add_argument(
        "--weights",
        required=True,
        help="any checkpoint load_model reads, an official name, or an ONNX export",
    )
    p.add_argument("--data", required=True, help='dataset root, an instances JSON, or "synthetic"')
    p.add_argument("--split", default="val2017")
    add_data_format(p, "--data")
    p.add_argument(
        "--panoptic", action="store_true", help="PQ on COCO panoptic annotations (panoptic models)"
    )
    p.add_argument("--out", default=None, help="folder for results.json and metrics.json")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier eval in --out")
    p.add_argument(
        "--report", default=None, metavar="DIR",
        help="write a report to DIR: per-class AP, precision/recall/F1 and the best threshold, a confusion "
        "matrix, precision-recall curves, the worst images (report.md ties them together)",
    )  # fmt: skip
    p.add_argument(
        "--threshold", type=probability, default=0.5,
        help="score threshold of the report's precision/recall/F1, confusion matrix and worst images",
    )  # fmt: skip
    p.add_argument(
        "--max-dets", type=bounded(int, 10, None, "maxDets"), default=100,
        help="COCO's maxDets (at least 10): detections per image and class that AP and the AR100 column "
        "count (dense scenes: raise it, with a model of as many queries)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=positive_int, default=2)
    p.add_argument(
        "--image-scale", type=positive_float, default=None, help="default: what the model was trained with"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=non_negative_int, default=2)
    add_precision(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from torch.utils.data import DataLoader

    from ..data.coco import DatasetError
    from ..data.collate import SkipTracker, collate
    from ..data.layout import resolve_panoptic
    from ..data.panoptic import CocoPanoptic
    from ..data.transforms import TransformConfig, eval_transforms
    from ..distributed import pick_device
    from ..evaluation.coco import CocoEvaluator, format_metrics, per_class_ap, queries_warning
    from ..evaluation.loop import (
        annotation_categories,
        build_evaluator,
        evaluate,
        model_category_map,
        name_clashes,
        open_detection_split,
    )
    from ..fileio import check_output, write_json_atomic
    from ..inference.detector import load_for_inference, model_precision

    if args.out is not None:
        # Checked before the evaluation: its results must have somewhere to go, and replace nothing
        # unasked (the folder may hold the synthetic dataset an earlier eval wrote there).
        check_output(
            args.out, option="--out", kind="dir", inputs=[args.weights], overwrite=args.overwrite,
            replaceable=lambda p: not any((p / name).exists() for name in ("results.json", "metrics.json")),
        )  # fmt: skip
    if args.report is not None:
        check_output(
            args.report, option="--report", kind="dir", inputs=[args.weights], overwrite=args.overwrite,
            replaceable=lambda p: not (p / "report.json").exists(),
        )  # fmt: skip
    model = load_for_inference(args.weights)
    device = pick_device(args.device)
    model.to(device)
    root, split = Path(args.data), args.split
    if args.data == "synthetic":
        root, split = _synthetic_split(model.config, Path(args.out or args.report or "runs/eval"), args.split)
    scale = args.image_scale or model.config.image_scale
    transforms = eval_transforms(TransformConfig.scaled(scale))
    if args.panoptic:
        if not model.config.masks:
            raise DatasetError(f"{args.weights}: PQ needs a panoptic model (with a mask head)")
        ann, images, pngs = resolve_panoptic(root, split)
        categories = annotation_categories(ann)
        cmap = model_category_map(model.config, categories)
        dataset = CocoPanoptic(images, ann, pngs, transforms, category_map=cmap)
    else:
        data_format = "coco" if args.data == "synthetic" else args.data_format
        dataset, categories, cmap, ann = open_detection_split(
            model.config, root, split, data_format, transforms, masks=model.config.masks
        )
    clashes = name_clashes(cmap, categories)
    if clashes:
        print(
            f"WARNING: the model and {ann} name {len(clashes)} category id(s) differently (model / dataset): "
            + ", ".join(clashes[:5])
            + (" ..." if len(clashes) > 5 else ""),
            file=sys.stderr,
        )
    # The model may predict categories the file does not list: take theirs from the model.
    known = dict(zip(model.config.label_ids, model.config.is_thing))
    evaluator = build_evaluator(dataset, model.config.masks, known_isthing=known)
    if isinstance(evaluator, CocoEvaluator):
        evaluator.max_dets = args.max_dets
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers)
    skips = SkipTracker(warn=lambda msg: print(msg, file=sys.stderr))
    precision = model_precision(model, args.precision, device)
    amp = "none" if precision == "fp32" else precision
    metrics = evaluate(model, loader, evaluator, device, skips=skips, amp=amp)
    metrics.update(per_class_ap(evaluator))  # as training logs them
    images, unreadable = int(metrics["images"]), int(metrics["images_unreadable"])
    if images and unreadable == images:
        raise DatasetError(f"none of the {images} images of {ann} could be read from {dataset.image_dir}")
    print(f"{args.weights} on {ann} ({images} images, {precision}):")
    if unreadable:
        print(
            f"WARNING: {unreadable} of {images} images could not be read; they count as images "
            "without detections (their objects are missed)",
            file=sys.stderr,
        )
    print(format_metrics(metrics))
    dense = queries_warning(evaluator, model.config.num_queries)
    if dense:
        print(dense, file=sys.stderr)
    if args.report:
        evaluator.report(args.report, threshold=args.threshold, image_dir=dataset.image_dir, metrics=metrics)
        print(f"wrote the report to {Path(args.report) / 'report.md'}")
    if args.out:
        out = Path(args.out)
        write_json_atomic(out / "metrics.json", metrics)
        if isinstance(evaluator, CocoEvaluator):
            evaluator.write_results(out / "results.json")
            print(f"wrote {out / 'results.json'} and {out / 'metrics.json'}")
        else:
            print(f"wrote {out / 'metrics.json'}")
    return 0


def _synthetic_split(config, parent, split: str):
    """The synthetic dataset's root and split for a model (its class set: a model fine-tuned on the
    "other" shapes is evaluated on those), written under ``parent`` when not there yet."""
    from ..data.synthetic import SynthConfig, ensure_synthetic, shape_set_for, synthetic_root

    shapes = shape_set_for(config.class_names or (), config.category_ids or ())
    root = synthetic_root(parent, shapes)
    split = f"{split.removesuffix('2017')}2017"  # the generator's names: train2017, val2017
    ensure_synthetic(root, SynthConfig(images=64, shapes=shapes), {split.removesuffix("2017"): 16})
    return root, split
