"""The ``detrkit`` command line: the parser assembled from one module per command, and the one
place where a user error becomes a one-line message and exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .._version import __version__
from . import convert, data, evaluate, explain, export, plot, predict, serve, train

# In the order ``detrkit --help`` lists them.
PARSERS = (
    convert.add_parser,
    train.add_parser,
    evaluate.add_parser,
    predict.add_parser,
    explain.add_parser,
    export.add_parser,
    serve.add_parser,
    plot.add_parser,
    data.add_synth_parser,
    data.add_parser,
    convert.add_info_parser,
)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each subcommand's parser sets ``run`` (its handler)."""
    parser = argparse.ArgumentParser(prog="detrkit", description="DETR: detection transformers in PyTorch")
    parser.add_argument("--version", action="version", version=f"detrkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in PARSERS:
        add_parser(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions whose message is meant for the user: printed on one line, exit status 2."""
    from ..data.coco import DatasetError
    from ..data.images import ImageLoadError
    from ..errors import CheckpointError, ConfigError
    from ..training.loop import TrainingError

    return (CheckpointError, ConfigError, DatasetError, ImageLoadError, FileNotFoundError, TrainingError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``detrkit ARGV``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except user_errors() as e:
        print(f"detrkit {args.command}: error: {e}", file=sys.stderr)
        return 2
