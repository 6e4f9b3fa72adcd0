"""Segmentations are checked before pycocotools decodes them (loader with masks=True, data check).

pycocotools trusts its input: a NaN polygon coordinate makes it allocate without bound, inf / 1e12 /
-1e9 crash the process, a wrong RLE size or short counts give garbage masks. Nothing here lets a bad
value reach pycocotools in the test process itself; the one test that runs the whole path (data
check, then a masks=True dataset and its first sample) does it in a subprocess with a memory limit.
"""

import json
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import detrkit
import detrkit.cli
from detrkit.data import CocoDetection, DatasetError, SynthConfig, make_synthetic, write_synthetic
from detrkit.data import segmentations as segm_check
from detrkit.data.check import check_annotations

W, H = 100, 80  # the image the table's segmentations are checked against
_SQUARE = {"size": [H, W], "counts": [10 * H, 20, 90 * H - 20]}  # an uncompressed RLE of the right sum
_COMPRESSED = mask_utils.encode(np.asfortranarray(np.pad(np.ones((20, 30), np.uint8), ((5, 55), (7, 63)))))
GOOD_STRING = _COMPRESSED["counts"].decode("ascii")

BAD = {
    # name: (segmentation, what the reason must say)
    "nan": ([[10, 10, float("nan"), 10, 30, 30]], r"polygon 0 point 1 \(nan, 10\) is not finite"),
    "inf": ([[10, 10, 30, float("inf"), 30, 30]], r"polygon 0 point 1 \(30, inf\) is not finite"),
    "-inf": ([[10, 10, 30, 10, -float("inf"), 30]], r"point 2 \(-inf, 30\) is not finite"),
    "1e12": ([[10, 10, 1e12, 10, 30, 30]], r"point 1 \(1e\+12, 10\) is far outside the 100x80 image"),
    "-1e9": ([[10, 10, 30, 10, 30, -1e9]], r"point 2 \(30, -1e\+09\) is far outside"),
    "3x width": ([[10, 10, 300, 10, 30, 30]], r"far outside the 100x80 image .*x -100\.\.200, y -80\.\.160"),
    "second ring": ([[10, 10, 30, 10, 30, 30], [1, 1, 2, 2, 3, float("nan")]], r"polygon 1 point 2"),
    "odd length": ([[10, 10, 30, 10, 30, 30, 5]], r"polygon 0 has an odd number of coordinates \(7\)"),
    "4 numbers": ([[10, 10, 30, 30]], r"polygon 0 has 4 number\(s\); a polygon needs at least 3 points"),
    "empty ring": ([[10, 10, 30, 10, 30, 30], []], r"polygon 1 has 0 number\(s\)"),
    "points as pairs": ([[[10, 10], [30, 10], [30, 30]]], r"polygon 0 is a list of points"),
    "flat list": ([10, 10, 30, 10, 30, 30], r"polygon 0 is an int \(10\), not a list of coordinates"),
    "string coordinate": ([[10, 10, "30", 10, 30, 30]], r"polygon 0 holds a str \('30'\), not a number"),
    "null coordinate": ([[10, 10, None, 10, 30, 30]], r"polygon 0 holds a NoneType \(None\), not a number"),
    "dict ring": ([{"x": 1}], r"polygon 0 is a dict"),
    "string": ("10 10 30 10 30 30", r"segmentation is a str .*expected polygons"),
    "number": (7, r"segmentation is an int \(7\), expected polygons"),
    "RLE wrong size": ({"size": [H, W + 1], "counts": [H * (W + 1)]}, r"RLE size \[80, 101\] does not match"),
    "RLE size swapped": (
        {"size": [W, H], "counts": [W * H]},
        r"RLE size \[100, 80\] does not match .*\[80, 100\]",
    ),
    "RLE no size": ({"counts": [W * H]}, r"RLE size None is not \[height, width\]"),
    "RLE counts short": ({"size": [H, W], "counts": [100, 50]}, r"counts sum to 150, not the 80x100 = 8000"),
    "RLE counts long": ({"size": [H, W], "counts": [7000, 5000]}, r"counts sum to 12000, not the 80x100"),
    "RLE negative count": ({"size": [H, W], "counts": [100, -50, 7950]}, r"negative run length \(-50\)"),
    "RLE string counts": ({"size": [H, W], "counts": ["100", 7900]}, r"must be a non-empty list of whole"),
    "RLE counts a number": ({"size": [H, W], "counts": 8000}, r"RLE counts are an int \(8000\)"),
    "compressed wrong size": (
        {"size": [H + 20, W], "counts": GOOD_STRING},
        r"RLE size \[100, 100\] does not",
    ),
    "compressed too few pixels": (
        {"size": [H, W], "counts": "PV1"},
        r"cover \d+ pixel\(s\), not the image's 8000",
    ),
    "compressed not ASCII": (
        {"size": [H, W], "counts": "ab\u00e9"},
        r"compressed RLE counts are not an ASCII",
    ),
    "compressed cut mid-number": ({"size": [H, W], "counts": GOOD_STRING + "P"}, r"not a COCO RLE string"),
    "compressed bad characters": ({"size": [H, W], "counts": "~~~0"}, r"not a COCO RLE string"),
}

