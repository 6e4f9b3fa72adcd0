"""``data check --model``: each usual cause of a zero AP, on a dataset built to have it, and a clean
dataset that passes."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import detrkit
import detrkit.cli
from conftest import shapes_config
from detrkit.data.check import CheckReport
from detrkit.evaluation.doctor import check_for_model

CONFIG = shapes_config(num_queries=10)  # ids 1, 2, 4, 7; image_scale 0.15: shorter side 120 px


def clean_dataset(seed: int = 0) -> dict:
    """40 images of 200x150, three objects of 24-60 px each, every class 30 times."""
    rng = np.random.default_rng(seed)
    data = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": n} for i, n in zip(CONFIG.category_ids, CONFIG.class_names)],
    }
    for image_id in range(1, 41):
        data["images"].append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 200, "height": 150})
        for k in range(3):
            w, h = rng.uniform(24, 60, 2)
            x, y = rng.uniform(0, 200 - w), rng.uniform(0, 150 - h)
            category = CONFIG.category_ids[(image_id * 3 + k) % 4]
            data["annotations"].append({
                "id": len(data["annotations"]) + 1, "image_id": image_id, "category_id": category,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })  # fmt: skip
    return data


def unknown_class(data):
    data["categories"].append({"id": 99, "name": "hexagon"})
    for a in data["annotations"][:5]:
        a["category_id"] = 99


def renamed_class(data):
    data["categories"][0]["name"] = "box"


def xyxy_boxes(data):
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        a["bbox"] = [x, y, x + w, y + h]


def tiny_objects(data):
    for a in data["annotations"]:
        a["bbox"][2:] = [3.0, 3.0]


def huge_images(data):
    for image in data["images"]:
        image["width"], image["height"] = 4000, 3000
    for a in data["annotations"]:
        a["bbox"] = [v * 20 for v in a["bbox"]]


def rare_class(data):
    rare = [a for a in data["annotations"] if a["category_id"] == 7]
    drop = {a["id"] for a in rare[3:]}
    data["annotations"] = [a for a in data["annotations"] if a["id"] not in drop]


def crowded_image(data):
    for k in range(11):
        data["annotations"].append({
            "id": 1000 + k, "image_id": 1, "category_id": 1, "bbox": [k * 10.0, 10.0, 9.0, 9.0],
            "area": 81.0, "iscrowd": 0,
        })  # fmt: skip


def unmappable(data):
    data["categories"].append({"id": 50, "name": "extra"})


CASES = [
    (unknown_class, CONFIG, "error", "category ids that match no model class", "(99) with 5 objects"),
    (renamed_class, CONFIG, "warning", "classes the model names differently", "1: 'rectangle' / 'box'"),
    (xyxy_boxes, CONFIG, "error", "boxes that look like [x1, y1, x2, y2]", "but fit as [x1, y1, x2, y2]"),
    (tiny_objects, CONFIG, "warning", "objects too small for the model's input size", "120 of 120 objects"),
    (huge_images, CONFIG, "warning", "images much larger than the model's input size", "shrunk 25.0x"),
    (rare_class, CONFIG, "warning", "classes with fewer than 10 objects", "'diamond' (id 7): 3 object(s)"),
    (crowded_image, CONFIG, "error", "more objects than queries", "up to 14, e.g. image 1"),
    (unmappable, shapes_config(category_ids=None), "error", "classes the model cannot map", "5 categories"),
]


def run(data, config) -> CheckReport:
    report = CheckReport("test")
    check_for_model(data, config, report)
    return report


def test_a_clean_dataset_passes():
    report = run(clean_dataset(), CONFIG)
    assert not report.errors and not report.warnings, report.summary()


@pytest.mark.parametrize("spoil,config,level,kind,detail", CASES, ids=[c[0].__name__ for c in CASES])
def test_each_cause_is_flagged(spoil, config, level, kind, detail):
    data = copy.deepcopy(clean_dataset())
    spoil(data)
    report = run(data, config)
    found = report.errors if level == "error" else report.warnings
    kinds = [k for k in found if k.startswith(kind)]
    assert kinds, report.summary()
    assert any(detail in d for d in found[kinds[0]]), report.summary()
    # Nothing else is blamed: the other groups stay clean.
    others = {**report.errors, **report.warnings}
    assert set(others) == set(kinds), report.summary()


def test_data_check_model_from_the_command_line(tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    detrkit.save_model(detrkit.build_model(CONFIG), weights)
    (tmp_path / "annotations").mkdir()
    for name, spoil in (("val2017", None), ("train2017", xyxy_boxes)):
        data = clean_dataset()
        if spoil:
            spoil(data)
        (tmp_path / f"annotations/instances_{name}.json").write_text(json.dumps(data))
    assert detrkit.cli.main(["data", "check", str(tmp_path), "--model", str(weights)]) == 1
    out = capsys.readouterr().out
    train, val = out.split("instances_val2017.json")
    assert "boxes that look like [x1, y1, x2, y2]" in train and "FAILED" in train
    assert "look like" not in val and "OK: 0 error(s)" in val


def test_seventy_percent_of_the_queries_is_not_yet_a_warning():
    data = clean_dataset()
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 1]
    for k in range(7):  # 7 objects for 10 queries: exactly 70%
        data["annotations"].append({
            "id": 2000 + k, "image_id": 1, "category_id": 1, "bbox": [k * 20.0, 10.0, 18.0, 18.0],
            "area": 324.0, "iscrowd": 0,
        })  # fmt: skip
    assert "nearly as many objects as queries" not in run(data, CONFIG).warnings
    data["annotations"].append({**data["annotations"][-1], "id": 3000, "bbox": [150.0, 60.0, 18.0, 18.0]})
    assert "nearly as many objects as queries" in run(data, CONFIG).warnings
