"""The fine-tuning recipe (``--preset finetune``): choices sized to the data, printed with their
reasons, overridable; a fine-tuned model keeps the new data's classes through save, load and eval."""

from __future__ import annotations

import json

import pytest
import torch

import detrkit
from conftest import tiny_config
from detrkit.cli import main
from detrkit.errors import ConfigError
from detrkit.training.config import build_config
from detrkit.training.finetune import DataStats, recipe
from detrkit.training.run_dir import BEST


def chosen(images: int) -> dict:
    return {c.option: c.value for c in recipe(DataStats(images, 3 * images), image_scale=0.12)}


def test_the_recipe_sizes_itself_to_the_data():
    few, some, many = chosen(50), chosen(400), chosen(5000)
    # Each image seen about as often as a small set needs: 15000 / images epochs, within [12, 300].
    assert (few["epochs"], some["epochs"], many["epochs"]) == (300, 38, 12)
    assert chosen(30)["epochs"] == 300 and chosen(100_000)["epochs"] == 12
    # Too few images to retrain the backbone: frozen below 200, a tenth of the rate above.
    assert few["freeze_backbone"] and not some["freeze_backbone"] and not many["freeze_backbone"]
    assert "lr_backbone" not in few and some["lr_backbone"] == pytest.approx(some["lr"] / 10)
    assert (chosen(199)["freeze_backbone"], chosen(200)["freeze_backbone"]) == (True, False)
    assert (few["query_groups"], many["query_groups"]) == (4, 1)
    assert (chosen(499)["augment"], chosen(500)["augment"]) == ("strong", "paper")
    assert (few["eval_every"], some["eval_every"], many["eval_every"]) == (12, 1, 1)
    assert few["image_scale"] == 0.12 and few["lr_schedule"] == "linear" and few["lr_decay_fraction"] == 0.25
    assert "image_scale" not in {c.option for c in recipe(DataStats(50, None), image_scale=None)}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """Start weights of other classes (ids 50 and 60) than the data's, trained at scale 0.12."""
    torch.manual_seed(0)
    config = tiny_config(
        num_classes=2, category_ids=(50, 60), class_names=("a", "b"), extra={"image_scale": 0.12}
    )
    path = tmp_path_factory.mktemp("start") / "start.safetensors"
    detrkit.save_model(detrkit.build_model(config), path)
    return path


def test_the_recipe_is_printed_and_every_choice_can_be_overridden(start, data_root, tmp_path):
    lines = []
    overrides = {"init_from": str(start), "data": str(data_root), "epochs": 7, "output_dir": str(tmp_path)}
    config = build_config("finetune", overrides=overrides, log=lines.append)
    # data_root: 8 training images with their objects, from a model trained at scale 0.12.
    assert (config.epochs, config.freeze_backbone, config.query_groups, config.augment) == (
        7,
        True,
        4,
        "strong",
    )
    assert config.image_scale == 0.12 and config.init_from == str(start)
    block = lines[0]
    annotations = json.loads((data_root / "annotations" / "instances_train2017.json").read_text())
    objects = sum(1 for a in annotations["annotations"] if not a.get("iscrowd"))
    assert block.startswith(f"fine-tuning recipe for 8 training images, {objects} objects, from {start}:")
    assert block.endswith("(each is a training option: a flag, --set or a config file overrides it)")
    assert "epochs             7        (yours; the recipe's: 300" in block
    assert "freeze_backbone    True     8 images: too few to retrain the backbone" in block
    # A config file or --set overrides as a flag does; no init_from is refused.
    assert build_config("finetune", overrides={**overrides, "augment": "none"}, log=print).augment == "none"
    with pytest.raises(ConfigError, match="give --init-from WEIGHTS"):
        build_config("finetune", overrides={"data": str(data_root)})
    with pytest.raises(ConfigError, match="unknown preset 'finetuned'.*finetune"):
        build_config("finetuned", overrides=overrides)
    # A training split without images has nothing to size a recipe to.
    empty = tmp_path / "empty"
    (empty / "annotations").mkdir(parents=True)
    (empty / "train2017").mkdir()
    (empty / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": annotations["categories"]})
    )
    with pytest.raises(ConfigError, match="has no image"):
        build_config("finetune", overrides={**overrides, "data": str(empty)})


def test_the_reasons_follow_the_choices():
    few = {c.option: c.why for c in recipe(DataStats(50, 150), image_scale=None)}
    many = {c.option: c.why for c in recipe(DataStats(5000, 15000), image_scale=None)}
    assert "Group DETR" in few["query_groups"] and "without query groups" in many["query_groups"]
    assert "colour jitter" in few["augment"] and many["augment"] == "the paper's flips, resizes and crops"
    assert "too few to retrain" in few["freeze_backbone"] and "enough to adapt" in many["freeze_backbone"]


def test_a_fine_tuned_model_keeps_the_new_classes_through_save_load_and_eval(
    start, data_root, tmp_path, capsys
):
    run = tmp_path / "run"
    args = ["train", "--preset", "finetune", "--init-from", str(start), "--data", str(data_root),
            "--output-dir", str(run), "--epochs", "1", "--batch-size", "4", "--num-workers", "0"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fine-tuning recipe for 8 training images" in printed and "re-initialised" in printed
    model = detrkit.load_model(run / BEST)
    assert model.config.class_names == ("rectangle", "ellipse", "triangle", "diamond")
    assert model.config.category_ids == (1, 2, 4, 7)
    assert model.config.extra["image_scale"] == 0.12
    out = tmp_path / "eval"
    assert main(["eval", "--weights", str(run / BEST), "--data", str(data_root), "--out", str(out),
                 "--num-workers", "0"]) == 0  # fmt: skip
    results = (out / "results.json").read_text()
    assert '"category_id": 7' in results and '"category_id": 50' not in results
