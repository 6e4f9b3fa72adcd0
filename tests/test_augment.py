"""Augmentation presets and switches: none is the evaluation resize, the paper preset is DETR's
recipe unchanged, flips can be turned off (no sample mirrored), and data preview draws the grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

import detrkit.cli
from detrkit.data.transforms import (
    TransformConfig,
    augmentation,
    denormalize,
    eval_transforms,
    train_transforms,
)
from detrkit.errors import ConfigError
from detrkit.training.config import TrainConfig


def gradient_sample(width=160, height=120):
    """Red rising left to right, one box on the left: a mirror shows in both."""
    red = np.tile(np.linspace(0, 255, width, dtype=np.float64), (height, 1))
    pixels = np.stack([red, np.full_like(red, 60), np.full_like(red, 60)], -1).astype(np.uint8)
    image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1))
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            [[10.0, 40.0, 50.0, 80.0]], format="XYXY", canvas_size=(height, width)
        ),
        "labels": torch.tensor([1]),
    }
    return image, target


def mirrored(image: torch.Tensor) -> bool:
    red = denormalize(image)[0].mean(0)  # per column
    return bool(red[-1] < red[0])


def run(transforms, seed):
    torch.manual_seed(seed)
    image, target = gradient_sample()
    return transforms(image, target)


def test_none_is_the_evaluation_resize():
    for seed in range(5):
        image, target = run(augmentation("none", 0.2), seed)
        reference, ref_target = run(eval_transforms(TransformConfig.scaled(0.2)), seed)
        assert torch.equal(image, reference) and torch.equal(target["boxes"], ref_target["boxes"])


def test_the_paper_preset_is_detrs_recipe_unchanged():
    for seed in range(10):
        image, target = run(augmentation("paper", 0.2), seed)
        reference, ref_target = run(train_transforms(TransformConfig.scaled(0.2)), seed)
        assert torch.equal(image, reference) and torch.equal(target["boxes"], ref_target["boxes"])


def test_with_flips_off_no_sample_is_mirrored():
    flips = [mirrored(run(augmentation("strong", 0.2), seed)[0]) for seed in range(40)]
    assert any(flips) and not all(flips)  # the preset flips about half the samples...
    for preset in ("light", "paper", "strong"):
        assert not any(mirrored(run(augmentation(preset, 0.2, hflip=False), seed)[0]) for seed in range(40))


def test_switches_reach_the_transforms():
    sizes = {tuple(run(augmentation("light", 1.0, crop=False, scale_min=256, scale_max=320), s)[0].shape[-2:])
             for s in range(30)}  # fmt: skip
    assert {h for h, _ in sizes} <= {256, 288, 320}  # the shorter side, from the asked range only
    jittered = run(augmentation("paper", 0.2, color_jitter=0.8, hflip=False, crop=False), 0)[0]
    plain = run(augmentation("paper", 0.2, color_jitter=0.0, hflip=False, crop=False), 0)[0]
    assert jittered.shape == plain.shape and not torch.allclose(jittered, plain)


@pytest.mark.parametrize(
    "fields,message",
    [({"augment": "heavy"}, "augment='heavy': expected one of none, light, paper, strong"),
     ({"color_jitter": 1.5}, "color_jitter=1.5: must be in"),
     ({"scale_min": 900, "scale_max": 800}, "need 0 < scale_min <= scale_max"),
     ({"scale_max": 5000}, "scale_max=5000: at most 1333")],
)  # fmt: skip
def test_bad_augmentation_options_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TrainConfig(**fields)


def test_older_on_off_configs_still_read():
    assert TrainConfig(augment=False).augment == "none" and TrainConfig(augment=True).augment == "paper"


def test_data_preview_writes_the_grid(tmp_path, data_root, capsys):
    out = tmp_path / "grid.png"
    argv = ["data", "preview", str(data_root), "--out", str(out), "--count", "6", "--image-scale", "0.15"]
    assert detrkit.cli.main(argv) == 0
    grid = Image.open(out)
    assert grid.format == "PNG" and grid.width > 3 * 60
    assert detrkit.cli.main(argv) == 2  # an existing --out is not replaced unasked
    assert "--out" in capsys.readouterr().err