GOOD = {
    "triangle": [[10, 10, 30, 10, 30, 30]],
    "two rings": [[10, 10, 30, 10, 30, 30], [50, 50, 60, 50, 60, 60, 50, 60]],
    # Real exports (CVAT, Labelbox, Roboflow) have vertices a little outside the image.
    "slightly outside": [[-0.6, -1.2, W + 0.8, -0.3, W + 1.5, H + 0.9, -2.0, H + 0.4]],
    "integer coordinates": [[0, 0, W, 0, W, H]],
    "uncompressed RLE": _SQUARE,
    "uncompressed RLE, float counts": {"size": [H, W], "counts": [float(c) for c in _SQUARE["counts"]]},
    "compressed RLE": {"size": [H, W], "counts": GOOD_STRING},
    "compressed RLE, bytes": {"size": [H, W], "counts": _COMPRESSED["counts"]},
    "missing": None,  # box-only annotations
    "empty list": [],
}


def _ann(segmentation, ann_id=1):
    ann = {"id": ann_id, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 0}
    if segmentation is not None:
        ann["segmentation"] = segmentation
    return ann


@pytest.mark.parametrize("name", list(BAD))
def test_validate_segmentation_names_the_problem(name):
    segmentation, reason = BAD[name]
    found = segm_check.validate_segmentation(_ann(segmentation), W, H)
    assert found is not None and re.search(reason, found), found


@pytest.mark.parametrize("name", list(GOOD))
def test_validate_segmentation_accepts_good_data(name):
    assert segm_check.validate_segmentation(_ann(GOOD[name]), W, H) is None


def test_image_size_is_needed_to_validate_a_mask():
    polygon = _ann([[1, 1, 5, 1, 5, 5]])
    for width, height in ((None, None), (100.5, 80), (0, 80), ("100", 80), (True, 80)):
        assert "width and height" in segm_check.validate_segmentation(polygon, width, height)
    assert segm_check.validate_segmentation(polygon, 100.0, 80.0) is None
    assert segm_check.validate_segmentation(_ann(None), None, None) is None  # nothing to decode


def test_bulk_validation_equals_one_at_a_time(monkeypatch):
    """The vectorised pass (all coordinates / RLE strings at once, in batches) finds exactly what
    one annotation at a time finds, whatever the batch boundaries."""
    segmentations = [*BAD.values(), *((s, None) for s in GOOD.values())] * 3
    items = [(_ann(s, i), W, H) for i, (s, _) in enumerate(segmentations)]
    one_by_one = [(i, segm_check.validate_segmentation(a, W, H)) for i, (a, _, _) in enumerate(items)]
    expected = [(i, r) for i, r in one_by_one if r is not None]
    assert len(expected) == 3 * len(BAD)
    assert segm_check.find_bad_segmentations(items) == expected
    monkeypatch.setattr(segm_check, "_BATCH", 7)  # flush after nearly every annotation
    assert segm_check.find_bad_segmentations(items) == expected


def test_compressed_rle_decoding_matches_pycocotools():
    """The vectorised reader of compressed RLE strings gives pycocotools' run lengths."""
    rng = np.random.default_rng(0)
    strings, expected = [], []
    for k in range(60):
        h, w = rng.integers(1, 70, size=2)
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if k % 5 == 0:
            mask[:] = k % 2  # all background, all foreground
        strings.append(mask_utils.encode(np.asfortranarray(mask))["counts"])
        flat = mask.flatten(order="F")  # COCO RLE runs go down the columns, background first
        edges = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()
        expected.append([0, *runs] if flat[0] else runs)
    big = np.zeros((1500, 2000), np.uint8)
    big[100:1400:3, 5:1990] = 1  # long runs: numbers of several characters, negative differences
    strings.append(mask_utils.encode(np.asfortranarray(big))["counts"])
    expected.append(mask_utils.decode({"size": [1500, 2000], "counts": strings[-1]}).flatten("F"))
    runs, string_of_run, too_long = segm_check._decode_rle_strings(strings)
    assert not too_long.any()
    for k, want in enumerate(expected[:-1]):
        assert runs[string_of_run == k].tolist() == want
    last = runs[string_of_run == len(strings) - 1]
    assert (
        last.sum() == big.size and np.repeat(np.arange(len(last)) % 2, last).tolist() == expected[-1].tolist()
    )


# --- the loader and `data check` ----------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(SynthConfig(images=2, seed=3, empty_fraction=0.0))


