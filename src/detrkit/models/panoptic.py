"""Panoptic and semantic segmentation from a DETR mask model's outputs.

``PostProcessPanoptic`` follows the original DETR (``models/segmentation.py``): queries whose most
likely class is a real class with probability above ``threshold`` (0.85) compete for each pixel
(argmax of their mask logits); several segments of one *stuff* class are merged; segments of at most
4 pixels are dropped and the pixels re-assigned, repeatedly, until none is left. Two deliberate
departures, neither of which changes a result on an unpadded image:

* mask logits are cropped to the image's own extent before being resized (the original stretches the
  padded batch's masks over the image, shifting segments of any image padded in its batch);
* segment ids start at 1, so that 0 means "void" as in COCO panoptic PNGs (the original numbers
  them from 0, which panopticapi tolerates).

The result per image is a segment-id map plus ``segments_info``, i.e. exactly COCO panoptic's
PNG + JSON (see :func:`id_to_rgb` and :func:`panoptic_to_coco`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

MIN_AREA = 4  # segments of at most this many pixels are dropped (original DETR)


def id_to_rgb(segments: np.ndarray | Tensor) -> np.ndarray:
    """Segment ids int[H, W] -> COCO panoptic colours uint8[H, W, 3] (``id = R + 256 G + 256^2 B``)."""
    ids = np.asarray(segments, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def png_bytes(segments: np.ndarray | Tensor) -> bytes:
    """A segment-id map encoded as a COCO panoptic PNG."""
    with io.BytesIO() as out:
        Image.fromarray(id_to_rgb(segments), mode="RGB").save(out, format="PNG")
        return out.getvalue()


def _resized_masks(mask_logits: Tensor, image_size: Sequence[int], padded_size: Sequence[int]) -> Tensor:
    """Mask logits Tensor[N, h/4, w/4] of the padded batch -> Tensor[N, h, w] over the image only."""
    if len(mask_logits) == 0:
        return mask_logits.new_zeros((0, *image_size), dtype=torch.float32)
    masks = F.interpolate(
        mask_logits[None].float(), size=tuple(padded_size), mode="bilinear", align_corners=False
    )
    return masks[0, :, : image_size[0], : image_size[1]]


def _source_index(n_in: int, n_out: int) -> np.ndarray:
    """The source pixel of each output pixel in PIL's NEAREST resize: it steps ``x += n_in / n_out``
    from half a step in double precision, which a closed form does not reproduce exactly."""
    steps = np.full(n_out, n_in / n_out)
    steps[0] *= 0.5
    return np.minimum(np.floor(np.cumsum(steps)), n_in - 1).astype(np.int64)


def _nearest_resize(ids: Tensor, size: Sequence[int]) -> Tensor:
    """Int Tensor[h, w] -> Tensor[H, W], pixel for pixel as the original's PIL resize of the id PNG."""
    rows = torch.from_numpy(_source_index(ids.shape[0], int(size[0]))).to(ids.device)
    cols = torch.from_numpy(_source_index(ids.shape[1], int(size[1]))).to(ids.device)
    return ids[rows][:, cols]


