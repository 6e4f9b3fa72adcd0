"""``detrkit benchmark``: inference latency and throughput per backend, precision, batch size and
image size on this machine, and each path's box AP with ``--data``."""

from __future__ import annotations

import argparse
import re

from .args import add_data_format, bounded, positive_int


def image_size(text: str) -> tuple[int, int]:
    """argparse type: ``HxW`` (e.g. ``800x1066``), each side at least 32 (one feature cell)."""
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match or min(int(match[1]), int(match[2])) < 32:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HEIGHTxWIDTH, each at least 32 (e.g. 800x1066)")
    return int(match[1]), int(match[2])


def add_parser(sub) -> None:
    p = sub.add_parser(
        "benchmark", help="inference latency and throughput per backend, precision, batch and image size"
    )
    p.add_argument("--weights", required=True, help="any checkpoint load_model reads, or an ONNX export")
    p.add_argument(
        "--backends", nargs="+", choices=("pytorch", "onnx", "int8"), default=["pytorch", "onnx", "int8"],
        help="pytorch (folded BatchNorm, per --precision), onnx (onnxruntime fp32), int8 (onnxruntime, "
        "calibrated on --data, else on noise: timing only); default all",
    )  # fmt: skip
    p.add_argument(
        "--precision", nargs="+", choices=("fp32", "bf16", "fp16", "auto"), default=None,
        help="PyTorch's precisions (default: fp32 and what auto picks here; fp16 too on a GPU)",
    )  # fmt: skip
    p.add_argument("--batch", nargs="+", type=positive_int, default=[1], help="batch sizes (default 1)")
    p.add_argument(
        "--size", nargs="+", type=image_size, default=None, metavar="HxW",
        help="network input sizes (default: what the model resizes a 4:3 image to)",
    )  # fmt: skip
    p.add_argument("--runs", type=bounded(int, 3, None, "runs"), default=10, help="timed runs (default 10)")
    p.add_argument("--warmup", type=bounded(int, 1, None, "warm-up runs"), default=2)
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--data", default=None, help="a dataset: the box AP of each path on --split, and int8's calibration"
    )
    p.add_argument("--split", default="val2017", help="--data's split for the AP (default val2017)")
    add_data_format(p, "--data")
    p.add_argument("--calibration-split", default="train2017", help="--data's split that calibrates int8")
    p.add_argument("--calibration-images", type=positive_int, default=32)
    p.add_argument("--json", action="store_true", help="print the results as JSON (for scripts)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    import torch

    from ..inference.benchmark import BenchmarkSpec, format_table, run_benchmark

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    spec = BenchmarkSpec(
        weights=args.weights, backends=args.backends, precisions=args.precision, batches=args.batch,
        sizes=args.size, runs=args.runs, warmup=args.warmup, device=args.device, data=args.data,
        split=args.split, data_format=args.data_format, calibration_split=args.calibration_split,
        calibration_images=args.calibration_images,
    )  # fmt: skip
    # Progress goes to stderr: stdout is the table, or the JSON a script reads.
    result = run_benchmark(spec, log=lambda message: print(message, file=sys.stderr))
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
