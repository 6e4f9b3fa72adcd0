"""`detrkit predict` on a folder with good and bad files, panoptic output, and a video."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import detrkit
from conftest import shapes_config, tiny_config
from detrkit.cli import main
from detrkit.data import SynthConfig, make_synthetic
from detrkit.data.panoptic import rgb_to_id


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    config = shapes_config()
    path = tmp_path_factory.mktemp("w") / "model.safetensors"
    detrkit.save_model(detrkit.build_model(config), path)
    return path


@pytest.fixture(scope="module")
def pictures():
    return list(make_synthetic(SynthConfig(images=3, seed=5))["images"].values())


def test_folder_with_good_and_bad_files(tmp_path, weights, pictures, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    pictures[0].save(folder / "a.jpg")
    pictures[1].save(folder / "sub" / "b.png")
    pictures[2].save(folder / "sub" / "a.jpg")  # same name in another folder: no clash
    pictures[2].save(folder / "a.png")  # same stem as a.jpg: written as a-2
    Image.new("RGB", (3000, 1), "white").save(folder / "strip.png")  # resizes to 1 px high
    (folder / "broken.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    (folder / "clip.mp4").write_text("not a video")
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            str(folder),
            str(tmp_path / "missing.jpg"),
            "--weights",
            str(weights),
            "--out",
            str(out),
            "--threshold",
            "0",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1  # some inputs failed ...
    for name in ("broken.jpg", "empty.png", "missing.jpg", "clip.mp4"):
        assert name in captured.err
    assert "notes.txt" not in captured.err
    assert "5 images" in captured.out and "4 failed" in captured.out
    # ... but every good image was written.
    images = json.loads((out / "images.json").read_text())
    assert sorted(i["file_name"] for i in images) == sorted(
        str(folder / p) for p in ("a.jpg", "a.png", "strip.png", "sub/b.png", "sub/a.jpg")
    )
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 5 * 7  # threshold 0: every query of the tiny model
    assert {r["category_id"] for r in results} <= {1, 2, 4, 7}
    assert all(len(r["bbox"]) == 4 and r["bbox"][2] >= 0 for r in results)
    for drawn_name, original in (
        ("in/a.jpg", "in/a.jpg"),
        ("in/a-2.jpg", "in/a.png"),
        ("in/sub/b.jpg", "in/sub/b.png"),
        ("in/sub/a.jpg", "in/sub/a.jpg"),
        ("in/strip.jpg", "in/strip.png"),
    ):
        assert Image.open(out / "annotated" / drawn_name).size == Image.open(tmp_path / original).size


def test_all_good_exits_zero(tmp_path, weights, pictures):
    pictures[0].save(tmp_path / "x.png")
    assert (
        main(
            [
                "predict",
                str(tmp_path / "x.png"),
                "--weights",
                str(weights),
                "--out",
                str(tmp_path / "o"),
                "--no-draw",
            ]
        )
        == 0
    )
    assert not (tmp_path / "o" / "annotated").exists()
    assert (
        main(
            [
                "predict",
                str(tmp_path / "nothing-here"),
                "--weights",
                str(weights),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


def test_panoptic_model_writes_coco_panoptic(tmp_path, pictures):
    torch.manual_seed(0)
    config = tiny_config(
        masks=True,
        num_classes=6,
        category_ids=(1, 2, 4, 7, 100, 101),
        stuff_ids=(100, 101),
        extra={"image_scale": 0.15},
    )
    detrkit.save_model(detrkit.build_model(config), tmp_path / "pan.safetensors")
    pictures[0].save(tmp_path / "p.jpg")
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                str(tmp_path / "p.jpg"),
                "--weights",
                str(tmp_path / "pan.safetensors"),
                "--out",
                str(out),
                "--threshold",
                "0",
            ]
        )
        == 0
    )
    panoptic = json.loads((out / "panoptic.json").read_text())
    [annotation] = panoptic["annotations"]
    ids = rgb_to_id(np.asarray(Image.open(out / "panoptic" / annotation["file_name"]).convert("RGB")))
    assert ids.shape == pictures[0].size[::-1]
    assert {s["id"] for s in annotation["segments_info"]} == set(np.unique(ids).tolist()) - {0}
    assert {c["id"]: c["isthing"] for c in panoptic["categories"]} == {1: 1, 2: 1, 4: 1, 7: 1, 100: 0, 101: 0}


def test_video(tmp_path, weights, pictures):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    frames = 5
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(frames):
            image = pictures[i % 3].resize((96, 64))
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = tmp_path / "out"
    assert (
        main(["predict", str(path), "--weights", str(weights), "--out", str(out), "--threshold", "0.0"]) == 0
    )
    per_frame = json.loads((out / "clip.frames.json").read_text())
    assert [f["frame"] for f in per_frame] == list(range(frames))
    assert all(len(f["scores"]) == 7 for f in per_frame)
    with av.open(str(out / "clip.annotated.mp4")) as container:
        decoded = list(container.decode(video=0))
    assert len(decoded) == frames and (decoded[0].width, decoded[0].height) == (96, 64)
