import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

import detrkit
from conftest import shapes_config, tiny_config
from detrkit.data import SynthConfig, TransformConfig, eval_transforms, make_synthetic


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    config = shapes_config()
    return detrkit.Detector(detrkit.build_model(config), device="cpu")


@pytest.fixture(scope="module")
def images():
    data = make_synthetic(SynthConfig(images=5, seed=2))
    return list(data["images"].values())


def _same(a, b, atol=1e-5):
    assert len(a) == len(b)
    assert torch.allclose(a.boxes, b.boxes, atol=1e-3) and torch.allclose(a.scores, b.scores, atol=atol)
    assert torch.equal(a.labels, b.labels) and a.names == b.names


def test_every_input_type_gives_the_same_detections(detector, images, tmp_path):
    pil = images[0]
    pil.save(tmp_path / "a.png")
    array = np.array(pil)
    reference = detector.predict(pil, threshold=0.0)[0]
    assert len(reference) == detector.model.config.num_queries
    for variant in (
        str(tmp_path / "a.png"),
        tmp_path / "a.png",
        array,
        torch.from_numpy(array).permute(2, 0, 1),
        torch.from_numpy(array).permute(2, 0, 1).float() / 255,
    ):
        _same(reference, detector.predict(variant, threshold=0.0)[0], atol=1e-4)


def test_outputs_are_in_original_pixels_and_dataset_ids(detector, images):
    result = detector.predict(images[1], threshold=0.0)[0]
    w, h = images[1].size
    assert (
        (result.boxes[:, 0] >= -1).all()
        and (result.boxes[:, 2] <= w + 1).all()
        and (result.boxes[:, 3] <= h + 1).all()
    )
    assert set(result.labels.tolist()) <= {1, 2, 4, 7}
    assert all(name in ("rectangle", "ellipse", "triangle", "diamond") for name in result.names)
    assert (result.scores[:-1] >= result.scores[1:]).all()
    assert len(detector.predict(images[1], threshold=1.0)[0]) == 0


def _constant_output_detector(box_cxcywh, label, logit=6.0):
    """A detector whose every query predicts ``box_cxcywh`` (normalised) with class ``label``."""
    torch.manual_seed(0)
    model = detrkit.build_model(shapes_config())
    with torch.no_grad():
        last = model.bbox_embed.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.logit(torch.tensor(box_cxcywh)))
        model.class_embed.weight.zero_()
        model.class_embed.bias.zero_()
        model.class_embed.bias[label] = logit
    return detrkit.Detector(model, device="cpu")


