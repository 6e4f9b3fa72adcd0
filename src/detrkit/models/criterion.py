"""DETR's set criterion: Hungarian matching, then classification, box and mask losses per match."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from ..distributed import all_reduce_mean
from .config import DetrConfig
from .matcher import HungarianMatcher, build_matcher

Indices = list[tuple[Tensor, Tensor]]


def sigmoid_focal_loss(
    inputs: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2
):
    """RetinaNet's focal loss, averaged over pixels and summed over masks, divided by ``num_boxes``.

    inputs, targets: Tensor[N, P] (mask logits and binary targets over P pixels).
    """
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def dice_loss(inputs: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """1 - Dice coefficient (a GIoU for masks), summed over masks and divided by ``num_boxes``.

    inputs, targets: Tensor[N, P].
    """
    inputs = inputs.sigmoid()
    numerator = 2 * (inputs * targets).sum(1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


@dataclass(frozen=True)
class LossNorm:
    """What the losses of one optimizer step are divided by, so that a step accumulated over
    several micro-batches equals one step on their union (exactly for the class and box losses;
    the mask losses also depend on each batch's padding, as in any batching).

    Attributes:
        num_boxes: target boxes of the whole step, averaged over processes (at least 1); divides
            the box and mask losses, as in the original.
        image_box_counts: target boxes of each image of the step on this process; the no-object
            weighted cross-entropy is normalised by the summed class weights of all of them (a
            per-process mean, as the original's ``F.cross_entropy`` over one batch).
    """

    num_boxes: float
    image_box_counts: tuple[int, ...]

    def class_weight(self, num_queries: int, eos_coef: float, groups: int = 1) -> float:
        """Sum of the cross-entropy weights of every query of the step: matched queries weigh 1,
        the others ``eos_coef`` (the Hungarian matching pairs ``min(num_queries, n)`` queries in
        each of the ``groups`` groups of ``num_queries``)."""
        matched = groups * sum(min(num_queries, n) for n in self.image_box_counts)
        return matched + eos_coef * (groups * num_queries * len(self.image_box_counts) - matched)


def _pad_masks(masks: list[Tensor]) -> Tensor:
    """Stack Bool Tensor[N_i, H_i, W_i] into Tensor[sum N_i, H, W], zero-padded bottom/right."""
    height = max(m.shape[-2] for m in masks)
    width = max(m.shape[-1] for m in masks)
    return torch.cat([F.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in masks])


def src_permutation_idx(indices: Indices) -> tuple[Tensor, Tensor]:
    """(batch index, query index) of every matched prediction, for advanced indexing."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch_idx, torch.cat([src for src, _ in indices])


def tgt_permutation_idx(indices: Indices) -> tuple[Tensor, Tensor]:
    """(batch index, target index) of every matched target, in the order of :func:`src_permutation_idx`."""
    batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
    return batch_idx, torch.cat([tgt for _, tgt in indices])


def check_targets(outputs: dict, targets: list[dict[str, Tensor]], num_classes: int, masks: bool) -> None:
    """Refuse targets that do not fit the batch (count, keys, shapes, label range), naming the
    target; ``masks``: a mask model, whose targets need ``masks``."""
    batch = outputs["pred_logits"].shape[0]
    if len(targets) != batch:
        raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
    for i, t in enumerate(targets):
        labels, boxes = t.get("labels"), t.get("boxes")
        if labels is None or boxes is None:
            raise ValueError(f"target {i}: needs 'labels' and 'boxes', got keys {sorted(t)}")
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or len(boxes) != len(labels):
            raise ValueError(
                f"target {i}: expected boxes Tensor[N, 4] and labels Tensor[N], "
                f"got {tuple(boxes.shape)} and {tuple(labels.shape)}"
            )
        if masks and "masks" not in t:
            raise ValueError(f"target {i}: a mask model needs 'masks' Bool Tensor[N, H, W]")
    # One host read for the whole batch (on a GPU each read waits for the device).
    labels = torch.cat([t["labels"] for t in targets]) if targets else torch.empty(0)
    if len(labels):
        low, high = labels.aminmax()
        if bool((low < 0) | (high >= num_classes)):
            i = next(
                i for i, t in enumerate(targets)
                if len(t["labels"]) and (t["labels"].min() < 0 or t["labels"].max() >= num_classes)
            )  # fmt: skip
            raise ValueError(
                f"target {i}: labels must be in [0, {num_classes - 1}], got {targets[i]['labels'].tolist()}"
            )


class SetCriterion(nn.Module):
    """Computes DETR's losses.

    ``criterion(outputs, targets)`` returns the *unweighted* losses, named as in the original:
    ``loss_ce``, ``class_error`` (logging only), ``loss_bbox``, ``loss_giou``, ``cardinality_error``
    (logging only), ``loss_mask`` and ``loss_dice`` (mask models), each with a ``_{i}`` copy for
    auxiliary decoder layer ``i``. ``criterion.weight_dict`` holds the weights; the training loss is
    ``sum(losses[k] * weight_dict[k] for k in losses if k in weight_dict)``.

    Args:
        num_classes: number of real classes (the no-object class is index ``num_classes``).
        matcher: the Hungarian matcher.
        weight_dict: loss name -> weight.
        eos_coef: weight of the no-object class in the cross-entropy.
        losses: which losses to compute among ``labels``, ``cardinality``, ``boxes``, ``masks``.
        num_queries: the model's own number of queries. Outputs with ``G`` times as many come from
            training-only query groups (Group DETR, :mod:`detrkit.training.aids`): each group is matched on
            its own and the losses are the mean over groups (box count times ``G``, as the Group
            DETR code normalises); ``cardinality_error`` is the model's own group's.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        eos_coef: float = 0.1,
        losses: tuple[str, ...] = ("labels", "boxes", "cardinality"),
        num_queries: int | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = tuple(losses)
        unknown = set(self.losses) - {"labels", "boxes", "cardinality", "masks"}
        if unknown:
            raise ValueError(
                f"unknown loss(es) {sorted(unknown)}: choose from labels, boxes, cardinality, masks"
            )
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    # --- individual losses ----------------------------------------------------------------------
    def loss_labels(
        self, outputs, targets, indices: Indices, num_boxes: float, log: bool = True, class_weight=None
    ):
        """Cross-entropy over K+1 classes; unmatched queries are supervised as "no object".

        The weighted mean over queries (the original's) unless ``class_weight`` gives the divisor.
        """
        src_logits = outputs["pred_logits"].float()
        idx = src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(
            src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=src_logits.device
        )
        target_classes[idx] = target_classes_o
        if class_weight is None:
            loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)
        else:
            loss_ce = (
                F.cross_entropy(
                    src_logits.transpose(1, 2), target_classes, self.empty_weight, reduction="sum"
                )
                / class_weight
            )
        losses = {"loss_ce": loss_ce}
        if log:
            # Top-1 error (in %) of the matched queries, for logging only.
            matched = src_logits[idx]
            if len(target_classes_o):
                accuracy = (matched.argmax(-1) == target_classes_o).float().mean() * 100
            else:
                accuracy = torch.zeros((), device=src_logits.device)
            losses["class_error"] = 100 - accuracy
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices: Indices, num_boxes: float):
        """Absolute error of the number of predicted objects (not "no object") of the model's own
        queries (the first group); logging only."""
        logits = outputs["pred_logits"][:, : self.num_queries]
        target_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), target_lengths.float())}

    def loss_boxes(self, outputs, targets, indices: Indices, num_boxes: float):
        """L1 and GIoU losses of the matched boxes (normalised cxcywh)."""
        idx = src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx].float()
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        loss_giou = 1 - torch.diag(
            generalized_box_iou(
                box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")
            )
        )
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def loss_masks(self, outputs, targets, indices: Indices, num_boxes: float):
        """Focal and Dice losses of the matched masks, predictions upsampled to the padded target size."""
        src_masks = outputs["pred_masks"]
        src_idx = src_permutation_idx(indices)
        if len(src_idx[0]) == 0:
            zero = src_masks.sum() * 0.0  # keeps the graph connected for DDP
            return {"loss_mask": zero, "loss_dice": zero}
        tgt_idx = tgt_permutation_idx(indices)
        # Pad every image's masks to the batch's largest mask size, as the images were padded.
        per_image = [t["masks"] for t in targets]
        padded = _pad_masks(per_image)
        offsets = torch.tensor([0] + [len(m) for m in per_image], device=padded.device).cumsum(0)[:-1]
        target_masks = padded[offsets[tgt_idx[0].to(padded.device)] + tgt_idx[1].to(padded.device)]
        src = F.interpolate(
            src_masks[src_idx][:, None].float(),
            size=target_masks.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        src = src[:, 0].flatten(1)
        target = target_masks.flatten(1).to(src)
        return {
            "loss_mask": sigmoid_focal_loss(src, target, num_boxes),
            "loss_dice": dice_loss(src, target, num_boxes),
        }

    def get_loss(self, loss: str, outputs, targets, indices: Indices, num_boxes: float, **kwargs):
        loss_map = {
            "labels": self.loss_labels,
            "cardinality": self.loss_cardinality,
            "boxes": self.loss_boxes,
            "masks": self.loss_masks,
        }
        return loss_map[loss](outputs, targets, indices, num_boxes, **kwargs)

    @staticmethod
    def loss_norm(
        step_targets: Sequence[Sequence[dict[str, Tensor]]],
        *,
        across_processes: bool = True,
        device: torch.device | None = None,
    ) -> LossNorm:
        """The :class:`LossNorm` of a step made of the micro-batches ``step_targets`` (a list of
        per-batch target lists). ``across_processes``: average the box count over processes (a
        collective every process must join, on ``device``, by default the labels'); off for
        evaluation, where shards differ in length."""
        labels = [t["labels"] for targets in step_targets for t in targets]
        counts = tuple(len(x) for x in labels)
        if device is None:
            device = labels[0].device if labels else torch.device("cpu")
        num_boxes = torch.tensor([float(sum(counts))], device=device)
        if across_processes:
            num_boxes = all_reduce_mean(num_boxes)
        return LossNorm(num_boxes=max(float(num_boxes.item()), 1.0), image_box_counts=counts)

    def forward(
        self, outputs: dict, targets: list[dict[str, Tensor]], norm: LossNorm | None = None
    ) -> dict[str, Tensor]:
        """
        Args:
            outputs: the model's output dict.
            targets: one dict per image: ``labels`` Int64Tensor[N], ``boxes`` Tensor[N, 4] normalised
                cxcywh, and ``masks`` Bool Tensor[N, H, W] for mask models.
            norm: the normalisers of the whole optimizer step when this batch is one micro-batch of
                several (gradient accumulation); by default this batch alone, with the box count
                averaged over processes (every process must call the criterion then).
        """
        check_targets(outputs, targets, self.num_classes, "masks" in self.losses)
        groups = self._groups(outputs["pred_logits"].shape[1])
        outputs_without_aux = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(outputs_without_aux, targets, groups)

        class_weight = None
        if norm is None:
            norm = self.loss_norm([targets])
        else:
            per_group = outputs["pred_logits"].shape[1] // groups
            class_weight = norm.class_weight(per_group, self.eos_coef, groups)
        num_boxes = norm.num_boxes * groups

        losses: dict[str, Tensor] = {}
        for loss in self.losses:
            kwargs = {"class_weight": class_weight} if loss == "labels" else {}
            losses.update(self.get_loss(loss, outputs, targets, indices, num_boxes, **kwargs))

        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            indices = self.matcher(aux_outputs, targets, groups)
            for loss in self.losses:
                if loss == "masks":
                    continue  # intermediate masks are too costly to compute
                kwargs = {"log": False, "class_weight": class_weight} if loss == "labels" else {}
                l_dict = self.get_loss(loss, aux_outputs, targets, indices, num_boxes, **kwargs)
                losses.update({f"{k}_{i}": v for k, v in l_dict.items()})
        if "denoising" in outputs:
            losses.update(self.denoising_losses(outputs["denoising"], targets, norm.num_boxes))
        return losses

    def denoising_losses(self, denoising: dict, targets: list[dict[str, Tensor]], num_boxes: float):
        """The losses of training-only denoising queries (:mod:`detrkit.training.aids`), whose targets are known
        (``denoising["indices"]``, no matching): ``loss_ce_dn`` (cross-entropy over the K+1 classes
        against the true label), ``loss_bbox_dn`` and ``loss_giou_dn``, each summed over the
        ``denoising["groups"]`` copies and divided by their box count, and a ``_{i}`` copy per
        auxiliary decoder layer. Weighted as the matched losses (:meth:`add_denoising_weights`)."""
        indices = denoising["indices"]
        num_boxes = num_boxes * denoising["groups"]
        idx = src_permutation_idx(indices)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        losses = {}
        layers = [("", denoising)] + [(f"_{i}", a) for i, a in enumerate(denoising.get("aux_outputs", []))]
        for suffix, out in layers:
            logits = out["pred_logits"][idx].float()
            losses[f"loss_ce_dn{suffix}"] = (
                F.cross_entropy(logits, labels.to(logits.device), reduction="sum") / num_boxes
            )
            boxes = self.loss_boxes(out, targets, indices, num_boxes)
            losses[f"loss_bbox_dn{suffix}"] = boxes["loss_bbox"]
            losses[f"loss_giou_dn{suffix}"] = boxes["loss_giou"]
        return losses

    def add_denoising_weights(self) -> None:
        """Weigh the denoising losses as their matched counterparts: ``loss_ce_dn`` as ``loss_ce``,
        ``loss_bbox_dn_0`` as ``loss_bbox_0``, and so on."""
        for key, value in list(self.weight_dict.items()):
            for loss in ("loss_ce", "loss_bbox", "loss_giou"):
                layer = key[len(loss) :]
                if key.startswith(loss) and (layer == "" or layer[1:].isdigit()):
                    self.weight_dict[f"{loss}_dn{layer}"] = value

    def _groups(self, num_outputs: int) -> int:
        """How many query groups ``num_outputs`` queries are (1 unless training with query groups)."""
        if self.num_queries is None or num_outputs == self.num_queries:
            return 1
        if num_outputs % self.num_queries:
            raise ValueError(
                f"{num_outputs} predictions per image: neither the model's {self.num_queries} queries "
                "nor a whole number of groups of them"
            )
        return num_outputs // self.num_queries


def build_criterion(config: DetrConfig) -> SetCriterion:
    """The criterion that matches a model built from ``config``."""
    weight_dict = {"loss_ce": 1.0, "loss_bbox": config.bbox_loss_coef, "loss_giou": config.giou_loss_coef}
    losses = ["labels", "boxes", "cardinality"]
    if config.masks:
        weight_dict["loss_mask"] = config.mask_loss_coef
        weight_dict["loss_dice"] = config.dice_loss_coef
        losses.append("masks")
    if config.aux_loss:
        aux = {}
        for i in range(config.dec_layers - 1):
            aux.update({f"{k}_{i}": v for k, v in weight_dict.items() if k not in ("loss_mask", "loss_dice")})
        weight_dict.update(aux)
    return SetCriterion(
        config.num_classes,
        build_matcher(config),
        weight_dict,
        eos_coef=config.eos_coef,
        losses=tuple(losses),
        num_queries=config.num_queries,
    )
