"""Inference latency and throughput of a model on this machine, per backend, precision, batch size
and image size (``detrkit benchmark``), and the box AP of each path on a dataset.

A path is the whole inference from a normalised, padded batch to boxes, scores and labels in
original pixels: for PyTorch the model (BatchNorm folded, as ``Detector`` runs it) under the
precision's autocast followed by ``PostProcess``; for onnxruntime the post-processed export
(fp32, and int8 from ``export --int8``). The paths of one batch size and image size are timed
interleaved, run by run, so that they see the same machine state.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..amp import amp_autocast, outputs_to_float
from ..errors import ConfigError
from ..models.postprocess import PostProcess
from .detector import load_for_inference, model_precision

BACKENDS = ("pytorch", "onnx", "int8")


@dataclass
class Measurement:
    """One path at one batch size and image size: times in milliseconds per batch."""

    backend: str
    precision: str
    batch: int
    height: int
    width: int
    median_ms: float
    p90_ms: float
    images_per_s: float
    runs_ms: list[float] = field(default_factory=list)
    AP: float | None = None  # box AP and AP50 on --data (fractions), when given
    AP50: float | None = None


@dataclass
class InferencePath:
    """A way to run the model: ``run(images, padding_mask, orig_sizes)`` gives detections;
    ``model`` and ``amp`` are what the evaluation loop runs for its AP."""

    backend: str
    precision: str
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]
    model: Any
    amp: str = "none"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``values`` (linear interpolation, as numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def pytorch_path(model, precision: str, device: torch.device) -> InferencePath:
    """The folded model under ``precision``'s autocast, then ``PostProcess``."""
    postprocess = PostProcess()
    amp = "none" if precision == "fp32" else precision

    @torch.inference_mode()
    def run(images, padding_mask, orig_sizes):
        with amp_autocast(device, amp):
            outputs = model(images, padding_mask)
        detections = postprocess(outputs_to_float(outputs), orig_sizes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return detections

    return InferencePath("pytorch", precision, run, model, amp)


def onnx_path(model, precision: str) -> InferencePath:
    """An :class:`~detrkit.inference.onnx_model.OnnxDetr` (fp32 or int8 file) run by onnxruntime."""

    def run(images, padding_mask, orig_sizes):
        return model.detect(images, orig_sizes, padding_mask)

    return InferencePath("onnxruntime", precision, run, model)


def default_precisions(device: torch.device) -> list[str]:
    """fp32, and what ``auto`` picks on this device when it is something else (bf16 on a CPU with
    native bf16); fp16 too on a GPU."""
    picked = ["fp32", model_precision(None, "auto", device)]
    if device.type == "cuda":
        picked.append("fp16")
    return list(dict.fromkeys(picked))


def batch_of(batch: int, height: int, width: int, device: torch.device):
    """A batch of normalised noise images of one size (no padding) and their original sizes."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=g).to(device)
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    sizes = torch.tensor([[height, width]] * batch, device=device)
    return images, mask, sizes


def time_paths(
    paths: Sequence[InferencePath], batch: int, height: int, width: int, device: torch.device,
    runs: int, warmup: int,
) -> list[Measurement]:  # fmt: skip
    """Time ``paths`` interleaved on one batch: ``warmup`` untimed runs each, then ``runs`` rounds."""
    inputs = batch_of(batch, height, width, device)
    for _ in range(warmup):
        for path in paths:
            path.run(*inputs)
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(runs):
        for path, spent in zip(paths, times, strict=True):
            start = time.perf_counter()
            path.run(*inputs)
            spent.append(1000 * (time.perf_counter() - start))
    measured = []
    for path, spent in zip(paths, times, strict=True):
        median = statistics.median(spent)
        measured.append(
            Measurement(
                path.backend,
                path.precision,
                batch,
                height,
                width,
                round(median, 3),
                round(percentile(spent, 0.9), 3),
                round(1000 * batch / median, 3),
                [round(t, 3) for t in spent],
            )  # fmt: skip
        )
    return measured


@dataclass
class BenchmarkSpec:
    """What ``detrkit benchmark`` measures (its options)."""

    weights: str
    backends: Sequence[str] = BACKENDS
    precisions: Sequence[str] | None = None  # PyTorch's; None: default_precisions
    batches: Sequence[int] = (1,)
    sizes: Sequence[tuple[int, int]] | None = None  # (height, width); None: the model's own
    runs: int = 10
    warmup: int = 2
    device: str | None = None
    data: str | None = None  # a dataset for the AP of each path (and int8's calibration)
    split: str = "val2017"
    data_format: str = "auto"
    calibration_split: str = "train2017"
    calibration_images: int = 32


def model_size(config) -> tuple[int, int]:
    """The (height, width) a 4:3 image has after the model's evaluation resize."""
    from ..data.transforms import TransformConfig

    sizes = TransformConfig.scaled(config.image_scale)
    return sizes.eval_size, min(round(sizes.eval_size * 4 / 3), sizes.max_size)


def build_paths(spec: BenchmarkSpec, device: torch.device, work: Path, log: Callable[[str], None]):
    """The paths to time, from the weights and the spec: ``(config, paths, calibration, held_out)``
    where ``calibration`` says what int8 was calibrated on and ``held_out`` is the dataset of the
    APs (None without ``--data``). The data is opened before any slow work, so that a bad dataset
    is refused at once."""
    from ..evaluation.loop import open_detection_split
    from ..inference.onnx_model import OnnxDetr

    unknown = [b for b in spec.backends if b not in BACKENDS]
    if unknown:
        raise ConfigError(
            f"--backends: unknown {', '.join(unknown)} (expected some of {', '.join(BACKENDS)})"
        )
    model = load_for_inference(spec.weights)
    held_out = calibration = None
    if spec.data is not None:
        held_out, *_ = open_detection_split(model.config, spec.data, spec.split, spec.data_format)
    if getattr(model, "postprocessed", False):  # an ONNX file runs as it is
        quantized = "quantization" in model.runtime.get_modelmeta().custom_metadata_map
        return model.config, [onnx_path(model, "int8" if quantized else "fp32")], None, held_out
    if spec.data is not None and "int8" in spec.backends:
        calibration, *_ = open_detection_split(
            model.config, spec.data, spec.calibration_split, spec.data_format
        )
    model.to(device)
    paths = []
    if "pytorch" in spec.backends:
        precisions = dict.fromkeys(
            model_precision(model, p, device) for p in spec.precisions or default_precisions(device)
        )
        paths = [pytorch_path(model, p, device) for p in precisions]
    calibrated = None
    if "onnx" in spec.backends or "int8" in spec.backends:
        from .export import export_onnx

        log("exporting to ONNX ...")
        fp32 = export_onnx(model, work / "fp32.onnx")
        if "onnx" in spec.backends:
            paths.append(onnx_path(OnnxDetr(fp32), "fp32"))
        if "int8" in spec.backends:
            int8, calibrated = _int8(model.config, fp32, calibration, spec, work, log)
            paths.append(onnx_path(OnnxDetr(int8), "int8"))
    return model.config, paths, calibrated, held_out


def _int8(config, fp32: Path, calibration, spec: BenchmarkSpec, work: Path, log) -> tuple[Path, str]:
    """The int8 file: calibrated on the ``calibration`` dataset's images, else (None) on noise
    (which sets its speed, not its accuracy)."""
    from .quantize import calibration_feeds, noise_feeds, quantize_export

    if calibration is not None:
        feeds = calibration_feeds(calibration, spec.calibration_images)
        what = f"{min(spec.calibration_images, len(calibration))} images of {spec.calibration_split}"
    else:
        feeds = noise_feeds(*model_size(config))
        what = "noise (timing only: give --data to calibrate on images and measure its AP)"
    log(f"quantising to int8, calibrated on {what} ...")
    return quantize_export(fp32, work / "int8.onnx", feeds), what


def run_benchmark(spec: BenchmarkSpec, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every path of ``spec``; returns ``{"machine", "weights", "calibration", "rows"}``
    (rows: :class:`Measurement` dicts)."""
    from ..distributed import pick_device
    from ..machine import describe

    device = pick_device(spec.device)
    with tempfile.TemporaryDirectory(prefix="detrkit-benchmark-") as work:
        config, paths, calibrated, held_out = build_paths(spec, device, Path(work), log)
        sizes = list(spec.sizes or [model_size(config)])
        rows: list[Measurement] = []
        for batch in spec.batches:
            for height, width in sizes:
                log(f"timing batch {batch} at {height}x{width} ...")
                rows.extend(time_paths(paths, batch, height, width, device, spec.runs, spec.warmup))
        if held_out is not None:
            _add_ap(rows, paths, held_out, spec.split, device, log)
    return {
        "machine": describe(),
        "device": str(device),
        "weights": str(spec.weights),
        "calibration": calibrated,
        "rows": [asdict(r) for r in rows],
    }


def _add_ap(rows, paths, dataset, split: str, device, log) -> None:
    """Box AP of each path on ``dataset`` (the same for all its rows)."""
    from ..evaluation.loop import box_metrics

    for path in paths:
        log(f"box AP of {path.backend} {path.precision} on {len(dataset)} images of {split} ...")
        metrics = box_metrics(path.model, dataset, amp=path.amp, device=device)
        for row in rows:
            if (row.backend, row.precision) == (path.backend, path.precision):
                row.AP, row.AP50 = metrics["bbox/AP"], metrics["bbox/AP50"]


def format_table(result: dict[str, Any]) -> str:
    """The measurements as a text table, after a line on the machine."""
    lines = [f"machine: {result['machine']}, device {result['device']}", f"weights: {result['weights']}"]
    if result.get("calibration"):
        lines.append(f"int8 calibrated on {result['calibration']}")
    has_ap = any(r["AP"] is not None for r in result["rows"])
    header = f"{'backend':<12} {'precision':<9} {'batch':>5} {'size':>10} {'median ms':>10} {'p90 ms':>9} {'images/s':>9}"
    lines.append(header + ("    AP  AP50" if has_ap else ""))
    for r in result["rows"]:
        line = (
            f"{r['backend']:<12} {r['precision']:<9} {r['batch']:>5} {r['height']:>4}x{r['width']:<5} "
            f"{r['median_ms']:>10.1f} {r['p90_ms']:>9.1f} {r['images_per_s']:>9.2f}"
        )
        if has_ap and r["AP"] is not None:
            line += f"  {100 * r['AP']:4.1f}  {100 * r['AP50']:4.1f}"
        lines.append(line)
    return "\n".join(lines)
