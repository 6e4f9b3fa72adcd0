"""``detrkit plot``: a run's loss and AP curves as a PNG."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's loss and AP curves to a PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..fileio import check_output
    from ..training.plot import plot_run

    if args.out is not None:
        # Redrawing a picture is fine; replacing anything else (a checkpoint, the metrics) is not.
        check_output(
            args.out, option="--out", overwrite=args.overwrite, replaceable=lambda p: p.suffix == ".png"
        )
    if args.out is not None and not str(args.out).lower().endswith(".png"):
        raise ConfigError(f"--out {args.out}: the picture is a PNG; name it *.png")
    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0
