"""Annotation files of the wrong shape: the loader (train, eval) and `detrkit data check` name the
same field of the same entry, and no command shows a traceback."""

import copy
import json
import re

import pytest

import detrkit
import detrkit.cli
from conftest import shapes_config
from detrkit.data import CocoDetection, DatasetError, SynthConfig, write_synthetic
from detrkit.data.check import check_annotations

BAD = {
    "image id as text": (
        lambda d: d["images"][0].__setitem__("id", "abc"),
        r"images\[0\].id = 'abc': expected an integer",
    ),
    "image id as float": (lambda d: d["images"][0].__setitem__("id", 1.5), r"images\[0\].id = 1.5"),
    "image id too large": (
        lambda d: d["images"][0].__setitem__("id", 10**30),
        r"images\[0\].id = 1000000000000000000000000000000",
    ),
    "image not an object": (lambda d: d["images"].__setitem__(1, 5), r"images\[1\] is int 5, not an object"),
    "annotation not an object": (lambda d: d["annotations"].__setitem__(0, "x"), r"annotations\[0\] is str"),
    "no file_name": (lambda d: d["images"][0].pop("file_name"), r"images\[0\] \(id 1\) has no 'file_name'"),
    "width as text": (lambda d: d["images"][0].__setitem__("width", "100"), r"images\[0\].width = '100'"),
    "duplicate image ids": (lambda d: d["images"][1].__setitem__("id", 1), r"image id 1 is used 2 times"),
    "duplicate category ids": (
        lambda d: d["categories"][1].__setitem__("id", 1),
        r"category id 1 is used 2 times",
    ),
    "no images": (lambda d: d.__setitem__("images", []), r"the 'images' list is empty"),
    "bbox as text": (
        lambda d: d["annotations"][0].__setitem__("bbox", ["a", 1, 2, 3]),
        r"annotations\[0\].bbox = \['a'",
    ),
    "bbox of 3": (
        lambda d: d["annotations"][0].__setitem__("bbox", [1, 2, 3]),
        r"annotations\[0\].bbox = \[1, 2, 3\]",
    ),
    "bbox NaN": (
        lambda d: d["annotations"][0].__setitem__("bbox", [1, 2, float("nan"), 3]),
        r"annotations\[0\].bbox",
    ),
    "category id as text": (
        lambda d: d["annotations"][0].__setitem__("category_id", "1"),
        r"annotations\[0\].category_id = '1'",
    ),
    "iscrowd 2": (
        lambda d: d["annotations"][0].__setitem__("iscrowd", 2),
        r"annotations\[0\].iscrowd = 2: expected 0 or 1",
    ),
    "categories not a list": (lambda d: d.__setitem__("categories", {"a": 1}), r"'categories' list"),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    write_synthetic(root, SynthConfig(images=3, seed=2), {"train": 3, "val": 2})
    return root


def _broken(dataset, tmp_path, name):
    data = json.loads((dataset / "annotations" / "instances_val2017.json").read_text())
    data = copy.deepcopy(data)
    BAD[name][0](data)
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").symlink_to(dataset / "val2017")
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return root, root / "annotations" / "instances_val2017.json"


@pytest.mark.parametrize("name", list(BAD))
def test_loader_and_data_check_name_the_field_and_the_entry(dataset, tmp_path, name, capsys):
    root, ann = _broken(dataset, tmp_path, name)
    pattern = BAD[name][1]
    with pytest.raises(DatasetError, match=pattern):
        CocoDetection(root / "val2017", ann, None, masks=True)
    report = check_annotations(ann, root / "val2017")
    assert not report.ok
    assert any(re.search(pattern, d) for ds in report.errors.values() for d in ds), report.summary()
    # The commands that read annotations: a clear error, a non-zero exit, no traceback.
    assert detrkit.cli.main(["data", "check", str(ann)]) == 1
    weights = tmp_path / "m.safetensors"
    if not weights.exists():
        detrkit.save_model(detrkit.build_model(shapes_config()), weights)
    assert (
        detrkit.cli.main(["eval", "--weights", str(weights), "--data", str(root), "--num-workers", "0"]) == 2
    )
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "eval: error:" in captured.err
