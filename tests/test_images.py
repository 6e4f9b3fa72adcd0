"""Robust image loading over the file types users actually have, and what bad files do."""

import numpy as np
import pytest
from PIL import Image

from detrkit.data import CocoDetection, ImageLoadError, SkippedSample, collate, load_image

# A 40x20 landscape picture: red left half, blue right half.
BASE = np.zeros((20, 40, 3), dtype=np.uint8)
BASE[:, :20] = (220, 20, 20)
BASE[:, 20:] = (20, 20, 220)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    base = Image.fromarray(BASE)
    # EXIF orientation 6: the viewer must rotate 90 degrees clockwise; the pixels are stored
    # rotated the other way, as a phone held upright would write them.
    stored = base.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[274] = 6
    stored.save(d / "rotated.jpg", exif=exif, quality=98)
    base.convert("L").save(d / "gray.png")
    base.convert("CMYK").save(d / "cmyk.jpg", quality=98)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "rgba.png")
    sixteen = np.asarray(base.convert("L")).astype(np.uint16) * 257
    Image.fromarray(sixteen).save(d / "deep16.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    full = (d / "gray.png").read_bytes()
    base.save(d / "whole.jpg", quality=95)
    jpeg = (d / "whole.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not a picture\n")
    assert full
    return d


def _colour_at(array, y, x):
    return array[y, x].astype(int)


def test_exif_rotation_is_applied(folder):
    image = load_image(folder / "rotated.jpg")
    assert image.mode == "RGB" and image.size == (40, 20)
    a = np.asarray(image)
    left, right = _colour_at(a, 10, 5), _colour_at(a, 10, 35)
    assert left[0] > 150 and left[2] < 80, "red should be on the left once upright"
    assert right[2] > 150 and right[0] < 80


@pytest.mark.parametrize("name", ["gray.png", "cmyk.jpg", "rgba.png", "deep16.png", "palette.png"])
def test_other_modes_become_rgb(folder, name):
    image = load_image(folder / name)
    assert image.mode == "RGB" and image.size == (40, 20)
    a = np.asarray(image).astype(int)
    if name in ("gray.png", "deep16.png"):
        expected = np.asarray(Image.fromarray(BASE).convert("L")).astype(int)
        assert np.abs(a[..., 0] - expected).max() <= 1 and (a[..., 0] == a[..., 2]).all()
    else:
        assert np.abs(a - BASE.astype(int)).max() <= 40  # CMYK and palette round trips are lossy


@pytest.mark.parametrize(
    "name,reason",
    [
        ("truncated.jpg", "truncated or corrupt"),
        ("empty.jpg", "empty file"),
        ("text.jpg", "not an image"),
        ("missing.jpg", "file not found"),
    ],
)
def test_bad_files_name_the_file_and_the_reason(folder, name, reason):
    with pytest.raises(ImageLoadError, match=reason) as excinfo:
        load_image(folder / name)
    assert excinfo.value.path == str(folder / name)


def _annotations(names):
    images = [{"id": i + 1, "file_name": n, "width": 40, "height": 20} for i, n in enumerate(names)]
    anns = [
        {"id": i + 1, "image_id": i + 1, "category_id": 3, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0}
        for i in range(len(names))
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "thing"}]}


def test_dataset_skips_bad_files_and_counts_them(folder):
    names = ["whole.jpg", "truncated.jpg", "rotated.jpg", "empty.jpg", "text.jpg", "missing.jpg", "gray.png"]
    ds = CocoDetection(folder, _annotations(names))
    batch = collate([ds[i] for i in range(len(ds))])
    assert len(batch) == 3
    assert sorted(s.path.rsplit("/", 1)[-1] for s in batch.skipped) == [
        "empty.jpg",
        "missing.jpg",
        "text.jpg",
        "truncated.jpg",
    ]
    missing = next(s for s in batch.skipped if s.path.endswith("missing.jpg"))
    assert "image id 6" in missing.reason


def test_dataset_can_fail_instead(folder):
    ds = CocoDetection(folder, _annotations(["whole.jpg", "truncated.jpg"]), on_error="raise")
    ds[0]
    with pytest.raises(ImageLoadError, match="truncated.jpg: truncated or corrupt"):
        ds[1]


def test_size_mismatch_with_annotations_is_caught(folder):
    data = _annotations(["rotated.jpg"])
    data["images"][0].update(width=20, height=40)  # as if EXIF had been ignored by the annotator
    sample = CocoDetection(folder, data)[0]
    assert isinstance(sample, SkippedSample) and "would not line up" in sample.reason


def test_bad_files_inside_dataloader_workers(folder):
    from torch.utils.data import DataLoader

    ds = CocoDetection(folder, _annotations(["whole.jpg", "text.jpg", "gray.png", "empty.jpg"]))
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 2
    assert sorted(s.path.rsplit("/", 1)[-1] for b in batches for s in b.skipped) == ["empty.jpg", "text.jpg"]


@pytest.mark.parametrize("name", ["deep16.png", "gray.png", "rgba.png", "palette.png", "cmyk.jpg"])
def test_detector_sees_a_pil_image_as_it_sees_the_file(folder, name):
    """One conversion path: a 16-bit greyscale PIL image must not turn white (99.6% of its pixels
    did), nor any other mode differ from the same file given by path."""
    import torch

    import detrkit
    from conftest import shapes_config
    from detrkit.inference.detector import Detector

    torch.manual_seed(0)
    detector = Detector(detrkit.build_model(shapes_config()).eval())
    with Image.open(folder / name) as opened:
        opened.load()
        from_pil = detector.prepare(opened)
    from_path = detector.prepare(folder / name)
    assert torch.equal(from_pil[0], from_path[0]) and from_pil[1] == from_path[1]
    if name == "deep16.png":
        sixteen = np.asarray(Image.open(folder / name))
        from_array = detector.prepare(sixteen)
        assert torch.equal(from_array[0], from_path[0])
