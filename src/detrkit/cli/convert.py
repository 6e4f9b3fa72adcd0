"""``detrkit convert``: a checkpoint from one format to another (detrkit, original DETR, Hugging Face)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert a checkpoint between detrkit, original DETR and Hugging Face formats"
    )
    p.add_argument(
        "src", help="checkpoint to read: .pth, .safetensors, a Hugging Face folder or an official name"
    )
    p.add_argument("dst", help="where to write (a .safetensors / .pth file, or a folder for --to hf)")
    p.add_argument("--to", required=True, choices=("detrkit", "original", "hf"), help="output format")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument(
        "--dilation", action="store_true", help="the source is a DC5 model whose file does not say so"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints.io import convert_checkpoint
    from ..fileio import check_output

    kind = "dir" if args.to == "hf" else "file"
    check_output(args.dst, option="dst", kind=kind, inputs=[args.src], overwrite=args.overwrite)
    overrides = {"dilation": True} if args.dilation else {}
    path = convert_checkpoint(args.src, args.dst, args.to, **overrides)
    print(f"wrote {path} ({args.to})")
    return 0