def test_boxes_are_the_normalised_prediction_in_original_pixels():
    """A landscape picture the evaluation resize shrinks and a portrait one it enlarges, in one call:
    the normalised (cx, cy, w, h) comes back as x1, y1, x2, y2 of each original picture."""
    box = (0.3, 0.6, 0.2, 0.5)
    detector = _constant_output_detector(box, label=2)
    rng = np.random.default_rng(0)
    landscape = rng.integers(0, 255, (170, 300, 3), dtype=np.uint8)  # resized to 113 x 199
    portrait = rng.integers(0, 255, (260, 90, 3), dtype=np.uint8)  # resized to 199 x 69
    assert detector.preprocess(Image.fromarray(landscape)).shape[-2:] == (113, 199)
    assert detector.preprocess(Image.fromarray(portrait)).shape[-2:] == (199, 69)
    # Twice the landscape's size: the same input size, so it shares the landscape's batch.
    large = Image.fromarray(rng.integers(0, 255, (340, 600, 3), dtype=np.uint8))
    assert detector.preprocess(large).shape[-2:] == (113, 199)
    results = detector.predict([landscape, portrait, large], threshold=0.5)
    cx, cy, w, h = box
    for result, (height, width) in zip(results, [(170, 300), (260, 90), (340, 600)]):
        expected = torch.tensor(
            [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        )
        assert len(result) == detector.model.config.num_queries
        assert torch.allclose(result.boxes, expected.expand(len(result), 4), atol=1e-3), (
            result.boxes[0],
            expected,
        )
        assert result.labels.tolist() == [4] * len(result) and set(result.names) == {"triangle"}
        expected_score = np.exp(6.0) / (np.exp(6.0) + 4)  # softmax over 4 classes + no object
        assert torch.allclose(result.scores, torch.tensor(expected_score, dtype=torch.float32), atol=1e-5)


def test_a_batch_equals_one_image_at_a_time(detector, images):
    batch = [images[0], images[1], images[0].copy(), images[2]]  # mixed sizes, two of one size
    together = detector.predict(batch, threshold=0.0)
    for image, result in zip(batch, together):
        _same(detector.predict(image, threshold=0.0)[0], result)


def test_preprocessing_is_the_evaluation_pipeline(detector, images):
    image = images[3]
    expected, _ = eval_transforms(TransformConfig.scaled(0.15))(
        tv_tensors.Image(TF.pil_to_tensor(image)),
        {
            "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=image.size[::-1]),
            "labels": torch.zeros(0, dtype=torch.int64),
        },
    )
    assert torch.equal(detector.preprocess(image), expected.as_subclass(torch.Tensor))


def test_segmentation_models_return_masks_at_original_size(images):
    torch.manual_seed(0)
    detector = detrkit.Detector(
        detrkit.build_model(tiny_config(masks=True, extra={"image_scale": 0.15})), device="cpu"
    )
    result = detector.predict(images[0], threshold=0.0)[0]
    w, h = images[0].size
    assert result.masks.shape == (len(result), h, w) and result.masks.dtype == torch.bool


def test_panoptic_and_semantic_modes(images):
    torch.manual_seed(0)
    config = tiny_config(
        masks=True,
        num_classes=6,
        category_ids=(1, 2, 4, 7, 100, 101),
        class_names=("rectangle", "ellipse", "triangle", "diamond", "sky", "ground"),
        stuff_ids=(100, 101),
        extra={"image_scale": 0.15},
    )
    detector = detrkit.Detector(detrkit.build_model(config), device="cpu")
    assert detector.default_segmentation == "panoptic"
    w, h = images[0].size
    [result] = detector.predict(images[0], threshold=0.0, panoptic_threshold=0.0)
    assert result.masks is None and result.segments.shape == (h, w)
    info = result.segments_info
    assert info and {s["id"] for s in info} == set(result.segments.unique().tolist()) - {0}
    assert sum(s["area"] for s in info) == int((result.segments > 0).sum())
    for s in info:
        assert s["isthing"] == (s["category_id"] not in (100, 101))
        assert s["name"] == config.class_names[config.category_ids.index(s["category_id"])]
    assert [s["category_id"] for s in info if not s["isthing"]] == sorted(
        {s["category_id"] for s in info if not s["isthing"]}, key=[s["category_id"] for s in info].index
    ), "at most one segment per stuff class"
    assert "segments_info" in result.to_dict()
    [semantic] = detector.predict(images[0], segmentation="semantic")
    assert semantic.semantic.shape == (h, w) and set(semantic.semantic.unique().tolist()) <= set(
        config.category_ids
    )
    [instance] = detector.predict(images[0], threshold=0.0, segmentation="instance")
    assert instance.masks.shape == (len(instance), h, w) and instance.segments is None
    with pytest.raises(ValueError, match="expected 'instance'"):
        detector.predict(images[0], segmentation="everything")


def test_bad_inputs(detector, tmp_path):
    with pytest.raises(TypeError, match="unsupported image type"):
        detector.predict(42)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        detector.predict(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"Tensor\[3, H, W\]"):
        detector.predict(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="needs a model with a mask head"):
        detector.predict(np.zeros((8, 8, 3), dtype=np.uint8), segmentation="panoptic")
    (tmp_path / "x.jpg").write_text("not an image")
    with pytest.raises(detrkit.data.ImageLoadError, match="x.jpg: not an image"):
        detector.predict(tmp_path / "x.jpg")


def test_from_pretrained(tmp_path, detector):
    detrkit.save_model(detector.model, tmp_path / "m.safetensors")
    loaded = detrkit.Detector.from_pretrained(tmp_path / "m.safetensors", device="cpu")
    assert loaded.class_names == detector.class_names and loaded.sizes == detector.sizes
    assert "resnet18" in repr(loaded)
