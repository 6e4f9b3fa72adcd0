"""Datasets as users have them: YOLO, Pascal VOC and LabelMe read into the same boxes as the COCO
original (written by detrkit's converter and, for YOLO and VOC, by supervision as an independent
writer), trained and evaluated with ``--data PATH`` alone; conversions round trip; ``data check``
names the file and line of each fault."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import detrkit.cli
from conftest import require
from detrkit.data import SynthConfig, write_synthetic
from detrkit.data.coco import DatasetError
from detrkit.data.convert import convert
from detrkit.data.formats import detect_format, open_split


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    """A synthetic COCO dataset (boxes only: every format can carry it whole)."""
    root = write_synthetic(
        tmp_path_factory.mktemp("coco") / "shapes",
        SynthConfig(images=8, seed=2, min_size=64, max_size=96),
        {"train": 8, "val": 4},
    )
    for split in ("train2017", "val2017"):
        path = root / f"annotations/instances_{split}.json"
        data = json.loads(path.read_text())
        for a in data["annotations"]:
            a.pop("segmentation", None)
        for image in data["images"]:  # names unique across splits, as COCO's (VOC keeps one folder)
            new = f"{split[0]}{image['file_name']}"
            (root / split / image["file_name"]).rename(root / split / new)
            image["file_name"] = new
        path.write_text(json.dumps(data))
    return root


def boxes_by_image(data: dict) -> dict[str, list[tuple[str, list[float]]]]:
    """``{image file stem: sorted [(class name, [x, y, w, h])]}``: comparable across formats."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    stems = {i["id"]: Path(i["file_name"]).stem for i in data["images"]}
    out: dict[str, list] = {stem: [] for stem in stems.values()}
    for a in data["annotations"]:
        out[stems[a["image_id"]]].append((names[a["category_id"]], [round(v, 3) for v in a["bbox"]]))
    return {k: sorted(v, key=lambda e: (e[0], e[1])) for k, v in out.items()}


def assert_same_boxes(original: dict, loaded: dict, tolerance: float = 0.5):
    expected, actual = boxes_by_image(original), boxes_by_image(loaded)
    assert expected.keys() == actual.keys()
    for stem in expected:
        assert [n for n, _ in expected[stem]] == [n for n, _ in actual[stem]], stem
        a = np.array([b for _, b in expected[stem]]).reshape(-1, 4)
        b = np.array([b for _, b in actual[stem]]).reshape(-1, 4)
        corners = lambda x: np.concatenate([x[:, :2], x[:, :2] + x[:, 2:]], 1)  # noqa: E731
        assert np.abs(corners(a) - corners(b)).max(initial=0) <= tolerance, stem


def original(root: Path, split: str) -> dict:
    return json.loads((root / f"annotations/instances_{split}2017.json").read_text())


def write_labelme(coco_root: Path, out: Path) -> None:
    """LabelMe's own layout: a JSON beside each image, a folder per split."""
    for split in ("train", "val"):
        data = original(coco_root, split)
        names = {c["id"]: c["name"] for c in data["categories"]}
        (out / split).mkdir(parents=True)
        for image in data["images"]:
            (out / split / image["file_name"]).write_bytes(
                (coco_root / f"{split}2017" / image["file_name"]).read_bytes()
            )
            shapes = [
                {"label": names[a["category_id"]], "points": [[x, y], [x + w, y + h]], "shape_type": "rectangle"}
                for a in data["annotations"] if a["image_id"] == image["id"]
                for x, y, w, h in [a["bbox"]]
            ]  # fmt: skip
            document = {
                "version": "5.4.1", "shapes": shapes, "imagePath": image["file_name"], "imageData": None,
                "imageWidth": image["width"], "imageHeight": image["height"],
            }  # fmt: skip
            (out / split / Path(image["file_name"]).with_suffix(".json").name).write_text(
                json.dumps(document)
            )


