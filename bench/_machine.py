"""What the benchmarks print about the machine they ran on (``detrkit.machine``), and the one
process-wide setting they choose: the malloc behaviour (``--malloc``)."""

import argparse

from detrkit.machine import cpu_model, describe, keep_freed_memory

__all__ = ["add_malloc_option", "apply_malloc", "cpu_model", "describe"]


def add_malloc_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--malloc",
        choices=("reuse", "system"),
        default="reuse",
        help="reuse: glibc keeps freed memory (what the detrkit command sets, detrkit.machine."
        "keep_freed_memory), for every side of the comparison; system: malloc as the process "
        "starts (what a plain python process, e.g. a transformers user's, runs with)",
    )


def apply_malloc(choice: str) -> str:
    """Applies ``--malloc``; returns the words the benchmark prints for it."""
    if choice == "reuse":
        return "malloc keeps freed memory" if keep_freed_memory() else "system malloc (not glibc)"
    return "system malloc"
