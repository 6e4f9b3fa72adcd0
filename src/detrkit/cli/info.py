"""``detrkit info``: the configuration a checkpoint loads with."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="print the configuration a checkpoint loads with")
    p.add_argument("weights")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints.io import config_of

    print(config_of(args.weights).to_json())
    return 0
