"""Export a DETR to ONNX (dynamic batch, height and width, with the padding mask) or TorchScript.

The exported graph is the model itself: inputs ``images`` Float[B, 3, H, W] (normalised as in
evaluation) and ``padding_mask`` Bool[B, H, W] (True on padding); outputs ``pred_logits``
[B, Q, K+1], ``pred_boxes`` [B, Q, 4] (normalised cx, cy, w, h) and, for mask models,
``pred_masks`` [B, Q, H/4, W/4]. Post-processing stays outside, as in the Python API.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ConfigError, MissingExtra
from ..fileio import atomic_write
from ..models.detr import Detr


class ExportWrapper(nn.Module):
    """Tuple outputs (exporters need them) without the auxiliary decoder outputs."""

    def __init__(self, model: Detr) -> None:
        super().__init__()
        self.model = model
        self.output_names = ["pred_logits", "pred_boxes"] + (["pred_masks"] if model.config.masks else [])

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images, padding_mask)
        return tuple(out[name] for name in self.output_names)


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
    """An eval-mode copy on the CPU, so that exporting leaves the caller's model (device, mode) alone."""
    return copy.deepcopy(model).cpu().eval()


def export_onnx(model: Detr, path: str | os.PathLike, *, opset: int = 18) -> Path:
    """Write ``model`` as ONNX with dynamic batch, height and width; returns the path."""
    try:
        import onnx
        import onnxscript  # noqa: F401 - the exporter needs it; say so before it fails deep inside
    except ImportError as e:
        raise MissingExtra("ONNX export", "onnx", e) from e
    newest = onnx.defs.onnx_opset_version()
    if not 18 <= opset <= newest:
        raise ConfigError(f"opset={opset}: this onnx ({onnx.__version__}) writes opsets 18 to {newest}")
    wrapper = ExportWrapper(_cpu_copy(model)).eval()
    images, mask = example_inputs()
    batch = torch.export.Dim("batch", min=1, max=1024)
    # Backbone strides need sizes of at least one feature cell (32 px).
    height = torch.export.Dim("height", min=32, max=8192)
    width = torch.export.Dim("width", min=32, max=8192)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            # The exporter notes that images and padding_mask share batch/height/width: intended.
            warnings.filterwarnings("ignore", message=r".*The axis name: \w+ will not be used")
            _export(tmp)
        _check_onnx(tmp, opset)

    def _export(tmp: str) -> None:
        torch.onnx.export(
            wrapper,
            (images, mask),
            tmp,
            dynamo=True,
            # One self-contained file: external weights would be named after the temporary file
            # that atomic_write renames (and DETR R101, ~240 MB, is far below protobuf's 2 GB).
            external_data=False,
            opset_version=opset,
            input_names=["images", "padding_mask"],
            output_names=wrapper.output_names,
            dynamic_shapes={
                "images": {0: batch, 2: height, 3: width},
                "padding_mask": {0: batch, 1: height, 2: width},
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


def onnx_max_diff(model: Detr, path: str | os.PathLike, sizes=((120, 90), (72, 136))) -> dict[str, float]:
    """Largest absolute difference between onnxruntime and PyTorch per output, on a padded batch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images, mask = example_inputs(sizes, seed=1)
    wrapper = ExportWrapper(_cpu_copy(model)).eval()
    with torch.no_grad():
        expected = wrapper(images, mask)
    got = session.run(None, {"images": images.numpy(), "padding_mask": mask.numpy()})
    return {
        name: float((torch.from_numpy(g) - e).abs().max())
        for name, g, e in zip(wrapper.output_names, got, expected, strict=True)
    }
