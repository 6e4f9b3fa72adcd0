"""``Detector``: load a checkpoint, give it images, get detections in original pixels and ids.

>>> detector = detrkit.Detector.from_pretrained("runs/demo/checkpoint_best.pth")
>>> [result] = detector.predict("street.jpg", threshold=0.7)
>>> result.boxes, result.scores, result.names
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from ..amp import amp_autocast, outputs_to_float, resolve_amp
from ..checkpoints.io import load_model
from ..data.collate import pad_images
from ..data.images import load_image, to_rgb
from ..data.transforms import TransformConfig, resized_shape
from ..distributed import pick_device
from ..errors import ConfigError
from ..models.detr import Detr
from ..models.fold import fold_batchnorm
from ..models.panoptic import PostProcessPanoptic, semantic_segmentation
from ..models.postprocess import PostProcess, PostProcessSegm

ImageInput = str | os.PathLike | Image.Image | np.ndarray | Tensor


@dataclass
class Detections:
    """The detections of one image, above the threshold, highest score first.

    ``boxes`` Tensor[N, 4] absolute (x1, y1, x2, y2) in the original image; ``scores`` Tensor[N];
    ``labels`` Int64Tensor[N] as the dataset's category ids; ``names`` their class names;
    ``masks`` Bool Tensor[N, H, W] for instance segmentation. Panoptic segmentation gives
    ``segments`` Int64 Tensor[H, W] (0 = void, else a segment id) with ``segments_info`` (``id``,
    ``category_id``, ``name``, ``isthing``, ``score``, ``area`` per segment), i.e. COCO panoptic's
    PNG + JSON; semantic segmentation gives ``semantic`` Int64 Tensor[H, W] of category ids.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    masks: Tensor | None = None
    segments: Tensor | None = None
    segments_info: list[dict[str, Any]] | None = None
    semantic: Tensor | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready boxes, scores, labels and names (+ ``segments_info`` for panoptic results)."""
        out: dict[str, Any] = {
            "boxes": self.boxes.tolist(),
            "scores": self.scores.tolist(),
            "labels": self.labels.tolist(),
            "names": list(self.names),
        }
        if self.segments_info is not None:
            out["segments_info"] = self.segments_info
        return out

    def to_supervision(self) -> Any:
        """These detections as ``supervision.Detections`` (``xyxy``, ``confidence``, ``class_id``
        = the category ids, ``mask`` for instance masks, and the names as ``data["class_name"]``)."""
        sv = _supervision()
        return sv.Detections(
            xyxy=self.boxes.detach().cpu().numpy().astype(np.float32).reshape(-1, 4),
            confidence=self.scores.detach().cpu().numpy().astype(np.float32),
            class_id=self.labels.detach().cpu().numpy().astype(int),
            mask=self.masks.detach().cpu().numpy().astype(bool) if self.masks is not None else None,
            data={"class_name": np.array(list(self.names), dtype=str)},
        )

    @classmethod
    def from_supervision(cls, detections: Any, class_names: Sequence[str] | None = None) -> Detections:
        """``supervision.Detections`` as :class:`Detections`, highest score first. Names come from
        ``data["class_name"]``, else ``class_names[class_id]``, else the id itself."""
        count = len(detections)
        scores = detections.confidence if detections.confidence is not None else np.ones(count)
        ids = detections.class_id if detections.class_id is not None else np.zeros(count, dtype=int)
        if "class_name" in getattr(detections, "data", {}):
            names = [str(n) for n in detections.data["class_name"]]
        else:
            names = [class_names[i] if class_names is not None else str(i) for i in ids.tolist()]
        order = np.argsort(-np.asarray(scores), kind="stable")
        return cls(
            boxes=torch.as_tensor(np.asarray(detections.xyxy, dtype=np.float32)[order]).reshape(-1, 4),
            scores=torch.as_tensor(np.asarray(scores, dtype=np.float32)[order]),
            labels=torch.as_tensor(np.asarray(ids, dtype=np.int64)[order]),
            names=[names[i] for i in order],
            masks=torch.as_tensor(detections.mask[order]) if detections.mask is not None else None,
        )


def _supervision():
    try:
        import supervision
    except ImportError as e:
        from ..errors import MissingExtra

        raise MissingExtra("supervision interop", "supervision", e) from e
    return supervision


PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision inference runs in: ``auto`` is bf16 on a CPU with native bf16 (AVX512-BF16 or
    AMX) and fp32 elsewhere (bf16 emulated is slower; no GPU was measured); fp16 needs CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision='fp16' needs a CUDA device (this one is {device})")
    resolved = resolve_amp("auto" if precision == "auto" else precision, device)
    return "fp32" if resolved == "none" else resolved


def model_precision(model: Any, precision: str, device: torch.device) -> str:
    """:func:`resolve_precision` for ``model``: an ONNX export runs as it was written (``auto`` is
    fp32 for it; anything else is refused)."""
    if getattr(model, "postprocessed", False):
        if precision not in ("auto", "fp32"):
            raise ConfigError(f"precision={precision!r}: an ONNX file runs as it was exported (fp32 or int8)")
        return "fp32"
    return resolve_precision(precision, device)


def load_for_inference(source: str | os.PathLike) -> Any:
    """The model that inference (``Detector``, ``detrkit eval``, ``detrkit benchmark``) runs: an
    ONNX export of ``detrkit export`` through onnxruntime, or anything :func:`detrkit.load_model`
    reads with its BatchNorm folded into the convolutions (``detrkit.models.fold``; the same outputs
    within float rounding, a faster forward)."""
    if str(source).lower().endswith(".onnx"):
        from .onnx_model import OnnxDetr

        return OnnxDetr(source)
    model = load_model(source).eval()
    fold_batchnorm(model)
    return model


def check_probability(value: float, name: str) -> None:
    """Refuse a score threshold that is not a number in [0, 1] (NaN would keep nothing, silently)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r}: a score threshold must be a number in [0, 1]")


