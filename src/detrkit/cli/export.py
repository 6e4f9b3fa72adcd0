"""``detrkit export``: a model as ONNX (dynamic shapes, checked against PyTorch) or TorchScript."""

from __future__ import annotations

import argparse

from .args import bounded


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (dynamic shapes) or TorchScript")
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints.io import load_model
    from ..fileio import check_output
    from ..inference.export import export_onnx, export_torchscript, onnx_max_diff

    check_output(args.out, option="--out", inputs=[args.weights], overwrite=args.overwrite)
    model = load_model(args.weights)
    if args.format == "torchscript":
        path = export_torchscript(model, args.out)
        print(f"wrote {path} (TorchScript, traced)")
        return 0
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
