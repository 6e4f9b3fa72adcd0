"""One evaluation pass over a dataset, and the evaluator a dataset needs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..amp import amp_autocast, outputs_to_float
from ..data.coco import CategoryMap, CocoDetection, DatasetError
from ..data.collate import Batch, SkipTracker
from ..data.panoptic import CocoPanoptic
from ..distributed import sum_over_processes
from ..fileio import read_json_file
from ..models.config import DetrConfig
from ..models.criterion import SetCriterion
from ..models.detr import unwrap
from ..models.panoptic import PostProcessPanoptic
from ..models.postprocess import PostProcess, PostProcessSegm
from .coco import CocoEvaluator
from .pq import PanopticEvaluator


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    evaluator: CocoEvaluator | PanopticEvaluator,
    device: torch.device,
    *,
    amp: str = "none",
    criterion: SetCriterion | None = None,
    progress: Callable[[], None] | None = None,
    skips: SkipTracker | None = None,
) -> dict[str, float]:
    """Run the model over ``loader``, feed ``evaluator`` with detections in original image
    coordinates (panoptic segmentations for a :class:`PanopticEvaluator`), and return its metrics,
    plus ``images`` (evaluated, over all processes), ``images_unreadable`` (of those, the images
    that could not be read: scored as images without detections) and, with ``criterion``, the
    mean validation loss ``val/loss``.

    Under DDP each process evaluates its own shard; shards may differ in length (or be empty),
    so nothing here is collective until the end."""
    model.eval()
    if getattr(model, "postprocessed", False) and (criterion is not None or evaluator.iou_types != ("bbox",)):
        raise ValueError("a post-processed (ONNX) model gives boxes only: no loss, masks or panoptic")
    postprocess = PostProcess()
    postprocess_masks = PostProcessSegm()
    panoptic = "panoptic" in evaluator.iou_types
    if panoptic:
        postprocess_panoptic = PostProcessPanoptic(unwrap(model).config.is_thing)
    loss_sum, batches = 0.0, 0
    unreadable: list[int] = []
    for batch in loader:
        unreadable.extend(s.image_id for s in batch.skipped)
        if skips is not None:
            skips.update(batch.skipped)
        if len(batch) == 0:
            continue
        batch = batch.to(device)
        orig_sizes = torch.stack([t["orig_size"] for t in batch.targets])
        image_ids = [int(t["image_id"]) for t in batch.targets]
        if getattr(model, "postprocessed", False):  # an ONNX export: its graph ends in PostProcess
            evaluator.update(image_ids, model.detect(batch.images, orig_sizes, batch.padding_mask))
            if progress is not None:
                progress()
            continue
        with amp_autocast(device, amp):
            outputs = model(batch.images, batch.padding_mask)
        if amp != "none":  # loss and post-processing in fp32 whatever the forward ran in
            outputs = outputs_to_float(outputs)
        if criterion is not None:
            # This batch's own normalisers, with no collective: the processes' shards may differ in
            # length (and a process may have no image), so per-batch collectives would not pair up.
            norm = criterion.loss_norm([batch.targets], across_processes=False)
            loss_dict = criterion(outputs, batch.targets, norm)
            weights = criterion.weight_dict
            loss_sum += float(sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights))
            batches += 1
        if panoptic:
            sizes = torch.stack([t["size"] for t in batch.targets])
            evaluator.update(image_ids, postprocess_panoptic(outputs, sizes, orig_sizes))
            if progress is not None:
                progress()
            continue
        detections = postprocess(outputs, orig_sizes)
        if "segm" in evaluator.iou_types:
            sizes = torch.stack([t["size"] for t in batch.targets])
            detections = postprocess_masks(detections, outputs, sizes, orig_sizes)
        evaluator.update(image_ids, detections)
        if progress is not None:
            progress()
    # An image that cannot be read still has its ground truth: it counts as one without detections.
    evaluator.add_unreadable(unreadable)
    evaluator.synchronize()
    metrics = evaluator.summarize()
    loss_sum, batches, missed = sum_over_processes([loss_sum, float(batches), float(len(unreadable))], device)
    metrics["images"] = float(evaluator.num_images)  # what the gathered results cover
    metrics["images_unreadable"] = missed
    if criterion is not None:
        metrics["val/loss"] = loss_sum / max(batches, 1.0)  # mean over every validation batch
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}


def build_evaluator(
    dataset: CocoDetection | CocoPanoptic, masks: bool, known_isthing: dict[int, bool] | None = None
) -> CocoEvaluator | PanopticEvaluator:
    """The evaluator of ``dataset``: PQ for a panoptic dataset, else COCO box AP (and mask AP with
    ``masks``). ``known_isthing`` (category id -> is a thing) names categories the model may
    predict that the dataset's file does not list (the dataset's own entries win)."""
    if isinstance(dataset, CocoPanoptic):
        isthing = {**(known_isthing or {}), **dataset.isthing}
        return PanopticEvaluator(isthing, dataset.ground_truth, dataset.category_map.category_ids)
    iou_types = ("bbox", "segm") if masks else ("bbox",)
    return CocoEvaluator(dataset.data, dataset.category_map, iou_types)


def annotation_categories(path) -> list[dict]:
    """The ``categories`` of a COCO annotation file (read before the dataset, whose label space
    they decide); a file that is not a COCO JSON object is refused naming it."""
    # A reader of another format has built the dict already.
    data = (
        path if isinstance(path, dict) else read_json_file(path, error=DatasetError, what="annotation file")
    )
    categories = data.get("categories", []) if isinstance(data, dict) else None
    if not isinstance(categories, list) or not all(isinstance(c, dict) and "id" in c for c in categories):
        where = getattr(path, "source", path)
        raise DatasetError(
            f"{where}: expected a JSON object whose 'categories' is a list of {{'id', 'name'}}"
        )
    return categories


def name_clashes(category_map: CategoryMap, dataset_categories: list[dict]) -> list[str]:
    """The category ids that the model and the dataset name differently (``"3: 'cat' / 'dog'"``):
    scores would be computed, but against other classes than the model's names say."""
    names = {int(c["id"]): c.get("name") for c in dataset_categories}
    return [
        f"{i}: {n!r} / {names[i]!r}"
        for i, n in zip(category_map.category_ids, category_map.names)
        if i in names and names[i] is not None and names[i] != n
    ]