def to_pil(image: ImageInput) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return to_rgb(image, orient=False)  # as for a file: 16-bit greyscale must not turn white
    if isinstance(image, np.ndarray):
        if image.ndim == 2 and image.dtype in (np.uint16, np.int32, np.float32):
            return to_rgb(Image.fromarray(image), orient=False)  # 16/32-bit or float greyscale, as in a file
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(
                f"numpy images must be uint8 HxWx3 (or HxWx4, HxW), got {image.dtype} {image.shape}"
            )
        if 0 in image.shape[:2]:
            raise ValueError(f"numpy image of size {image.shape[0]}x{image.shape[1]}: an image has pixels")
        return Image.fromarray(np.ascontiguousarray(image[..., :3]), mode="RGB")
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"tensor images must be Tensor[3, H, W], got shape {tuple(image.shape)}")
        image = image.detach().cpu()
        if 0 in image.shape[1:]:
            raise ValueError(f"tensor image of size {image.shape[1]}x{image.shape[2]}: an image has pixels")
        if image.dtype == torch.uint8:
            return TF.to_pil_image(image)
        if image.is_floating_point():
            if not bool(torch.isfinite(image).all()):
                raise ValueError("float tensor image holds NaN or infinite values")
            low, high = float(image.min()), float(image.max())
            # Rounding may leave values just outside [0, 1]; a 0-255 image is refused, not clamped white.
            if low < -0.01 or high > 1.01:
                raise ValueError(
                    f"float tensor images must be in [0, 1], got values in [{low:g}, {high:g}] "
                    "(divide a 0-255 image by 255, or pass it as uint8)"
                )
            return TF.to_pil_image(image.clamp(0, 1))
        raise ValueError(f"tensor images must be uint8 (0-255) or float (0-1), got {image.dtype}")
    raise TypeError(
        f"unsupported image type {type(image).__name__}: give a path, PIL image, numpy array or tensor"
    )


