"""Turn raw model outputs into per-image detections in absolute image coordinates."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert


class PostProcess(nn.Module):
    """Detection post-processing: scores/labels from the softmax without the no-object class,
    boxes converted from normalised (cx, cy, w, h) to absolute (x1, y1, x2, y2)."""

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` Tensor[B, Q, K+1], ``pred_boxes`` Tensor[B, Q, 4].
            target_sizes: Tensor[B, 2] with each image's (height, width) in the output frame,
                normally the original image size.

        Returns:
            One dict per image: ``scores`` Tensor[Q], ``labels`` Int64Tensor[Q] (contiguous class
            indices), ``boxes`` Tensor[Q, 4] absolute xyxy.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        target_sizes = torch.as_tensor(target_sizes, device=logits.device)
        if target_sizes.shape != (len(logits), 2):
            raise ValueError(
                f"target_sizes must be Tensor[B, 2] of (height, width) with B={len(logits)}, "
                f"got shape {tuple(target_sizes.shape)}"
            )
        scores, labels, xyxy = scores_labels_boxes(logits, boxes, target_sizes)
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, xyxy)]


def scores_labels_boxes(logits: Tensor, boxes: Tensor, target_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The batched core of :class:`PostProcess` (also traced into the ONNX export): per query the
    probability ``scores`` Tensor[B, Q] of the best class other than "no object", its ``labels``
    Int64Tensor[B, Q], and ``boxes`` Tensor[B, Q, 4] absolute xyxy in ``target_sizes`` [B, 2]
    (height, width)."""
    prob = logits.float().softmax(-1)
    scores, labels = prob[..., :-1].max(-1)
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy")
    img_h, img_w = target_sizes.float().unbind(1)
    scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)
    return scores, labels, xyxy * scale[:, None, :]


class PostProcessSegm(nn.Module):
    """Instance masks for the detections: mask logits upsampled to the padded input, thresholded,
    cropped to each image's own size, then resized to its original size."""

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold

    @torch.no_grad()
    def forward(
        self,
        results: list[dict[str, Tensor]],
        outputs: dict[str, Tensor],
        image_sizes: Tensor,
        orig_sizes: Tensor,
    ) -> list[dict[str, Tensor]]:
        """
        Args:
            results: the detection results of :class:`PostProcess` (updated in place and returned).
            outputs: with ``pred_masks`` Tensor[B, Q, H/4, W/4].
            image_sizes: Tensor[B, 2], each image's (height, width) in the model input, before padding.
            orig_sizes: Tensor[B, 2], the (height, width) to return masks at.

        Adds ``masks`` Bool Tensor[Q, H_orig, W_orig] to each result.
        """
        max_h, max_w = (int(v) for v in image_sizes.max(0).values)
        masks = F.interpolate(
            outputs["pred_masks"].float(), size=(max_h, max_w), mode="bilinear", align_corners=False
        )
        masks = masks.sigmoid() > self.threshold
        for result, mask, (h, w), (oh, ow) in zip(results, masks, image_sizes.tolist(), orig_sizes.tolist()):
            cropped = mask[:, :h, :w].unsqueeze(1).float()
            result["masks"] = F.interpolate(cropped, size=(oh, ow), mode="nearest")[:, 0].bool()
        return results
