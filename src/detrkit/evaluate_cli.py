"""``detrkit eval``: COCO metrics of any checkpoint on a COCO-format dataset."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch.utils.data import DataLoader

from .checkpoints import load_model
from .data.coco import CategoryMap, CocoDetection, CocoPanoptic, DatasetError
from .data.collate import SkipTracker, collate
from .data.layout import resolve_panoptic, resolve_split
from .data.transforms import TransformConfig, eval_transforms
from .distributed import pick_device
from .engine import evaluate
from .evaluation import CocoEvaluator, format_metrics
from .fileio import write_json_atomic
from .pq import PanopticEvaluator


def model_category_map(config, dataset_categories: list[dict]) -> CategoryMap:
    """The label space a model predicts in, as dataset category ids."""
    if config.category_ids is not None:
        names = config.class_names or tuple(str(i) for i in config.category_ids)
        return CategoryMap(tuple(config.category_ids), tuple(names))
    ids = sorted(int(c["id"]) for c in dataset_categories)
    if ids and max(ids) < config.num_classes:
        # The original DETR convention (COCO's 91 ids): label = category id.
        names = config.class_names or tuple(str(i) for i in range(config.num_classes))
        return CategoryMap(tuple(range(config.num_classes)), tuple(names))
    if len(ids) == config.num_classes:
        return CategoryMap.from_categories(dataset_categories)
    raise DatasetError(
        f"the model predicts {config.num_classes} classes without saying which dataset ids they are, "
        f"and the dataset has {len(ids)} categories (ids {ids[:10]}...)"
    )


def run_eval(args: argparse.Namespace) -> int:
    model = load_model(args.weights)
    device = pick_device(args.device)
    model.to(device)
    root = Path(args.data)
    split = args.split
    if args.data == "synthetic":
        from .data.synthetic import SHAPE_SETS, SynthConfig, write_synthetic

        # The class set the model was trained on (a model fine-tuned on the "other" shapes is
        # evaluated on those), by class names, else category ids; the basic set if neither tells.
        names, ids = set(model.config.class_names or ()), set(model.config.category_ids or ())

        def overlap(key: str) -> tuple[int, bool]:
            shapes = SHAPE_SETS[key]
            return len(names & set(shapes.values())) + len(ids & set(shapes)), key == "basic"

        shapes = max(SHAPE_SETS, key=overlap)
        root = Path(args.out or "runs/eval") / (
            "synthetic-data" if shapes == "basic" else f"synthetic-{shapes}"
        )
        split = f"{args.split.removesuffix('2017')}2017"  # the generator's names: train2017, val2017
        if not (root / "annotations" / f"instances_{split}.json").exists():
            config = SynthConfig(images=64, shapes=shapes)
            write_synthetic(root, config, {split.removesuffix("2017"): 16})
    scale = args.image_scale or float(model.config.extra.get("image_scale", 1.0))
    transforms = eval_transforms(TransformConfig.scaled(scale))
    if args.panoptic:
        if not model.config.masks:
            raise DatasetError(f"{args.weights}: PQ needs a panoptic model (with a mask head)")
        ann, images, pngs = resolve_panoptic(root, split)
        categories = json.loads(ann.read_text()).get("categories", [])
        cmap = model_category_map(model.config, categories)
        dataset = CocoPanoptic(images, ann, pngs, transforms, category_map=cmap)
        # The model may predict categories the file does not list: take theirs from the model.
        isthing = {**dict(zip(model.config.label_ids, model.config.is_thing)), **dataset.isthing}
        evaluator = PanopticEvaluator(isthing, dataset.ground_truth, cmap.category_ids)
    else:
        ann, images = resolve_split(root, split)
        categories = json.loads(ann.read_text()).get("categories", [])
        cmap = model_category_map(model.config, categories)
        dataset = CocoDetection(images, ann, transforms, category_map=cmap, masks=model.config.masks)
        iou_types = ("bbox", "segm") if model.config.masks else ("bbox",)
        evaluator = CocoEvaluator(dataset.data, cmap, iou_types)
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers)
    skips = SkipTracker(warn=lambda msg: print(msg, file=sys.stderr))
    metrics = evaluate(model, loader, evaluator, device, skips=skips)
    images, unreadable = int(metrics["images"]), int(metrics["images_unreadable"])
    if images and unreadable == images:
        raise DatasetError(f"none of the {images} images of {ann} could be read from {dataset.image_dir}")
    print(f"{args.weights} on {ann} ({images} images):")
    if unreadable:
        print(
            f"WARNING: {unreadable} of {images} images could not be read; they count as images "
            "without detections (their objects are missed)",
            file=sys.stderr,
        )
    print(format_metrics(metrics))
    if args.out:
        out = Path(args.out)
        write_json_atomic(out / "metrics.json", metrics)
        if isinstance(evaluator, CocoEvaluator):
            evaluator.write_results(out / "results.json")
            print(f"wrote {out / 'results.json'} and {out / 'metrics.json'}")
        else:
            print(f"wrote {out / 'metrics.json'}")
    return 0
