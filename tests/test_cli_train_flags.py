"""`detrkit train`'s flags are generated from TrainConfig: every field has one (or is excluded on
purpose), each flag sets its own field with the field's type, and its help is the field's."""

import dataclasses

import pytest

from detrkit.cli.app import build_parser
from detrkit.cli.train import overrides_of, train_flags
from detrkit.training.config import TrainConfig, build_config

# Fields without a flag, each for a reason: a dict of model fields is set key by key with
# --set model.KEY=VALUE (and --masks).
EXCLUDED = {"model"}

# A value of each flag's type that differs from the default (what the command line would give).
SAMPLE = {bool: None, int: 3, float: 0.25, str: "x"}


def train_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["train"]


def test_every_field_has_a_flag_or_is_excluded_on_purpose():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    flagged = set(train_flags())
    assert flagged | EXCLUDED == fields
    assert not flagged & EXCLUDED
    options = {s for a in train_parser()._actions for s in a.option_strings}
    for name in flagged:
        assert "--" + name.replace("_", "-") in options, name


def test_the_help_of_a_flag_is_its_fields():
    actions = {a.dest: a for a in train_parser()._actions}
    for field in dataclasses.fields(TrainConfig):
        if field.name in EXCLUDED:
            continue
        assert field.metadata["help"], field.name
        assert actions[field.name].help == field.metadata["help"]


@pytest.mark.parametrize("name", sorted(train_flags()))
def test_each_flag_sets_its_own_field(name):
    flag, kind, _ = train_flags()[name]
    default = getattr(TrainConfig(), name)
    if kind is bool:
        argv, value = [flag if not default else "--no-" + flag[2:]], not default
    else:
        value = SAMPLE[kind] if default != SAMPLE[kind] else SAMPLE[kind] * 2
        argv = [flag, str(value)]
    args = build_parser().parse_args(["train", *argv])
    assert overrides_of(args) == {name: value}
    assert isinstance(overrides_of(args)[name], kind)


def test_flags_reach_the_config_over_preset_and_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 7\nlr: 0.001\n")
    argv = ["train", "--preset", "cpu-tiny", "--config", str(config), "--epochs", "3", "--augment", "none"]
    args = build_parser().parse_args(argv)
    cfg = build_config(args.preset, args.config, overrides_of(args))
    assert (cfg.epochs, cfg.lr, cfg.augment, cfg.batch_size) == (3, 0.001, "none", 16)


def test_no_flag_given_overrides_nothing():
    args = build_parser().parse_args(["train", "--set", "model.num_queries=5", "--masks"])
    assert overrides_of(args) == {"model.num_queries": 5, "model.masks": True}
