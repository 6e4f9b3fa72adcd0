"""Interop with supervision (the real library): Detections both ways, and a DetectionDataset as data."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require
from detrkit.data import CocoDetection, SynthConfig, write_synthetic
from detrkit.data.supervision import from_supervision_dataset
from detrkit.inference.detector import Detections


@pytest.fixture(scope="module")
def sv():
    require("supervision")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its note that OpenCV is absent
        import supervision

    return supervision


def test_detections_round_trip_through_supervision(sv):
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, :3, :4] = True
    masks[1, 2:, 5:] = True
    ours = Detections(
        boxes=torch.tensor([[0.0, 0.0, 4.0, 3.0], [5.0, 2.0, 8.0, 6.0]]),
        scores=torch.tensor([0.9, 0.6]),
        labels=torch.tensor([7, 3]),
        names=["cat", "dog"],
        masks=masks,
    )
    theirs = ours.to_supervision()
    assert isinstance(theirs, sv.Detections)
    np.testing.assert_array_equal(theirs.xyxy, ours.boxes.numpy())
    np.testing.assert_array_equal(theirs.class_id, [7, 3])
    np.testing.assert_array_equal(theirs.mask, masks.numpy())
    assert list(theirs.data["class_name"]) == ["cat", "dog"]
    back = Detections.from_supervision(theirs[::-1])  # in another order: sorted by score again
    assert torch.equal(back.boxes, ours.boxes) and torch.equal(back.labels, ours.labels)
    assert torch.equal(back.scores, ours.scores) and back.names == ours.names
    assert torch.equal(back.masks, masks)
    # Without names in data: from the given class names, by id.
    plain = sv.Detections(xyxy=np.array([[1.0, 1.0, 2.0, 2.0]]), class_id=np.array([1]))
    assert Detections.from_supervision(plain, class_names=["a", "b"]).names == ["b"]


def test_a_supervision_dataset_is_detrkit_data(sv, tmp_path):
    root = write_synthetic(
        tmp_path / "shapes", SynthConfig(images=4, seed=5, min_size=64, max_size=96), {"train": 4}
    )
    ann = root / "annotations/instances_train2017.json"
    dataset = sv.DetectionDataset.from_coco(
        images_directory_path=str(root / "train2017"), annotations_path=str(ann)
    )
    coco = from_supervision_dataset(dataset)
    original = json.loads(ann.read_text())
    names = {c["id"]: c["name"] for c in original["categories"]}
    ours_names = {c["id"]: c["name"] for c in coco["categories"]}
    by_file = lambda data, n: sorted(  # noqa: E731
        (Path(i["file_name"]).name, n[a["category_id"]], [round(v, 3) for v in a["bbox"]])
        for i in data["images"] for a in data["annotations"] if a["image_id"] == i["id"]
    )  # fmt: skip
    assert by_file(coco, ours_names) == by_file(original, names)
    # ...and it loads as a dataset, masks included.
    loaded = CocoDetection(Path("/"), coco, masks=True)
    image, target = loaded[0]
    assert target["masks"].shape[0] == len(target["boxes"]) > 0 and target["masks"].any()


def test_a_supervision_dataset_trains(sv, tmp_path):
    """A DetectionDataset, through from_supervision_dataset, is what Trainer trains and evaluates on."""
    from conftest import tiny
    from detrkit.data.transforms import TransformConfig, eval_transforms, train_transforms
    from detrkit.training.trainer import Trainer

    root = write_synthetic(
        tmp_path / "s", SynthConfig(images=6, seed=1, min_size=64, max_size=96), {"train": 6, "val": 3}
    )
    splits = {
        split: from_supervision_dataset(
            sv.DetectionDataset.from_coco(
                images_directory_path=str(root / f"{split}2017"),
                annotations_path=str(root / f"annotations/instances_{split}2017.json"),
            )
        )
        for split in ("train", "val")
    }
    sizes = TransformConfig.scaled(0.12)
    train = CocoDetection(Path("/"), splits["train"], train_transforms(sizes))
    val = CocoDetection(Path("/"), splits["val"], eval_transforms(sizes), category_map=train.category_map)
    trainer = Trainer(tiny(tmp_path, root, epochs=1), datasets=(train, val), log=lambda m: None)
    metrics = trainer.fit()
    assert metrics["images"] == 3 and trainer.model.config.class_names == tuple(sv_classes(splits))


def sv_classes(splits):
    return [c["name"] for c in sorted(splits["train"]["categories"], key=lambda c: c["id"])]
