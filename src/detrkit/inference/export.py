"""Export a DETR to ONNX (dynamic batch, height and width, with the padding mask) or TorchScript.

By default the ONNX graph ends in the post-processing, so that a deployment needs onnxruntime and
numpy only: inputs ``images`` Float[B, 3, H, W] (resized and normalised as the file's metadata
says), ``padding_mask`` Bool[B, H, W] (True on padding) and ``orig_sizes`` Int64[B, 2] (each
image's original height, width); outputs, per image and query sorted by score, ``boxes``
Float[B, Q, 4] (x1, y1, x2, y2 in original pixels), ``scores`` Float[B, Q] and ``labels``
Int64[B, Q] (the dataset's category ids); for mask models also ``masks`` Bool[B, Q, H, W], each
query's instance mask (mask logits upsampled bilinearly to the input, probability > 0.5) in input
pixels: crop an image's to its unpadded size and resize it to the original with nearest
neighbours, as :class:`~detrkit.models.postprocess.PostProcessSegm` does (in numpy, for an
original H0 x W0: ``m[:, :h, :w][:, rows[:, None], cols]`` with ``rows = np.minimum(np.floor(
np.arange(H0, dtype=np.float32) * (np.float32(h) / np.float32(H0))), h - 1).astype(int)`` and
``cols`` the same with w, W0: torch's nearest-neighbour indices, float32 scale and floor). The metadata (``metadata_props``)
holds the class names and ids and the preprocessing: ``eval_size``, ``max_size``, ``mean``, ``std``.

With ``postprocess=False`` (``--raw``) the graph is the model itself: outputs ``pred_logits``
[B, Q, K+1], ``pred_boxes`` [B, Q, 4] (normalised cx, cy, w, h) and, for mask models,
``pred_masks`` [B, Q, H/4, W/4].
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, MissingExtra
from ..fileio import atomic_write
from ..models.detr import Detr
from ..models.fold import fold_batchnorm
from ..models.postprocess import scores_labels_boxes


class ExportWrapper(nn.Module):
    """Tuple outputs (exporters need them) without the auxiliary decoder outputs."""

    def __init__(self, model: Detr) -> None:
        super().__init__()
        self.model = model
        self.output_names = ["pred_logits", "pred_boxes"] + (["pred_masks"] if model.config.masks else [])

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images, padding_mask)
        return tuple(out[name] for name in self.output_names)


class DetectionsExport(nn.Module):
    """The model followed by DETR's post-processing (``PostProcess``): per query the most likely
    class other than "no object", its probability, and its box in original pixels, sorted by score;
    for mask models, each query's mask in input pixels (``PostProcessSegm`` before its per-image
    crop and resize, which need one shape per image)."""

    def __init__(self, model: Detr) -> None:
        super().__init__()
        self.model = model
        self.output_names = ["boxes", "scores", "labels"] + (["masks"] if model.config.masks else [])
        self.register_buffer("category_ids", torch.tensor(model.config.label_ids, dtype=torch.int64))

    def forward(self, images: Tensor, padding_mask: Tensor, orig_sizes: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images, padding_mask)
        scores, labels, boxes = scores_labels_boxes(out["pred_logits"], out["pred_boxes"], orig_sizes)
        scores, order = scores.sort(dim=1, descending=True)
        boxes = boxes.gather(1, order.unsqueeze(-1).expand(-1, -1, 4))
        labels = self.category_ids[labels.gather(1, order)]
        if "pred_masks" not in out:
            return boxes, scores, labels
        logits = out["pred_masks"]  # [B, Q, H/4, W/4]: sorted before upsampling, where it is small
        logits = logits.gather(1, order[:, :, None, None].expand(-1, -1, *logits.shape[-2:]))
        upsampled = F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return boxes, scores, labels, upsampled.sigmoid() > 0.5


def export_metadata(model: Detr) -> dict[str, str]:
    """What a user of the exported file needs besides it: classes and preprocessing (JSON values)."""
    import json

    from .._version import __version__
    from ..data.transforms import TransformConfig

    config = model.config
    sizes = TransformConfig.scaled(config.image_scale)
    return {
        "detrkit_version": __version__,
        "class_names": json.dumps(list(config.class_names or [str(i) for i in config.label_ids])),
        "category_ids": json.dumps(list(config.label_ids)),
        "image_scale": str(config.image_scale),
        "num_queries": str(config.num_queries),
        "eval_size": str(sizes.eval_size),
        "max_size": str(sizes.max_size),
        "mean": json.dumps(list(sizes.mean)),
        "std": json.dumps(list(sizes.std)),
        "preprocessing": "RGB in [0, 1]; resize so that the shorter side is eval_size and the longer at most "
        "max_size (bilinear, antialiased); normalise with mean and std; pad a batch at the bottom and right, "
        "padding_mask True there",
    }


def example_inputs(sizes=((96, 128), (80, 96)), seed: int = 0) -> tuple[Tensor, Tensor]:
    """A padded batch of random images of different sizes (and its padding mask)."""
    g = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, height, width)
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
    return images, mask


def _cpu_copy(model: Detr) -> Detr:
    """An eval-mode copy on the CPU, so that exporting leaves the caller's model (device, mode)
    alone, with its BatchNorm folded into the convolutions (one op less per convolution in the
    graph; the same outputs within float rounding)."""
    copied = copy.deepcopy(model).cpu().eval()
    fold_batchnorm(copied)
    return copied


def export_onnx(model: Detr, path: str | os.PathLike, *, opset: int = 18, postprocess: bool = True) -> Path:
    """Write ``model`` as ONNX with dynamic batch, height and width, ending in the post-processing
    (boxes, scores, labels; unless ``postprocess`` is False); returns the path."""
    try:
        import onnx
        import onnxscript  # noqa: F401 - the exporter needs it; say so before it fails deep inside
    except ImportError as e:
        raise MissingExtra("ONNX export", "onnx", e) from e
    newest = onnx.defs.onnx_opset_version()
    if not 18 <= opset <= newest:
        raise ConfigError(f"opset={opset}: this onnx ({onnx.__version__}) writes opsets 18 to {newest}")
    wrapper = (DetectionsExport if postprocess else ExportWrapper)(_cpu_copy(model)).eval()
    images, mask = example_inputs()
    inputs = (images, mask) + ((_orig_sizes(mask),) if postprocess else ())
    batch = torch.export.Dim("batch", min=1, max=1024)
    # Backbone strides need sizes of at least one feature cell (32 px).
    height = torch.export.Dim("height", min=32, max=8192)
    width = torch.export.Dim("width", min=32, max=8192)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            # The exporter notes that images and padding_mask share batch/height/width: intended.
            warnings.filterwarnings("ignore", message=r".*The axis name: \w+ will not be used")
            _export(tmp)
        if postprocess:
            written = onnx.load(tmp)
            for key, value in export_metadata(model).items():
                written.metadata_props.add(key=key, value=value)
            onnx.save(written, tmp)
        _check_onnx(tmp, opset)

    def _export(tmp: str) -> None:
        torch.onnx.export(
            wrapper,
            inputs,
            tmp,
            dynamo=True,
            # One self-contained file: external weights would be named after the temporary file
            # that atomic_write renames (and DETR R101, ~240 MB, is far below protobuf's 2 GB).
            external_data=False,
            opset_version=opset,
            input_names=["images", "padding_mask"] + (["orig_sizes"] if postprocess else []),
            output_names=wrapper.output_names,
            dynamic_shapes={
                "images": {0: batch, 2: height, 3: width},
                "padding_mask": {0: batch, 1: height, 2: width},
                **({"orig_sizes": {0: batch}} if postprocess else {}),
            },
            verbose=False,
        )

    return atomic_write(path, write, suffix=".onnx")


def _check_onnx(path: str, opset: int) -> None:
    """Refuse a written model that ONNX's checker or, where installed, onnxruntime rejects: the
    file is then never put in place (the caller writes through a temporary file)."""
    import onnx

    try:
        onnx.checker.check_model(path)
    except Exception as e:  # noqa: BLE001 - the checker's errors
        raise ConfigError(f"opset={opset}: the exported model is not valid ONNX ({e})") from None
    try:
        import onnxruntime
    except ImportError:
        return
    try:
        onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors
        raise ConfigError(
            f"opset={opset}: onnxruntime {onnxruntime.__version__} cannot run the exported model "
            f"({' '.join(str(e).split())[:300]}); choose a lower --opset"
        ) from None


def export_torchscript(model: Detr, path: str | os.PathLike) -> Path:
    """Write ``model`` as a traced TorchScript module (shapes stay dynamic); returns the path."""
    wrapper = ExportWrapper(_cpu_copy(model)).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # What the tracer freezes is harmless here: the input checks (true for any valid input)
        # and the loop over auxiliary decoder layers (fixed by the architecture).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapper, example_inputs(), check_trace=False)
    return atomic_write(path, lambda tmp: torch.jit.save(traced, tmp), suffix=".pt")


def _orig_sizes(mask: Tensor) -> Tensor:
    """Int64[B, 2]: the unpadded (height, width) of each image of a padded batch, times 1.5 (an
    original larger than the network input, as after a downscale)."""
    heights = (~mask).any(2).sum(1)
    widths = (~mask).any(1).sum(1)
    return (torch.stack([heights, widths], 1) * 3 // 2).to(torch.int64)


def onnx_max_diff(model: Detr, path: str | os.PathLike, sizes=((120, 90), (72, 136))) -> dict[str, float]:
    """Largest absolute difference between onnxruntime and PyTorch per output, on a padded batch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images, mask = example_inputs(sizes, seed=1)
    postprocess = [i.name for i in session.get_inputs()] == ["images", "padding_mask", "orig_sizes"]
    wrapper = (DetectionsExport if postprocess else ExportWrapper)(_cpu_copy(model)).eval()
    inputs = (images, mask) + ((_orig_sizes(mask),) if postprocess else ())
    with torch.no_grad():
        expected = wrapper(*inputs)
    feed = {"images": images.numpy(), "padding_mask": mask.numpy()}
    if postprocess:
        feed["orig_sizes"] = inputs[2].numpy()
    got = session.run(None, feed)
    return {
        name: float((torch.from_numpy(g) - e).abs().max())
        for name, g, e in zip(wrapper.output_names, got, expected, strict=True)
    }