class PostProcessPanoptic(nn.Module):
    """Panoptic segmentation in COCO's format.

    Args:
        is_thing: one bool per contiguous class label (True for things, False for stuff).
        threshold: minimum probability of a query's (non-"no object") class for it to take part.
    """

    def __init__(self, is_thing: Sequence[bool], threshold: float = 0.85) -> None:
        super().__init__()
        self.register_buffer("is_thing", torch.as_tensor(list(is_thing), dtype=torch.bool), persistent=False)
        self.threshold = threshold

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, Tensor], image_sizes: Tensor, orig_sizes: Tensor
    ) -> list[dict[str, Any]]:
        """
        Args:
            outputs: ``pred_logits`` Tensor[B, Q, K+1], ``pred_masks`` Tensor[B, Q, H/4, W/4].
            image_sizes: Tensor[B, 2], each image's (height, width) in the model input, before padding.
            orig_sizes: Tensor[B, 2], the (height, width) to return the segmentation at.

        Returns:
            One dict per image: ``segments`` Int64 Tensor[H_orig, W_orig] (0 = void, else the id of
            a segment) and ``segments_info``, a list of ``{"id", "label", "isthing", "score",
            "area"}`` (``label`` is the contiguous class index).
        """
        logits, mask_logits = outputs["pred_logits"], outputs["pred_masks"]
        if len(self.is_thing) != logits.shape[-1] - 1:
            raise ValueError(
                f"is_thing has {len(self.is_thing)} entries but the model predicts {logits.shape[-1] - 1} classes"
            )
        padded = tuple(int(v) for v in image_sizes.max(0).values.tolist())
        prob = logits.float().softmax(-1)
        scores, labels = prob.max(-1)
        keep = (labels != logits.shape[-1] - 1) & (scores > self.threshold)
        results = []
        for b, ((h, w), orig) in enumerate(zip(image_sizes.tolist(), orig_sizes.tolist())):
            masks = _resized_masks(mask_logits[b, keep[b]], (h, w), padded).flatten(1)
            results.append(self._segment(masks, scores[b, keep[b]], labels[b, keep[b]], (h, w), orig))
        return results

    def _segment(
        self, masks: Tensor, scores: Tensor, labels: Tensor, size: Sequence[int], orig: Sequence[int]
    ) -> dict[str, Any]:
        """One image: masks Tensor[N, h*w] of the kept queries -> id map at ``orig`` + segments."""
        h, w = size
        is_thing = self.is_thing.to(labels.device)[labels]
        # Every stuff query points at the first kept query of its class; things point at themselves.
        same_stuff = (labels[:, None] == labels[None, :]) & ~is_thing[:, None] & ~is_thing[None, :]
        own = torch.arange(len(labels), device=labels.device)
        first_of_class = same_stuff.int().argmax(1) if len(labels) else own
        first_of_class = torch.where(same_stuff.any(1), first_of_class, own)
        dedup = True
        while True:
            ids = self._ids(masks, (h, w), orig, first_of_class if dedup else None)
            area = torch.bincount(ids.flatten(), minlength=len(labels) + 1)[1:]
            small = area <= MIN_AREA
            if not small.any():
                break
            # As the original: drop the small segments (incl. stuff merged into another), re-assign
            # their pixels among the rest, without merging again.
            masks, scores, labels, is_thing = masks[~small], scores[~small], labels[~small], is_thing[~small]
            dedup = False
        info = [
            {"id": i + 1, "label": int(lab), "isthing": bool(t), "score": float(s), "area": int(a)}
            for i, (lab, t, s, a) in enumerate(
                zip(labels.tolist(), is_thing.tolist(), scores.tolist(), area.tolist())
            )
        ]
        return {"segments": ids, "segments_info": info}

    @staticmethod
    def _ids(masks: Tensor, size: Sequence[int], orig: Sequence[int], canonical: Tensor | None) -> Tensor:
        """Per-pixel winning query (1-based; 0 where no query is kept), resized to ``orig``."""
        if len(masks) == 0:
            return torch.zeros(tuple(orig), dtype=torch.int64, device=masks.device)
        winner = masks.argmax(0)  # == argmax of the original's per-pixel softmax over queries
        if canonical is not None:
            winner = canonical[winner]
        return _nearest_resize((winner + 1).view(*size), orig)


def semantic_segmentation(
    outputs: dict[str, Tensor], image_sizes: Tensor, orig_sizes: Tensor
) -> list[Tensor]:
    """Per-pixel class: each query's class probabilities (without "no object") weighted by its mask
    probability, summed over queries; argmax per pixel.

    Returns one Int64 Tensor[H_orig, W_orig] of contiguous class labels per image.
    """
    prob = outputs["pred_logits"].float().softmax(-1)[..., :-1]  # [B, Q, K]
    mask_logits = outputs["pred_masks"]
    padded = tuple(int(v) for v in image_sizes.max(0).values.tolist())
    maps = []
    for b, (size, orig) in enumerate(zip(image_sizes.tolist(), orig_sizes.tolist())):
        masks = _resized_masks(mask_logits[b], size, padded).sigmoid()  # [Q, h, w]
        scores = torch.einsum("qk,qhw->khw", prob[b], masks)
        scores = F.interpolate(scores[None], size=tuple(orig), mode="bilinear", align_corners=False)[0]
        maps.append(scores.argmax(0))
    return maps


def panoptic_to_coco(
    result: dict[str, Any], image_id: int, file_name: str, category_ids: Sequence[int]
) -> dict[str, Any]:
    """A post-processed result -> a COCO panoptic annotation (``segments_info`` with the dataset's
    category ids); the PNG itself is ``png_bytes(result["segments"])`` saved as ``file_name``."""
    return {
        "image_id": int(image_id),
        "file_name": file_name,
        "segments_info": [
            {
                "id": s["id"],
                "category_id": int(category_ids[s["label"]]),
                "isthing": int(s["isthing"]),
                "area": s["area"],
                "score": s["score"],
            }
            for s in result["segments_info"]
        ],
    }
