"""The fine-tuning recipe (``detrkit train --preset finetune --init-from W --data D``): options sized
to the dataset and the starting model, each with its reason, printed in one block.

A DETR fine-tuned on a few hundred images is the case its users most often get wrong ("AP = 0 after
fine-tuning"): the paper's recipe (300 epochs of 118k images, the backbone at a tenth of the
rate) either stops long before a small set has been seen often enough, or overfits the backbone on
it. What the recipe picks, and why:

- the training size of the starting model (its ``image_scale``): its features were learned there;
- a backbone frozen below 200 training images (too few to retrain it without overfitting; the
  pretrained features carry over, and a step without the backbone's backward takes about half
  the time), trained at a tenth of the transformer's rate above;
- a length that shows every image about as often as a small set needs: ``15000 / images`` epochs,
  between 12 and 300 (50 images: 300 epochs; 400: 38; 5000 and more: 12);
- a constant rate, then a linear decay to 0 over the last quarter of the run (its epochs, or its
  ``--time-budget`` when that ends it first): the best schedule of the CPU convergence runs;
- 4 query groups below 2000 images (Group DETR: more matched queries per image, the largest
  per-epoch gain measured; training only, the saved model stays a plain DETR);
- strong augmentation (colour jitter on top of the paper's flips, resizes and crops) below 500
  images, the paper's above;
- an evaluation about 25 times per run.

Every choice is a plain training option: a flag, ``--set`` or a config file overrides it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Below this many training images the backbone stays frozen (docs/guides/fine-tuning.md: on 400
# images a frozen one made epochs 2x shorter but ended 1.4 AP50 lower in the same 5 minutes).
FREEZE_BELOW = 200
# Below this many, strong augmentation (colour jitter on top of the paper's); on 400 images the
# paper's alone ended 0.8 AP50 lower (within the noise of one run).
STRONG_BELOW = 500


@dataclass(frozen=True)
class DataStats:
    """What the recipe reads of a training split."""

    images: int
    objects: int | None  # None where unknown before the data is made (the synthetic dataset)


@dataclass(frozen=True)
class Choice:
    option: str
    value: Any
    why: str


def recipe(stats: DataStats, image_scale: float | None) -> list[Choice]:
    """The recipe's options for ``stats`` from a model trained at ``image_scale`` (None: not said)."""
    n = stats.images
    choices = []
    if image_scale is not None:
        choices.append(Choice("image_scale", image_scale, "the size the starting model was trained at"))
    frozen = n < FREEZE_BELOW
    choices.append(
        Choice(
            "freeze_backbone",
            frozen,
            f"{n} images: too few to retrain the backbone; its pretrained features carry over"
            if frozen
            else f"{n} images: enough to adapt the backbone, at a tenth of the rate",
        )  # fmt: skip
    )
    choices += [Choice("lr", 1e-4, "the paper's rate for the transformer and heads")]
    if not frozen:
        choices.append(Choice("lr_backbone", 1e-5, "a tenth of the transformer's, as in the paper"))
    epochs = min(300, max(12, round(15000 / max(n, 1))))
    choices += [
        Choice("epochs", epochs, f"15000 / {n} images, within [12, 300]: each image seen as often as a small set needs"),
        Choice("lr_schedule", "linear", "constant, then a linear decay to 0 (over the epochs or --time-budget)"),
        Choice("lr_decay_fraction", 0.25, "the decay over the last quarter: the best of the CPU convergence runs"),
    ]  # fmt: skip
    groups = 4 if n < 2000 else 1
    choices.append(
        Choice(
            "query_groups",
            groups,
            "Group DETR: more matched queries per image, the largest per-epoch gain measured"
            if groups > 1
            else f"{n} images: enough matches per epoch without query groups",
        )  # fmt: skip
    )
    strong = n < STRONG_BELOW
    choices.append(
        Choice(
            "augment",
            "strong" if strong else "paper",
            f"{n} images: colour jitter on top of the paper's flips, resizes and crops"
            if strong
            else "the paper's flips, resizes and crops",
        )  # fmt: skip
    )
    choices.append(Choice("eval_every", max(1, epochs // 25), "about 25 evaluations per run"))
    return choices


def describe(choices: list[Choice], chosen: dict[str, Any], stats: DataStats, source: str) -> str:
    """The block ``train`` prints: each option, its value and why, or the value the user set."""
    objects = "" if stats.objects is None else f", {stats.objects} objects"
    lines = [f"fine-tuning recipe for {stats.images} training images{objects}, from {source}:"]
    width = max(len(c.option) for c in choices)
    for c in choices:
        if c.option in chosen and chosen[c.option] != c.value:
            lines.append(
                f"  {c.option:<{width}}  {chosen[c.option]!s:<8} (yours; the recipe's: {c.value}, {c.why})"
            )
        else:
            lines.append(f"  {c.option:<{width}}  {c.value!s:<8} {c.why}")
    lines.append("  (each is a training option: a flag, --set or a config file overrides it)")
    return "\n".join(lines)


def data_stats(data: str, split: str, data_format: str, synth_images: int) -> DataStats:
    """Images and objects of the training split (annotations only: no image is decoded)."""
    if data == "synthetic":
        return DataStats(synth_images, None)
    from ..data.coco import DatasetError
    from ..data.formats import open_split
    from ..fileio import read_json_file

    opened = open_split(data, split, data_format)
    annotations = opened.annotations
    if not isinstance(annotations, dict):  # a COCO file, read here; other formats' readers built a dict
        annotations = read_json_file(annotations, error=DatasetError, what="annotation file")
    images, objects = annotations.get("images"), annotations.get("annotations")
    if not isinstance(images, list) or not isinstance(objects, list):
        raise DatasetError(
            f"{opened.source}: expected a COCO JSON object with 'images' and 'annotations' lists"
        )
    return DataStats(len(images), sum(1 for a in objects if isinstance(a, dict) and not a.get("iscrowd")))


def finetune_options(chosen: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The recipe's options for a run whose user-chosen options are ``chosen`` (nested dict: data,
    init_from, ...); logs the block. The caller merges ``chosen`` over the result."""
    from ..checkpoints.io import config_of
    from ..errors import ConfigError
    from .config import TrainConfig

    source = chosen.get("init_from")
    if not source:
        raise ConfigError("--preset finetune adapts a trained model to new data: give --init-from WEIGHTS")
    defaults = TrainConfig()
    stats = data_stats(
        str(chosen.get("data", defaults.data)),
        str(chosen.get("train_split", defaults.train_split)),
        str(chosen.get("data_format", defaults.data_format)),
        int(chosen.get("synth_images", defaults.synth_images)),
    )
    if stats.images == 0:
        raise ConfigError(f"--preset finetune: the training split of {chosen.get('data')} has no image")
    scale = config_of(source).extra.get("image_scale")
    choices = recipe(stats, None if scale is None else float(scale))
    log(describe(choices, chosen, stats, str(source)))
    return {c.option: c.value for c in choices}
