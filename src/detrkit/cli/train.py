"""``detrkit train``: train or fine-tune a DETR (``torchrun`` for several processes).

Its options are generated from :class:`~detrkit.training.config.TrainConfig`: every field with
``flag=True`` in its metadata becomes ``--field-name`` with the field's help text, so an option is
declared once. A flag given on the command line overrides the preset and the config file."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from ..training.config import PRESETS, TrainConfig


def train_flags() -> dict[str, tuple[str, Any, str]]:
    """``{field name: (flag, value type, help)}`` for every TrainConfig field that has a flag;
    the value type is ``bool`` for on/off options, else what ``--flag VALUE`` is parsed as."""
    hints = typing.get_type_hints(TrainConfig)
    flags = {}
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("flag", True):
            continue
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if args:  # X | None
            kind = args[0]
        if kind not in (bool, int, float, str):
            raise TypeError(f"TrainConfig.{f.name}: no flag for type {kind}; give it flag=False")
        flags[f.name] = ("--" + f.name.replace("_", "-"), kind, f.metadata["help"])
    return flags


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a DETR (torchrun for several processes)")
    p.add_argument("--config", help="YAML/TOML/JSON file of training options")
    p.add_argument(
        "--preset",
        help=", ".join(PRESETS)
        + ", finetune (with --init-from: options sized to the data and the starting model)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir; given options override"
    )
    p.add_argument("--masks", action="store_true", help="train the mask head too (instance segmentation)")
    p.add_argument(
        "--overwrite", action="store_true", help="start afresh in an --output-dir that holds another run"
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any option, e.g. model.num_queries=50"
    )
    for name, (flag, kind, text) in train_flags().items():
        if kind is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, dest=name, type=kind, default=None, help=text)
    p.set_defaults(run=run)


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    """The options given explicitly on the command line, as ``{"field": value, "model.key": value}``."""
    from ..training.config import parse_assignment

    overrides = {name: getattr(args, name) for name in train_flags() if getattr(args, name) is not None}
    if args.masks:
        overrides["model.masks"] = True
    for assignment in args.set or []:
        key, value = parse_assignment(assignment)
        overrides[key] = value
    return overrides


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..training.config import build_config, flatten, read_config_file
    from ..training.trainer import Trainer

    overrides = overrides_of(args)
    if args.resume:
        if args.preset is not None:
            raise ConfigError("--resume continues a run with its own options: --preset only starts a new run")
        if args.config is not None:
            # The file's options apply as given on the command line (flags still win over them):
            # changed ones are applied and reported, or refused where they would change the model.
            overrides = {**flatten(read_config_file(args.config)), **overrides}
        output_dir = overrides.get("output_dir") or TrainConfig().output_dir
        trainer = Trainer(TrainConfig(output_dir=output_dir), resume=True, overrides=overrides)
    else:
        trainer = Trainer(build_config(args.preset, args.config, overrides), overwrite=args.overwrite)
    trainer.fit()
    return 0
