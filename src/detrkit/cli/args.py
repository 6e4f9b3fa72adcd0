"""Value types shared by the commands' parsers: numbers refused with a message naming their range."""

from __future__ import annotations

import argparse
import math


def bounded(kind, low=None, high=None, what: str = "value"):
    """argparse type: ``kind(text)`` within ``[low, high]`` (either bound optional), refused with
    a message naming the range instead of failing later deep inside a command."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what_kind = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what_kind}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (low is not None and value < low) or (high is not None and value > high):
            span = (
                f"between {low} and {high}"
                if low is not None and high is not None
                else (f"at least {low}" if low is not None else f"at most {high}")
            )
            raise argparse.ArgumentTypeError(f"{value}: {what} must be {span}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


probability = bounded(float, 0.0, 1.0, "a score threshold")
non_negative_int = bounded(int, 0, None, "a count")
positive_float = bounded(float, 1e-9, None, "a size")
positive_int = bounded(int, 1, None, "a count")


def add_data_format(parser: argparse.ArgumentParser, what: str = "the dataset") -> None:
    """``--data-format``: the format of a dataset path, detected unless given."""
    parser.add_argument(
        "--data-format", default="auto", choices=("auto", "coco", "yolo", "voc", "labelme"),
        help=f"format of {what} (default: detected)",
    )  # fmt: skip


def add_precision(parser: argparse.ArgumentParser) -> None:
    """``--precision``: what inference runs in (``detrkit.inference.detector.resolve_precision``)."""
    parser.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"),
        help="fp32 (default), bf16, fp16 (CUDA) or auto (bf16 on CPUs with native bf16, else fp32); "
        "post-processing stays fp32",
    )  # fmt: skip