class Detector:
    """A model plus the preprocessing and post-processing it was evaluated with.

    Images are resized exactly as in evaluation (shorter side ``eval_size`` scaled by the model's
    training ``image_scale``, longer side capped), normalised, and batched. DETR's outputs change
    slightly when an image is padded next to a larger one, so only images of the same resized
    size share a batch: a batch gives the same result as one image at a time.
    """

    def __init__(
        self, model: Detr, *, device: str | torch.device | None = None, batch_size: int = 4,
        precision: str = "fp32",
    ) -> None:  # fmt: skip
        self.device = pick_device(device)
        self.precision = model_precision(model, precision, self.device)
        self.model = model.to(self.device).eval()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.batch_size = batch_size
        config = model.config
        self.sizes = TransformConfig.scaled(config.image_scale)
        self.category_ids = config.label_ids
        self.class_names = config.class_names or tuple(str(i) for i in self.category_ids)
        self._post = PostProcess()
        self._post_masks = PostProcessSegm()
        self._post_panoptic = PostProcessPanoptic(config.is_thing)

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike, *, device: str | torch.device | None = None, **kwargs
    ) -> Detector:
        """Anything :func:`detrkit.load_model` reads: a file, a Hugging Face folder, an official name."""
        device = pick_device(device)  # refused before a (slow) load, not after
        return cls(load_for_inference(source), device=device, **kwargs)

    def preprocess(self, image: Image.Image) -> Tensor:
        """PIL image -> normalised Tensor[3, h, w] at the evaluation size."""
        height, width = resized_shape(image.height, image.width, self.sizes.eval_size, self.sizes.max_size)
        tensor = TF.pil_to_tensor(image)
        tensor = TF.resize(tensor, [height, width], antialias=True)
        tensor = TF.to_dtype(tensor, torch.float32, scale=True)
        return TF.normalize(tensor, list(self.sizes.mean), list(self.sizes.std))

    @property
    def default_segmentation(self) -> str | None:
        """What a mask model returns by default: ``panoptic`` when it has stuff classes, else ``instance``."""
        config = self.model.config
        if not config.masks:
            return None
        return "panoptic" if config.stuff_ids else "instance"

    @torch.inference_mode()
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        threshold: float = 0.7,
        *,
        segmentation: str | None = "auto",
        panoptic_threshold: float = 0.85,
    ) -> list[Detections]:
        """Detect objects in one image or a list of them (any mix of sizes and input types).

        ``segmentation`` (mask models only): ``"instance"`` (a mask per detection), ``"panoptic"``,
        ``"semantic"``, None (boxes only) or ``"auto"`` (:attr:`default_segmentation`). Panoptic
        segments are the queries whose class probability exceeds ``panoptic_threshold``.
        """
        segmentation = self.segmentation_mode(segmentation)
        check_probability(threshold, "threshold")
        check_probability(panoptic_threshold, "panoptic_threshold")
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        # One image at a time: only the resized tensors are kept, not every full-size picture.
        prepared = [self.prepare(item) for item in items]
        return self.predict_prepared(
            prepared, threshold, segmentation=segmentation, panoptic_threshold=panoptic_threshold
        )

    def segmentation_mode(self, segmentation: str | None) -> str | None:
        """What ``segmentation`` means for this model ("auto": :attr:`default_segmentation`); a
        mode the model cannot give is refused with a ``ValueError``."""
        if segmentation == "auto":
            segmentation = self.default_segmentation
        if segmentation not in (None, "instance", "panoptic", "semantic"):
            raise ValueError(
                f"segmentation={segmentation!r}: expected 'instance', 'panoptic', 'semantic', 'auto' or None"
            )
        if segmentation is not None and not self.model.config.masks:
            raise ValueError(f"segmentation={segmentation!r} needs a model with a mask head (masks=True)")
        if segmentation not in (None, "instance") and getattr(self.model, "postprocessed", False):
            raise ValueError(
                f"segmentation={segmentation!r}: an ONNX export gives instance masks only; "
                "panoptic and semantic segmentation need the PyTorch weights"
            )
        return segmentation

    def prepare(self, image: ImageInput) -> tuple[Tensor, tuple[int, int]]:
        """``(preprocess(image), (height, width))``: what :meth:`predict_prepared` needs of an image
        (any input :meth:`predict` takes; sizes after EXIF orientation)."""
        image = to_pil(image)
        return self.preprocess(image), (image.height, image.width)

    @torch.inference_mode()
    def predict_prepared(
        self,
        prepared: Sequence[tuple[Tensor, tuple[int, int]]],
        threshold: float = 0.7,
        *,
        segmentation: str | None = "auto",
        panoptic_threshold: float = 0.85,
    ) -> list[Detections]:
        """:meth:`predict` on images already passed through :meth:`prepare` (e.g. in another
        thread, as the server does, so that full-size pictures need not wait in a queue)."""
        segmentation = self.segmentation_mode(segmentation)
        self._post_panoptic.threshold = panoptic_threshold
        inputs = [tensor for tensor, _ in prepared]
        original = [size for _, size in prepared]
        results: list[Detections | None] = [None] * len(prepared)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for index, tensor in enumerate(inputs):
            by_shape.setdefault(tuple(tensor.shape[-2:]), []).append(index)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch, _ = pad_images([inputs[i] for i in chunk])  # same size: no padding
                orig = torch.tensor([list(original[i]) for i in chunk], device=self.device)
                if getattr(self.model, "postprocessed", False):  # an ONNX export: boxes come out
                    for i, det in zip(chunk, self.model.detect(batch, orig), strict=True):
                        if segmentation is None:
                            det.pop("masks", None)
                        results[i] = self._select(det, threshold)
                    continue
                with amp_autocast(self.device, "none" if self.precision == "fp32" else self.precision):
                    outputs = self.model(batch.to(self.device))
                # Post-processing (softmax, boxes in pixels, masks) in fp32 whatever the forward ran in.
                outputs = outputs_to_float(outputs)
                found = self._post(outputs, orig)
                sizes = torch.tensor([list(inputs[i].shape[-2:]) for i in chunk], device=self.device)
                if segmentation == "instance":
                    found = self._post_masks(found, outputs, sizes, orig)
                for i, det in zip(chunk, found, strict=True):
                    results[i] = self._select(det, threshold)
                if segmentation == "panoptic":
                    for i, pan in zip(chunk, self._post_panoptic(outputs, sizes, orig), strict=True):
                        results[i].segments = pan["segments"].cpu()
                        results[i].segments_info = [self._segment_info(s) for s in pan["segments_info"]]
                elif segmentation == "semantic":
                    ids = torch.tensor(self.category_ids, dtype=torch.int64)
                    for i, labels in zip(chunk, semantic_segmentation(outputs, sizes, orig), strict=True):
                        results[i].semantic = ids[labels.cpu()]
        return results  # type: ignore[return-value]

    def _segment_info(self, segment: dict[str, Any]) -> dict[str, Any]:
        label = segment["label"]
        return {
            "id": segment["id"],
            "category_id": int(self.category_ids[label]),
            "name": self.class_names[label],
            "isthing": segment["isthing"],
            "score": segment["score"],
            "area": segment["area"],
        }

    def _select(self, det: dict[str, Tensor], threshold: float) -> Detections:
        keep = det["scores"] > threshold
        order = det["scores"][keep].argsort(descending=True)
        labels = det["labels"][keep][order].cpu()
        ids = torch.tensor(self.category_ids, dtype=torch.int64)[labels]
        masks = det["masks"][keep][order].cpu() if "masks" in det else None
        return Detections(
            boxes=det["boxes"][keep][order].cpu(),
            scores=det["scores"][keep][order].cpu(),
            labels=ids,
            names=[self.class_names[int(label)] for label in labels],
            masks=masks,
        )

    def __repr__(self) -> str:
        c = self.model.config
        what = self.model if getattr(self.model, "postprocessed", False) else c.backbone
        return f"Detector({what}, {c.num_classes} classes, device={self.device})"
