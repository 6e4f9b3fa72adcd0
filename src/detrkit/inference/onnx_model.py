"""An ONNX file written by ``detrkit export`` (with its post-processing), run by onnxruntime in the
place of a PyTorch model inside :class:`~detrkit.inference.detector.Detector`: the same API
(``predict``, thresholds, batching, every input type) for a deployment that ships the ONNX file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CheckpointError, MissingExtra
from ..models.config import DetrConfig


class OnnxDetr:
    """A post-processed detrkit ONNX export: ``detect(images, orig_sizes)`` gives per image the
    boxes (original pixels), scores and contiguous labels that ``PostProcess`` would, and for a
    mask model the instance masks ``PostProcessSegm`` would."""

    postprocessed = True

    def __init__(self, path: str | os.PathLike) -> None:
        try:
            import onnxruntime
        except ImportError as e:
            raise MissingExtra("running an ONNX file", "onnx", e) from e
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        try:
            self.runtime = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors name no type worth keeping
            raise CheckpointError(
                f"{self.path}: not an ONNX model onnxruntime can run ({str(e)[:200]})"
            ) from None
        inputs = [i.name for i in self.runtime.get_inputs()]
        meta = self.runtime.get_modelmeta().custom_metadata_map
        if inputs != ["images", "padding_mask", "orig_sizes"] or "category_ids" not in meta:
            raise CheckpointError(
                f"{self.path}: not a detrkit export with post-processing (export it again without --raw)"
            )
        ids = [int(i) for i in json.loads(meta["category_ids"])]
        names = [str(n) for n in json.loads(meta["class_names"])]
        # Files of the first exports name the sizes only: the scale is the evaluation size over 800.
        scale = float(meta.get("image_scale", int(meta["eval_size"]) / 800))
        outputs = {o.name: o for o in self.runtime.get_outputs()}
        queries = outputs["scores"].shape[1]  # static in the graph; older files: the metadata
        self.config = DetrConfig(
            num_classes=len(ids),
            class_names=tuple(names),
            category_ids=tuple(ids),
            num_queries=int(meta.get("num_queries", queries if isinstance(queries, int) else 100)),
            masks="masks" in outputs,
            extra={"image_scale": scale},
        )
        self._label_of = {category: label for label, category in enumerate(ids)}

    def to(self, device) -> OnnxDetr:
        return self  # onnxruntime's CPU provider: inputs are moved to the CPU when run

    def eval(self) -> OnnxDetr:
        return self

    def detect(
        self, images: Tensor, orig_sizes: Tensor, padding_mask: Tensor | None = None
    ) -> list[dict[str, Tensor]]:
        """``images`` Float[B, 3, H, W], ``orig_sizes`` Int[B, 2] (each image's original height,
        width), ``padding_mask`` Bool[B, H, W] (True on padding; None: no padding)."""
        batch = images.detach().float().cpu().numpy()
        if padding_mask is None:
            mask = np.zeros((batch.shape[0], *batch.shape[2:]), dtype=bool)
        else:
            mask = padding_mask.detach().cpu().numpy().astype(bool)
        sizes = orig_sizes.detach().cpu().numpy().astype(np.int64)
        boxes, scores, labels, *masks = self.runtime.run(
            None, {"images": batch, "padding_mask": mask, "orig_sizes": sizes}
        )
        to_label = np.vectorize(self._label_of.__getitem__, otypes=[np.int64])
        results = [
            {
                "boxes": torch.from_numpy(b),
                "scores": torch.from_numpy(s),
                "labels": torch.from_numpy(to_label(ls)),
            }
            for b, s, ls in zip(boxes, scores, labels)
        ]
        if masks:
            for result, image_masks, valid, (height, width) in zip(results, masks[0], ~mask, sizes.tolist()):
                # As PostProcessSegm: cropped to the unpadded image, resized to the original.
                h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
                cropped = torch.from_numpy(image_masks[:, :h, :w]).unsqueeze(1).float()
                result["masks"] = F.interpolate(cropped, size=(height, width), mode="nearest")[:, 0].bool()
        return results

    def __repr__(self) -> str:
        return f"OnnxDetr({self.path.name})"
