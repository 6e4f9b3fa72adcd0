"""``detrkit export``: a model as ONNX (dynamic shapes, checked against PyTorch; int8 for CPUs,
calibrated on the user's images, with the AP it costs) or TorchScript."""

from __future__ import annotations

import argparse
import sys

from .args import add_data_format, bounded, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (dynamic shapes; int8) or TorchScript")
    p.add_argument("--weights", required=True, help="any checkpoint load_model reads, or an official name")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", required=True, help="file to write (.onnx / .pt)")
    p.add_argument(
        "--opset", type=bounded(int, 18, None, "the ONNX opset"), default=18, help="ONNX opset (default 18)"
    )
    p.add_argument(
        "--raw", action="store_true",
        help="ONNX: the model's raw outputs (logits, normalised boxes) instead of boxes, scores and labels",
    )  # fmt: skip
    p.add_argument(
        "--int8", action="store_true",
        help="ONNX: quantise the convolutions to int8 (static, calibrated on --calibrate's images) for CPUs",
    )  # fmt: skip
    p.add_argument("--calibrate", metavar="DATA", default=None, help="--int8: the dataset to calibrate on")
    add_data_format(p, "--calibrate")
    p.add_argument(
        "--calibration-split", default="train2017", help="--int8: the split whose images calibrate"
    )
    p.add_argument(
        "--calibration-images", type=positive_int, default=32,
        help="--int8: how many images of that split calibrate (evenly spaced; default 32)",
    )  # fmt: skip
    p.add_argument(
        "--eval-split", default="val2017",
        help='--int8: the split on which fp32 and int8 box AP are measured ("none": skip the measurement)',
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints.io import load_model
    from ..errors import ConfigError
    from ..fileio import check_output
    from ..inference.export import export_onnx, export_torchscript, onnx_max_diff

    if args.int8 and (args.format != "onnx" or args.raw):
        raise ConfigError(
            "--int8 writes an ONNX file with its post-processing: drop --format torchscript / --raw"
        )
    if args.int8 and args.calibrate is None:
        raise ConfigError("--int8 needs --calibrate DATA: images to read the activations' ranges from")
    if args.calibrate is not None and not args.int8:
        raise ConfigError("--calibrate is for --int8")
    check_output(args.out, option="--out", inputs=[args.weights], overwrite=args.overwrite)
    model = load_model(args.weights)
    if args.format == "torchscript":
        path = export_torchscript(model, args.out)
        print(f"wrote {path} (TorchScript, traced)")
        return 0
    if args.int8:
        return _export_int8(model, args)
    path = export_onnx(model, args.out, opset=args.opset, postprocess=not args.raw)
    outputs = "raw outputs" if args.raw else "boxes, scores and labels"
    print(f"wrote {path} (ONNX opset {args.opset}; dynamic batch, height and width; {outputs})")
    try:
        diffs = onnx_max_diff(model, path)
    except ImportError:
        print("onnxruntime is not installed: output not checked")
    else:
        print("onnxruntime max abs diff vs PyTorch: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return 0


def _export_int8(model, args: argparse.Namespace) -> int:
    """Export in fp32, quantise with calibration, and print the box AP of both on --eval-split."""
    import tempfile
    import time
    from pathlib import Path

    from ..evaluation.loop import box_metrics, open_detection_split
    from ..inference.export import export_onnx
    from ..inference.onnx_model import OnnxDetr
    from ..inference.quantize import calibration_feeds, quantize_export

    # Both splits are opened before the (slow) export: a bad dataset is refused with nothing written.
    calibration, *_ = open_detection_split(
        model.config, args.calibrate, args.calibration_split, args.data_format
    )
    held_out = None
    if args.eval_split.lower() != "none":
        held_out, *_, source = open_detection_split(
            model.config, args.calibrate, args.eval_split, args.data_format
        )
    with tempfile.TemporaryDirectory(prefix="detrkit-export-") as work:
        fp32 = export_onnx(model, Path(work) / "fp32.onnx", opset=args.opset)
        start = time.perf_counter()
        path = quantize_export(fp32, args.out, calibration_feeds(calibration, args.calibration_images))
        seconds = time.perf_counter() - start
        count = min(args.calibration_images, len(calibration))
        print(
            f"wrote {path} (ONNX opset {args.opset}, int8 convolutions; calibrated on {count} image(s) of "
            f"{args.calibration_split} in {seconds:.0f} s; boxes, scores and labels)"
        )
        if held_out is None:
            return 0
        if len(held_out) == 0:
            print(f"WARNING: {source} has no image: AP not measured", file=sys.stderr)
            return 0
        rows = [(name, box_metrics(OnnxDetr(p), held_out)) for name, p in (("fp32", fp32), ("int8", path))]
    print(f"box AP on {source} ({len(held_out)} images), onnxruntime:")
    for name, metrics in rows:
        print(f"  {name}: AP {100 * metrics['bbox/AP']:.1f}  AP50 {100 * metrics['bbox/AP50']:.1f}")
    (_, a), (_, b) = rows

    def change(key: str) -> str:
        return f"{round(100 * (b[key] - a[key]), 2) + 0.0:+.2f}"  # + 0.0: no "-0.00"

    print(f"  int8 - fp32: AP {change('bbox/AP')}  AP50 {change('bbox/AP50')} (points)")
    return 0