def supervision_writes(coco_root: Path, out: Path, to: str) -> None:
    require("supervision")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import supervision as sv

        for split in ("train", "val"):
            ds = sv.DetectionDataset.from_coco(
                images_directory_path=str(coco_root / f"{split}2017"),
                annotations_path=str(coco_root / f"annotations/instances_{split}2017.json"),
            )
            if to == "yolo":
                ds.as_yolo(
                    images_directory_path=str(out / "images" / split),
                    annotations_directory_path=str(out / "labels" / split),
                    data_yaml_path=str(out / "data.yaml"),
                )
            else:
                ds.as_pascal_voc(
                    images_directory_path=str(out / "JPEGImages"),
                    annotations_directory_path=str(out / "Annotations"),
                )
                (out / "ImageSets/Main").mkdir(parents=True, exist_ok=True)
                stems = [Path(p).stem for p in ds.image_paths]
                (out / f"ImageSets/Main/{split}.txt").write_text("".join(s + "\n" for s in stems))


@pytest.fixture(scope="module")
def datasets(coco_root, tmp_path_factory):
    """The same dataset in every format: ``{name: (root, format)}``."""
    base = tmp_path_factory.mktemp("formats")
    out = {"coco": (coco_root, "coco")}
    for to in ("yolo", "voc"):
        convert(coco_root, base / f"detrkit-{to}", to)
        out[f"detrkit-{to}"] = (base / f"detrkit-{to}", to)
        supervision_writes(coco_root, base / f"supervision-{to}", to)
        out[f"supervision-{to}"] = (base / f"supervision-{to}", to)
    write_labelme(coco_root, base / "labelme")
    out["labelme"] = (base / "labelme", "labelme")
    return out