def _with_segmentation(synthetic, segmentation):
    """The synthetic instances with the first annotation of the first image replaced: (data, that
    annotation, its image)."""
    data = json.loads(json.dumps(synthetic["instances"]))
    image = data["images"][0]
    ann = next(a for a in data["annotations"] if a["image_id"] == image["id"])
    ann["segmentation"] = _fit(segmentation, image["width"], image["height"])
    return data, ann, image


def _fit(segmentation, width, height):
    """A table segmentation for the real image: RLE sizes that said [H, W] say this image's."""
    if isinstance(segmentation, dict) and segmentation.get("size") == [H, W]:
        counts = segmentation["counts"]
        if isinstance(counts, list) and sum(c for c in counts if isinstance(c, int)) == H * W:
            counts = [*counts[:-1], counts[-1] + width * height - H * W]
        return {"size": [height, width], "counts": counts}
    return segmentation


LOADER_CASES = [n for n in BAD if n not in ("RLE size swapped", "3x width")]  # those depend on W, H


@pytest.mark.parametrize("name", LOADER_CASES)
def test_masks_dataset_refuses_a_bad_segmentation_at_load(synthetic, name):
    data, ann, image = _with_segmentation(synthetic, BAD[name][0])
    # Constructing the dataset decodes nothing (before the fix as after): safe to run here.
    with pytest.raises(DatasetError) as caught:
        CocoDetection(None, data, images=synthetic["images"], masks=True)
    message = str(caught.value)
    reason = segm_check.validate_segmentation(ann, image["width"], image["height"])
    assert message.startswith(
        f"<in-memory annotations>: annotation {ann['id']} (image {image['id']}) has an unusable "
        f"segmentation: {reason}"
    ), message


@pytest.mark.parametrize("name", LOADER_CASES)
def test_data_check_reports_a_bad_segmentation(tmp_path, capsys, synthetic, name):
    data, ann, image = _with_segmentation(synthetic, BAD[name][0])
    path = tmp_path / "instances_bad.json"
    path.write_text(json.dumps(data))  # NaN and Infinity as Python's json (and real exports) write them
    report = check_annotations(path)
    assert not report.ok
    reason = segm_check.validate_segmentation(ann, image["width"], image["height"])
    assert report.errors["unusable segmentations"] == [f"annotation {ann['id']}: {reason}"]
    assert detrkit.cli.main(["data", "check", str(path)]) == 1
    out = capsys.readouterr()
    assert f"error: unusable segmentations (1): annotation {ann['id']}: " in out.out
    assert "FAILED: 1 error(s)" in out.out and "Traceback" not in out.out + out.err


def test_good_segmentations_still_load_and_decode(tmp_path, synthetic):
    """Real-export-like data: vertices slightly outside the image, several rings, crowd regions in
    uncompressed RLE, compressed RLE (the synthetic masks), counts written as floats."""
    data = json.loads(json.dumps(synthetic["instances"]))
    image = data["images"][0]
    width, height = image["width"], image["height"]
    base = next(a for a in data["annotations"] if a["image_id"] == image["id"])
    mask = mask_utils.decode(base["segmentation"])
    flat = mask.flatten(order="F")
    runs = np.diff(np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]))).tolist()
    runs = [0, *runs] if flat[0] else runs
    segmentations = [
        [[-0.7, -1.5, width + 1.2, -0.4, width + 0.9, height + 1.1, -1.0, height + 0.3]],
        {"size": [height, width], "counts": runs},
        [[5, 5, 20, 5, 20, 20, 5, 20], [30, 30, 40, 30, 40.5, 40.5, 30, 40]],
        base["segmentation"],
        {"size": [height, width], "counts": [float(r) for r in runs]},
    ]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != image["id"]] + [
        {**base, "id": 1000 + k, "segmentation": s, "iscrowd": int(k == 1)}
        for k, s in enumerate(segmentations)
    ]
    path = tmp_path / "instances_good.json"
    path.write_text(json.dumps(data))
    assert check_annotations(path).ok
    ds = CocoDetection(None, path, images=synthetic["images"], masks=True, keep_crowd=True)
    masks = ds[ds.ids.index(image["id"])][1]["masks"]
    assert masks.shape == (len(segmentations), height, width)
    assert masks[0].all()  # the whole image: pycocotools clips the outside vertices
    expected = torch.from_numpy(mask).bool()
    assert (
        torch.equal(masks[1], expected)
        and torch.equal(masks[3], expected)
        and torch.equal(masks[4], expected)
    )
    rings = mask_utils.merge(mask_utils.frPyObjects(segmentations[2], height, width))
    assert torch.equal(masks[2], torch.from_numpy(mask_utils.decode(rings)).bool()) and masks[2].sum() > 300


