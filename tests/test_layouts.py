"""Datasets as labelling tools export them are found where they are: the COCO layout, a
Roboflow-style export (one `_annotations.coco.json` per split folder, `train`/`valid` names), and
an `annotations.json` + `images/` folder per split."""

import shutil

import pytest

import detrkit.cli
from conftest import tiny
from detrkit.data.coco import DatasetError
from detrkit.data.layout import resolve_split
from detrkit.training.trainer import Trainer


def export(data_root, root, names, annotation, images="."):
    for split, name in names.items():
        shutil.copytree(data_root / split, root / name / images)
        shutil.copy(data_root / "annotations" / f"instances_{split}.json", root / name / annotation)
    return root


def test_a_roboflow_export_is_found_under_its_split_names_and_trains(tmp_path, data_root, capsys):
    root = export(
        data_root, tmp_path / "roboflow", {"train2017": "train", "val2017": "valid"}, "_annotations.coco.json"
    )
    assert resolve_split(root, "train2017") == (root / "train" / "_annotations.coco.json", root / "train")
    assert resolve_split(root, "val2017") == (root / "valid" / "_annotations.coco.json", root / "valid")
    assert resolve_split(root, "valid") == (root / "valid" / "_annotations.coco.json", root / "valid")
    metrics = Trainer(tiny(tmp_path, root, epochs=1), log=lambda m: None).fit()
    assert metrics["images"] == 4  # the validation split, not the training one
    # `data check` on the export's root finds and checks both files.
    assert detrkit.cli.main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train/_annotations.coco.json" in out and "valid/_annotations.coco.json" in out


def test_an_annotations_json_with_an_images_folder_per_split_is_found(tmp_path, data_root):
    root = export(
        data_root, tmp_path / "other", {"train2017": "train", "val2017": "val"}, "annotations.json", "images"
    )
    assert resolve_split(root, "val2017") == (root / "val" / "annotations.json", root / "val" / "images")
    assert resolve_split(root, "train2017") == (
        root / "train" / "annotations.json",
        root / "train" / "images",
    )


def test_the_coco_layout_comes_first_and_a_missing_split_names_every_place_looked(tmp_path, data_root):
    root = tmp_path / "both"
    shutil.copytree(data_root, root)
    export(data_root, root, {"val2017": "val"}, "_annotations.coco.json")
    assert resolve_split(root, "val2017") == (
        root / "annotations" / "instances_val2017.json",
        root / "val2017",
    )
    with pytest.raises(DatasetError, match=r"no annotations for split 'test2017' .* the same for test\)"):
        resolve_split(root, "test2017")


def test_cvat_and_label_studio_exports_train_and_are_checked(tmp_path, data_root, capsys):
    import json

    # CVAT's COCO 1.0: annotations/instances_default.json, the images in images/.
    cvat = tmp_path / "cvat"
    shutil.copytree(data_root / "train2017", cvat / "images")
    (cvat / "annotations").mkdir()
    shutil.copy(
        data_root / "annotations/instances_train2017.json", cvat / "annotations/instances_default.json"
    )
    # Label Studio's COCO: result.json whose file names start with images/.
    studio = tmp_path / "label-studio"
    shutil.copytree(data_root / "train2017", studio / "images")
    data = json.loads((data_root / "annotations/instances_train2017.json").read_text())
    for image in data["images"]:
        image["file_name"] = f"images/{image['file_name']}"
    (studio / "result.json").write_text(json.dumps(data))
    for root, ann, images in (
        (cvat, cvat / "annotations/instances_default.json", cvat / "images"),
        (studio, studio / "result.json", studio),
    ):
        assert resolve_split(root, "train2017") == resolve_split(root, "val2017") == (ann, images)
        messages = []
        metrics = Trainer(tiny(tmp_path / root.name, root, epochs=1), log=messages.append).fit()
        assert metrics["images"] == 8  # one file: validated on the training images, and told so
        assert any("used for training and validation alike" in m for m in messages)
        capsys.readouterr()
        assert detrkit.cli.main(["data", "check", str(root)]) == 0
        out = capsys.readouterr().out
        assert str(ann) in out and "images not checked" not in out
