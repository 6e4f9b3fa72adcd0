"""The ``detrkit`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoints import convert_checkpoint

    overrides = {"dilation": True} if args.dilation else {}
    path = convert_checkpoint(args.src, args.dst, args.to, **overrides)
    print(f"wrote {path} ({args.to})")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import config_of

    config = config_of(args.weights)
    print(config.to_json())
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import SynthConfig, write_synthetic

    config = SynthConfig(
        images=args.images,
        seed=args.seed,
        min_size=args.min_size,
        max_size=args.max_size,
        image_format=args.format,
    )
    val = args.val_images if args.val_images is not None else max(1, args.images // 4)
    out = write_synthetic(args.out, config, {"train": args.images, "val": val})
    print(
        f"wrote {args.images} train + {val} val images with COCO instances and panoptic annotations to {out}"
    )
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from .data.check import check_annotations, find_annotation_files

    pairs = find_annotation_files(args.path)
    if args.images is not None:
        pairs = [(ann, args.images) for ann, _ in pairs]
    if not pairs:
        print(
            f"detrkit data check: error: no instances_*.json under {args.path}/annotations", file=sys.stderr
        )
        return 2
    ok = True
    for ann, image_dir in pairs:
        report = check_annotations(ann, image_dir)
        if image_dir is None:
            report.warn("images not checked", "no image folder found (pass --images DIR)")
        print(report.summary())
        ok = ok and report.ok
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detrkit", description="DETR: detection transformers in PyTorch")
    parser.add_argument("--version", action="version", version=f"detrkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "convert", help="convert a checkpoint between detrkit, original DETR and Hugging Face formats"
    )
    p.add_argument(
        "src", help="checkpoint to read: .pth, .safetensors, a Hugging Face folder or an official name"
    )
    p.add_argument("dst", help="where to write (a .safetensors / .pth file, or a folder for --to hf)")
    p.add_argument("--to", required=True, choices=("detrkit", "original", "hf"), help="output format")
    p.add_argument(
        "--dilation", action="store_true", help="the source is a DC5 model whose file does not say so"
    )
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("synth", help="write the built-in synthetic dataset (COCO instances + panoptic)")
    p.add_argument("--out", required=True, help="dataset root to create")
    p.add_argument("--images", type=int, default=64, help="training images (default 64)")
    p.add_argument("--val-images", type=int, default=None, help="validation images (default: a quarter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=128, help="smallest image side in pixels")
    p.add_argument("--max-size", type=int, default=192, help="largest image side in pixels")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg")
    p.set_defaults(func=_cmd_synth)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="validate COCO annotation files (and their images)")
    p.add_argument("path", help="an instances JSON, or a dataset root with annotations/instances_*.json")
    p.add_argument("--images", default=None, help="image folder (default: inferred from the COCO layout)")
    p.set_defaults(func=_cmd_data_check)

    p = sub.add_parser("info", help="print the configuration a checkpoint loads with")
    p.add_argument("weights")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoints import CheckpointError
    from .data.coco import DatasetError
    from .data.images import ImageLoadError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, DatasetError, ImageLoadError, FileNotFoundError, ValueError) as e:
        print(f"detrkit {args.command}: error: {e}", file=sys.stderr)
        return 2