def test_box_only_annotations(tmp_path, synthetic):
    """No segmentation (missing or []) is fine without masks; masks=True says which lack one."""
    data = json.loads(json.dumps(synthetic["instances"]))
    for k, ann in enumerate(data["annotations"]):
        if k % 2:
            del ann["segmentation"]
        else:
            ann["segmentation"] = []
    path = tmp_path / "instances_boxes.json"
    path.write_text(json.dumps(data))
    assert check_annotations(path).ok
    ds = CocoDetection(None, data, images=synthetic["images"])
    assert len(ds[0][1]["boxes"]) > 0
    # With masks, when the file is loaded (not by one DataLoader worker in the middle of an epoch).
    first = data["annotations"][0]["id"]
    with pytest.raises(
        DatasetError, match=rf"annotation\(s\) have no segmentation \(ids {first}\b.*masks=True"
    ):
        CocoDetection(None, data, images=synthetic["images"], masks=True)


def test_box_dataset_with_a_bad_segmentation_loads_but_its_coco_refuses(synthetic):
    """Box training never decodes a mask: it does not refuse the file; pycocotools' COCO does."""
    data, ann, _ = _with_segmentation(synthetic, BAD["nan"][0])
    ds = CocoDetection(None, data, images=synthetic["images"])
    assert len(ds[0][1]["boxes"]) > 0
    with pytest.raises(DatasetError, match=rf"annotation {ann['id']} .*not finite"):
        _ = ds.coco  # only the property: before the fix, its annToMask would take all the memory


# --- the whole path, as the bug report ran it, under a memory limit -----------------------------

_MEMORY_LIMIT = 4 << 30


def _limit_memory():
    # RLIMIT_DATA (heap and anonymous mappings: what pycocotools' runaway allocation takes), not
    # RLIMIT_AS: importing torch alone maps ~4 GB of address space (its CUDA libraries).
    resource.setrlimit(resource.RLIMIT_DATA, (_MEMORY_LIMIT, _MEMORY_LIMIT))


def _start_limited(args):
    env = {**os.environ, "PYTHONPATH": str(Path(detrkit.__file__).parents[1])}
    return subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_limit_memory,
        start_new_session=True,
    )


def _finish(proc, timeout=60):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{proc.args[1:4]} still running after {timeout} s:\n{out[-2000:]}\n{err[-2000:]}")
    return proc.returncode, out, err


def test_nan_polygon_gives_a_clear_error_not_unbounded_memory(tmp_path):
    """The bug report: one NaN coordinate; pycocotools allocated 21 GB in 25 s (inf: segfault)."""
    root = write_synthetic(tmp_path, SynthConfig(images=2, seed=3, empty_fraction=0.0), {"train": 2})
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    first = min(img["id"] for img in data["images"])
    ann = next(a for a in data["annotations"] if a["image_id"] == first)
    ann["segmentation"] = [[10.0, 10.0, float("nan"), 12.0, 40.0, 40.0]]
    path.write_text(json.dumps(data))

    load = textwrap.dedent(
        f"""
        from detrkit.data import CocoDetection, DatasetError
        try:
            dataset = CocoDetection({str(root / "train2017")!r}, {str(path)!r}, masks=True)
            dataset[0]  # before the fix: pycocotools decodes the NaN polygon here
        except DatasetError as e:
            print(f"DatasetError: {{e}}")
            raise SystemExit(3)
        print("loaded")
        """
    )
    # Side by side (torch imports take seconds), both finished before anything is asserted.
    train = ["-m", "detrkit", "train", "--masks", "--data", str(root), "--set", "val_split=train2017"]
    train += ["--output-dir", str(tmp_path / "run"), "--epochs", "1", "--num-workers", "0"]
    check, loader = (
        _start_limited(["-m", "detrkit", "data", "check", str(root)]),
        _start_limited(["-c", load]),
    )
    check, loader = _finish(check), _finish(loader)
    # Mask training reads the file through the same loader: a clear error, not a runaway.
    rc, out, err = _finish(_start_limited(train))
    assert rc == 2, f"train --masks: exit {rc}\n{out[-3000:]}\n{err[-3000:]}"
    assert f"annotation {ann['id']} (image {first}) has an unusable segmentation" in err
    assert "Traceback" not in out + err

    rc, out, err = check
    assert rc == 1, f"data check: exit {rc}\n{out[-3000:]}\n{err[-3000:]}"
    assert f"annotation {ann['id']}: polygon 0 point 1 (nan, 12) is not finite" in out
    assert "FAILED" in out and "Traceback" not in out + err
    rc, out, err = loader
    assert rc == 3, f"loader: exit {rc}\n{out[-3000:]}\n{err[-3000:]}"
    assert f"DatasetError: {path}: annotation {ann['id']} (image {first}) has an unusable segmentation" in out
    assert "not finite" in out and "Traceback" not in err
