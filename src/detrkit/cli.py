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

    p = sub.add_parser("info", help="print the configuration a checkpoint loads with")
    p.add_argument("weights")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoints import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"detrkit {args.command}: error: {e}", file=sys.stderr)
        return 2