KINDS = ["detrkit-yolo", "supervision-yolo", "detrkit-voc", "supervision-voc", "labelme"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_format_loads_the_boxes_of_the_coco_original(datasets, coco_root, kind):
    root, expected_format = datasets[kind]
    assert detect_format(root) == expected_format
    for split in ("train", "val"):
        opened = open_split(root, f"{split}2017")  # COCO's split names find the format's own
        assert opened.format == expected_format and not opened.problems
        assert_same_boxes(original(coco_root, split), dict(opened.annotations))


@pytest.mark.parametrize("kind", KINDS)
def test_each_format_trains_and_evaluates_with_data_alone(datasets, tmp_path, kind, capsys):
    root, data_format = datasets[kind]
    run = tmp_path / "run"
    argv = ["train", "--data", str(root), "--output-dir", str(run), "--epochs", "1", "--max-steps", "2",
            "--image-scale", "0.1", "--num-workers", "0", "--set", "model.backbone=resnet18",
            "--set", "model.d_model=32", "--set", "model.dim_feedforward=64", "--set", "model.enc_layers=1",
            "--set", "model.dec_layers=1", "--set", "model.num_queries=10"]  # fmt: skip
    assert detrkit.cli.main(argv) == 0
    out = capsys.readouterr().out
    expected = sum(len(v) for v in boxes_by_image(original(datasets["coco"][0], "train")).values())
    assert (
        f"data ({data_format}): 8 training images, {expected} objects" in out and "4 validation images" in out
    )
    assert "4 classes (diamond, ellipse, rectangle, triangle)" in out or "(rectangle, ellipse" in out
    assert detrkit.cli.main(["eval", "--weights", str(run / "checkpoint_last.pth"), "--data", str(root),
                             "--num-workers", "0"]) == 0  # fmt: skip
    assert "(4 images, fp32)" in capsys.readouterr().out


@pytest.mark.parametrize("to", ["yolo", "voc"])
def test_conversions_round_trip(coco_root, tmp_path, to):
    convert(coco_root, tmp_path / to, to)
    convert(tmp_path / to, tmp_path / "back", "coco")
    for split in ("train", "val"):
        # The split names travel: train2017 stays train2017 through YOLO or VOC.
        back = json.loads((tmp_path / f"back/annotations/instances_{split}2017.json").read_text())
        assert_same_boxes(original(coco_root, split), back)
        assert all((tmp_path / "back" / f"{split}2017" / i["file_name"]).is_file() for i in back["images"])


def test_convert_refuses_to_write_over_its_input_and_reports_what_it_drops(coco_root, tmp_path, capsys):
    with pytest.raises(detrkit.errors.ConfigError, match="would overlap the dataset"):
        convert(coco_root, coco_root / "inside", "yolo")
    data = original(coco_root, "train")
    data["annotations"][0]["iscrowd"] = 1
    crowd = tmp_path / "crowd"
    (crowd / "annotations").mkdir(parents=True)
    (crowd / "annotations/instances_train.json").write_text(json.dumps(data))
    (crowd / "train").symlink_to(coco_root / "train2017")
    assert detrkit.cli.main(["data", "convert", str(crowd), str(tmp_path / "y"), "--to", "yolo"]) == 0
    assert "not carried: train: 1 crowd region(s)" in capsys.readouterr().out


# --- data check on broken files of each format: the file and the line (or entry) named -------------
def spoil_yolo(root: Path) -> tuple[str, str]:
    label = sorted((root / "labels").glob("train*/*.txt"))[0]
    label.write_text(label.read_text() + "7 0.5 0.5 0.1 0.1\n0 0.5 abc 0.1 0.1\n")
    lines = len(label.read_text().splitlines())
    return "malformed label lines", f"{label}:{lines - 1}: class 7 is not among the 4 classes"


def spoil_yolo_image(root: Path) -> tuple[str, str]:
    image = sorted((root / "images").glob("val*/*.jpg"))[0]
    image.write_bytes(b"not a jpeg")
    return "unreadable image files", str(image)


def spoil_voc(root: Path) -> tuple[str, str]:
    xml = sorted((root / "Annotations").glob("*.xml"))[0]
    xml.write_text(xml.read_text().replace("<xmin>", "<xmin>x", 1))
    return "malformed objects", f"{xml}: object 1: needs <name> and <bndbox> with 4 numbers"


def spoil_voc_xml(root: Path) -> tuple[str, str]:
    xml = sorted((root / "Annotations").glob("*.xml"))[1]
    xml.write_text("<annotation><size>")
    return "unreadable annotation files", f"{xml}: not valid XML"


def spoil_labelme(root: Path) -> tuple[str, str]:
    path = sorted((root / "train").glob("*.json"))[0]
    document = json.loads(path.read_text())
    document["shapes"][0]["points"] = [[1, 1]]
    path.write_text(json.dumps(document))
    return "unsupported shapes", f"{path}: shapes[0]: rectangle with 1 point(s)"


def spoil_yolo_zero_box(root: Path) -> tuple[str, str]:
    label = sorted((root / "labels").glob("val*/*.txt"))[0]
    label.write_text("1 0.5 0.5 0.0 0.2\n" + label.read_text())
    return "negative or zero box sizes", f"{label}:1: w=0, h=0.2"


def spoil_voc_zero_box(root: Path) -> tuple[str, str]:
    xml = sorted((root / "Annotations").glob("*.xml"))[0]
    text = xml.read_text()
    start = text.index("<xmax>") + len("<xmax>")
    end = text.index("</xmax>")
    xmin = text[text.index("<xmin>") + 6 : text.index("</xmin>")]
    xml.write_text(text[:start] + str(int(xmin) - 2) + text[end:])
    return "negative or zero box sizes", f"{xml}: object 1: w=-1"


def spoil_voc_missing_image(root: Path) -> tuple[str, str]:
    image = sorted((root / "JPEGImages").glob("*.jpg"))[0]
    image.unlink()
    return "missing image files", str(image)


def spoil_voc_size(root: Path) -> tuple[str, str]:
    xml = sorted((root / "Annotations").glob("*.xml"))[2]
    text = xml.read_text()
    start, end = text.index("<width>") + len("<width>"), text.index("</width>")
    xml.write_text(text[:start] + "999" + text[end:])
    return "image sizes that differ from the annotation file", "file says 999x"


def spoil_labelme_missing_image(root: Path) -> tuple[str, str]:
    path = sorted((root / "val").glob("*.json"))[0]
    document = json.loads(path.read_text())
    (path.parent / document["imagePath"]).unlink()
    return "missing image files", str((path.parent / document["imagePath"]).resolve())


def spoil_labelme_size(root: Path) -> tuple[str, str]:
    path = sorted((root / "train").glob("*.json"))[1]
    document = json.loads(path.read_text())
    document["imageHeight"] = 7
    path.write_text(json.dumps(document))
    return "image sizes that differ from the annotation file", "x7"


@pytest.mark.parametrize(
    "kind,spoil",
    [("detrkit-yolo", spoil_yolo), ("detrkit-yolo", spoil_yolo_image), ("detrkit-yolo", spoil_yolo_zero_box),
     ("detrkit-voc", spoil_voc), ("detrkit-voc", spoil_voc_xml), ("detrkit-voc", spoil_voc_zero_box),
     ("detrkit-voc", spoil_voc_missing_image), ("detrkit-voc", spoil_voc_size),
     ("labelme", spoil_labelme), ("labelme", spoil_labelme_missing_image), ("labelme", spoil_labelme_size)],
)  # fmt: skip
def test_data_check_names_each_fault_of_each_format(datasets, tmp_path, capsys, kind, spoil):
    import shutil

    root = tmp_path / kind
    shutil.copytree(datasets[kind][0], root)
    assert detrkit.cli.main(["data", "check", str(root)]) == 0, capsys.readouterr().out
    capsys.readouterr()
    error, detail = spoil(root)
    assert detrkit.cli.main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"error: {error}" in out and detail in out, out
    if error in ("missing image files", "image sizes that differ from the annotation file"):
        return  # as for COCO files: training skips such an image with a warning naming it
    # What the reader cannot read, training refuses, naming the same fault on one line.
    with pytest.raises(DatasetError, match="run `detrkit data check|" + error):
        for split in ("train2017", "val2017"):
            open_split(root, split)


def test_a_yaml_without_names_is_refused(tmp_path):
    (tmp_path / "data.yaml").write_text("train: images/train\n")
    with pytest.raises(DatasetError, match="'names' must list the class names"):
        open_split(tmp_path, "train2017")


@pytest.mark.parametrize("to", ["coco", "voc", "yolo"])
def test_images_of_the_same_name_stay_apart_in_a_conversion(coco_root, tmp_path, to):
    """Two cameras' 0001.jpg (a YOLO set read with absolute paths): two images out, none overwritten."""
    src = tmp_path / "src"
    first = sorted((coco_root / "train2017").glob("*.jpg"))[:2]
    for camera, image in zip(("cam1", "cam2"), first):
        (src / "images/train" / camera).mkdir(parents=True)
        (src / "labels/train" / camera).mkdir(parents=True)
        (src / "images/train" / camera / "0001.jpg").write_bytes(image.read_bytes())
        (src / "labels/train" / camera / "0001.txt").write_text(f"{len(camera) - 4} 0.5 0.5 0.2 0.2\n")
    (src / "data.yaml").write_text("train: images/train\nval: images/train\nnames: [a, b]\n")
    convert(src, tmp_path / "out", to)
    back = tmp_path / "back"
    convert(tmp_path / "out", back, "coco")
    data = json.loads(next(back.glob("annotations/instances_train*.json")).read_text())
    files = [back / next(back.glob("train*")).name / i["file_name"] for i in data["images"]]
    assert len(set(files)) == 2 and all(f.is_file() for f in files)
    assert {f.read_bytes() for f in files} == {image.read_bytes() for image in first}


def test_labelme_splits_share_their_class_ids(tmp_path):
    """val/ holding only some classes numbers them as train/ does."""
    from PIL import Image

    for split, labels in (("train", ["cat", "dog"]), ("val", ["dog"])):
        (tmp_path / split).mkdir()
        Image.new("RGB", (40, 30)).save(tmp_path / split / "a.png")
        shapes = [
            {"label": n, "points": [[1, 1], [9 + i, 9]], "shape_type": "rectangle"}
            for i, n in enumerate(labels)
        ]
        (tmp_path / split / "a.json").write_text(json.dumps(
            {"shapes": shapes, "imagePath": "a.png", "imageWidth": 40, "imageHeight": 30}
        ))  # fmt: skip
    train, val = (dict(open_split(tmp_path, s).annotations) for s in ("train2017", "val2017"))
    assert train["categories"] == val["categories"]
    dog = next(c["id"] for c in train["categories"] if c["name"] == "dog")
    assert [a["category_id"] for a in val["annotations"]] == [dog]


def test_roboflow_yolo_yaml_paths(coco_root, tmp_path):
    """Roboflow's data.yaml says train: ../train/images from the export's root."""
    convert(coco_root, tmp_path / "y", "yolo")
    root = tmp_path / "roboflow"
    for split, name in (("train2017", "train"), ("val2017", "valid")):
        shutil.copytree(tmp_path / "y/images" / split, root / name / "images")
        shutil.copytree(tmp_path / "y/labels" / split, root / name / "labels")
    (root / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\nnc: 4\nnames: [rectangle, ellipse, triangle, diamond]\n"
    )
    opened = open_split(root, "val2017")
    assert_same_boxes(original(coco_root, "val"), dict(opened.annotations))
