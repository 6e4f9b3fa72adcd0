"""The ``detrkit`` command line: the parser assembled from one module per command, and the one
place where a user error becomes a one-line message and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .._version import __version__
from .benchmark import add_parser as add_benchmark
from .convert import add_parser as add_convert
from .data import add_parser as add_data
from .evaluate import add_parser as add_evaluate
from .explain import add_parser as add_explain
from .export import add_parser as add_export
from .info import add_parser as add_info
from .plot import add_parser as add_plot
from .predict import add_parser as add_predict
from .serve import add_parser as add_serve
from .synth import add_parser as add_synth
from .train import add_parser as add_train

# In the order ``detrkit --help`` lists them.
PARSERS = (
    add_convert,
    add_train,
    add_evaluate,
    add_predict,
    add_explain,
    add_export,
    add_benchmark,
    add_serve,
    add_plot,
    add_synth,
    add_data,
    add_info,
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
    """The exceptions whose message is meant for the user: printed on one line, exit status 2.

    The project's own error classes name the file, field or option and the reason. Decoding
    errors of the formats users write (JSON, YAML, TOML, text encodings) and the operating
    system's refusals to open a path are theirs too: a file is read where it is named, so their
    message and the file name reach the user rather than a traceback."""
    import json

    import yaml

    from ..data.coco import DatasetError
    from ..data.images import ImageLoadError
    from ..errors import CheckpointError, ConfigError, MissingExtra
    from ..training.loop import TrainingError

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return (
        CheckpointError, ConfigError, DatasetError, ImageLoadError, TrainingError, MissingExtra,
        FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
        json.JSONDecodeError, UnicodeDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``detrkit ARGV``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if os.environ.get("DETRKIT_MALLOC", "") != "system":
        from ..machine import keep_freed_memory

        keep_freed_memory()
    try:
        return args.run(args)
    except user_errors() as e:
        message = " ".join(str(e).split())  # one line, whatever the message's source
        print(f"detrkit {args.command}: error: {message}", file=sys.stderr)
        return 2
