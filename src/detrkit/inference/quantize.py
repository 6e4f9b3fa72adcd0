"""Static int8 quantisation of an ONNX export for CPUs, calibrated on the user's own images.

onnxruntime's quantiser (``onnxruntime.quantization.quantize_static``) rewrites the fp32 graph in
the QDQ format: int8 weights per output channel, uint8 activations whose ranges are read off
calibration images (min/max of each tensor), which onnxruntime's CPU provider runs as integer
kernels (VNNI where the CPU has it).

Only the convolutions are quantised, which is where a DETR spends its time: the ResNet backbone
and the 1x1 input projection are ~90% of a ResNet-50 DETR's multiply-adds at 800 px. The
transformer stays in fp32: its attention products have activations on both sides (no fixed
weight to calibrate per channel), its softmax and LayerNorm are range-sensitive, and the class
and box heads decide the scores and coordinates a user reads.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..errors import ConfigError, MissingExtra
from ..fileio import atomic_write

QUANTIZED_OPS = ("Conv",)


def calibration_feeds(dataset, count: int) -> Iterator[dict[str, np.ndarray]]:
    """onnxruntime feeds of ``count`` images of ``dataset`` (evenly spaced over it; each alone, at
    its own resized size), for a post-processed export (inputs images, padding_mask, orig_sizes)."""
    n = len(dataset)
    picked = sorted({round(i * n / count) for i in range(min(count, n))}) if n else []
    for index in picked:
        sample = dataset[index]
        if not isinstance(sample, tuple):  # an unreadable image (SkippedSample): the dataset has warned
            continue
        image, target = sample
        batch = image.unsqueeze(0).float().numpy()
        yield {
            "images": batch,
            "padding_mask": np.zeros((1, *batch.shape[2:]), dtype=bool),
            "orig_sizes": target["orig_size"].reshape(1, 2).numpy().astype(np.int64),
        }


def noise_feeds(height: int, width: int, count: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """onnxruntime feeds of ``count`` normalised noise images of one size: a calibration that sets
    an int8 file's speed (its graph) but not its accuracy, for timing only."""
    rng = np.random.default_rng(seed)
    return [
        {
            "images": rng.standard_normal((1, 3, height, width), dtype=np.float32),
            "padding_mask": np.zeros((1, height, width), dtype=bool),
            "orig_sizes": np.array([[height, width]], dtype=np.int64),
        }
        for _ in range(count)
    ]


def quantize_export(
    fp32_path: str | os.PathLike, path: str | os.PathLike, feeds: Iterable[dict[str, np.ndarray]]
) -> Path:
    """Write a statically quantised copy of the ONNX file ``fp32_path`` to ``path`` (atomically),
    calibrated on ``feeds`` (onnxruntime input dicts); the file keeps the export's metadata and
    notes its quantisation. Returns the path."""
    try:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise MissingExtra("int8 quantisation", "onnx", e) from e

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)
            self.count = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(self.feeds, None)
            self.count += feed is not None
            return feed

    reader = Reader()
    metadata = {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}

    def write(tmp: str) -> None:
        with tempfile.TemporaryDirectory(prefix="detrkit-int8-") as work:
            # Constant folding and shape inference first, as onnxruntime advises (the exporter's
            # symbolic shapes are left alone: its graph names them already).
            prepared = str(Path(work) / "prepared.onnx")
            quant_pre_process(str(fp32_path), prepared, skip_symbolic_shape=True)
            try:
                quantize_static(
                    prepared,
                    tmp,
                    reader,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANTIZED_OPS),
                    per_channel=True,
                    activation_type=QuantType.QUInt8,  # u8 activations x s8 weights: VNNI's kernels
                    weight_type=QuantType.QInt8,
                )
            except ValueError:
                if reader.count == 0:
                    raise ConfigError("int8 calibration: no readable image to calibrate on") from None
                raise
        model = onnx.load(tmp)
        del model.metadata_props[:]
        for key, value in {**metadata, "quantization": _describe(reader.count)}.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, tmp)

    return atomic_write(path, write, suffix=".onnx")


def _describe(images: int) -> str:
    return (
        f"int8 static (onnxruntime QDQ): {', '.join(QUANTIZED_OPS)} with per-channel s8 weights and u8 "
        f"activations calibrated (min/max) on {images} image(s); the rest fp32"
    )