def model_category_map(config: DetrConfig, dataset_categories: list[dict]) -> CategoryMap:
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


def open_detection_split(
    config: DetrConfig, root, split: str, data_format: str = "auto", transforms=None, *, masks: bool = False
) -> tuple[CocoDetection, list[dict], CategoryMap, str]:
    """A split of a detection dataset (any format ``open_split`` reads) in the label space of a
    model of ``config``, with ``transforms`` (default: the model's evaluation resize): the dataset,
    the file's categories, the model's category map, and where the annotations came from."""
    from ..data.formats import open_split
    from ..data.transforms import TransformConfig, eval_transforms

    if transforms is None:
        transforms = eval_transforms(TransformConfig.scaled(config.image_scale))
    opened = open_split(root, split, data_format)
    categories = annotation_categories(opened.annotations)
    cmap = model_category_map(config, categories)
    dataset = CocoDetection(opened.images, opened.annotations, transforms, category_map=cmap, masks=masks)
    return dataset, categories, cmap, opened.source


def box_metrics(
    model,
    dataset: CocoDetection,
    *,
    batch_size: int = 2,
    amp: str = "none",
    device: torch.device | None = None,
) -> dict[str, float]:
    """COCO box AP of ``model`` (a :class:`Detr` on ``device``, default the CPU, or an ONNX export)
    on ``dataset``."""
    from torch.utils.data import DataLoader

    from ..data.collate import collate

    evaluator = CocoEvaluator(dataset.data, dataset.category_map, ("bbox",))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    return evaluate(model, loader, evaluator, device or torch.device("cpu"), amp=amp)
