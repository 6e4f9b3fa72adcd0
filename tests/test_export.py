"""ONNX export with dynamic batch/height/width checked against onnxruntime; TorchScript."""

from __future__ import annotations

import pytest
import torch

import detrkit
from conftest import randomize_buffers, tiny_config
from detrkit.cli import main
from detrkit.inference.export import (
    DetectionsExport,
    ExportWrapper,
    example_inputs,
    export_onnx,
    export_torchscript,
    onnx_max_diff,
)


@pytest.fixture(scope="module")
def mask_model():
    torch.manual_seed(0)
    model = detrkit.build_model(tiny_config(masks=True)).eval()
    randomize_buffers(model)
    return model


def test_onnx_matches_pytorch_on_padded_batches_of_any_size(tmp_path, mask_model):
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(mask_model, tmp_path / "export" / "detr.onnx", postprocess=False)
    # One self-contained file: nothing that refers to the temporary name it was written under.
    assert [p.name for p in path.parent.iterdir()] == ["detr.onnx"]
    path = path.rename(tmp_path / "moved.onnx")
    # A padded batch of two sizes, then other batch sizes and shapes than the export example.
    diffs = onnx_max_diff(mask_model, path)
    assert set(diffs) == {"pred_logits", "pred_boxes", "pred_masks"}
    assert max(diffs.values()) <= 1e-4, diffs
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = ExportWrapper(mask_model)
    for sizes in (((64, 64),), ((70, 150), (150, 70), (100, 100))):
        images, mask = example_inputs(sizes, seed=2)
        got = session.run(None, {"images": images.numpy(), "padding_mask": mask.numpy()})
        with torch.no_grad():
            expected = wrapper(images, mask)
        for g, e in zip(got, expected, strict=True):
            assert g.shape == tuple(e.shape)
            assert (torch.from_numpy(g) - e).abs().max() <= 1e-4


def test_torchscript_keeps_shapes_dynamic(tmp_path, tiny_model):
    tiny_model.train()
    path = export_torchscript(tiny_model, tmp_path / "detr.pt")
    assert tiny_model.training, "export works on a copy: the caller's model keeps its mode and device"
    tiny_model.eval()
    loaded = torch.jit.load(str(path))
    images, mask = example_inputs(((50, 90), (90, 40), (64, 64)), seed=3)
    with torch.no_grad():
        expected = ExportWrapper(tiny_model)(images, mask)
        got = loaded(images, mask)
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-5)


def test_export_cli(tmp_path, tiny_model, capsys):
    # The ONNX path of the CLI is the export_onnx + onnx_max_diff pair tested above (slow to repeat).
    detrkit.save_model(tiny_model, tmp_path / "m.safetensors")
    code = main(
        [
            "export",
            "--weights",
            str(tmp_path / "m.safetensors"),
            "--format",
            "torchscript",
            "--out",
            str(tmp_path / "m.pt"),
        ]
    )
    assert code == 0 and (tmp_path / "m.pt").exists()
    assert "TorchScript" in capsys.readouterr().out


NUMPY_ONLY = r"""
import json, sys
import numpy as np
import onnxruntime

session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
mean = np.array(json.loads(meta["mean"]), dtype=np.float32)[:, None, None]
std = np.array(json.loads(meta["std"]), dtype=np.float32)[:, None, None]
names = dict(zip(json.loads(meta["category_ids"]), json.loads(meta["class_names"])))
out = {}
for key, files in json.loads(sys.argv[2]).items():
    # Images already at the evaluation size (shorter side eval_size): no resize to reproduce.
    images = [np.load(f).astype(np.float32) / 255.0 for f in files]  # uint8 [3, H, W]
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    batch = np.zeros((len(images), 3, height, width), np.float32)
    mask = np.ones((len(images), height, width), bool)
    for n, image in enumerate(images):
        batch[n, :, : image.shape[1], : image.shape[2]] = (image - mean) / std
        mask[n, : image.shape[1], : image.shape[2]] = False
    sizes = np.array([[i.shape[1], i.shape[2]] for i in images], np.int64)
    boxes, scores, labels = session.run(None, {"images": batch, "padding_mask": mask, "orig_sizes": sizes})
    out[key] = [{"boxes": b[s >= 0.2].tolist(), "scores": s[s >= 0.2].tolist(),
                 "names": [names[int(l)] for l in ls[s >= 0.2]]} for b, s, ls in zip(boxes, scores, labels)]
print(json.dumps({"eval_size": int(meta["eval_size"]), "detections": out}))
"""


def test_an_exported_file_gives_the_detectors_boxes_with_onnxruntime_and_numpy_alone(tmp_path):
    """No detrkit import on the deployment side: the metadata and the graph are enough."""
    import json
    import subprocess
    import sys

    import numpy as np

    pytest.importorskip("onnxruntime")
    from conftest import shapes_config

    torch.manual_seed(0)
    model = detrkit.build_model(shapes_config(num_queries=12)).eval()
    randomize_buffers(model)
    path = export_onnx(model, tmp_path / "detr.onnx")
    detector = detrkit.Detector(model)
    eval_size = detector.sizes.eval_size  # 120 at the model's image_scale 0.15
    generator = torch.Generator().manual_seed(3)
    shapes = {"landscape": [(eval_size, 170)], "portrait": [(190, eval_size)],
              "batch": [(eval_size, 160), (eval_size, 160)]}  # fmt: skip
    files, tensors = {}, {}
    for key, sizes in shapes.items():
        tensors[key] = [
            torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8) for h, w in sizes
        ]
        files[key] = []
        for n, tensor in enumerate(tensors[key]):
            files[key].append(str(tmp_path / f"{key}{n}.npy"))
            np.save(files[key][-1], tensor.numpy())
    script = tmp_path / "deploy.py"
    script.write_text(NUMPY_ONLY)
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['detrkit'] = None; sys.argv = sys.argv[1:]; exec(open(sys.argv[0]).read())",
         str(script), str(path), json.dumps(files)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout)
    assert answer["eval_size"] == eval_size
    for key, images in tensors.items():
        expected = detector.predict(images, threshold=0.2)
        for got, want in zip(answer["detections"][key], expected, strict=True):
            assert got["names"] == want.names and len(want) > 0
            np.testing.assert_allclose(got["scores"], want.scores.numpy(), atol=1e-4)
            np.testing.assert_allclose(got["boxes"], want.boxes.numpy(), atol=0.05)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A model of the synthetic classes and its post-processed ONNX export."""
    pytest.importorskip("onnxruntime")
    from conftest import shapes_config

    torch.manual_seed(0)
    model = detrkit.build_model(shapes_config(num_queries=12)).eval()
    randomize_buffers(model)
    return model, export_onnx(model, tmp_path_factory.mktemp("onnx") / "detr.onnx")


def test_detector_on_an_onnx_file_gives_the_pytorch_detections(exported, tmp_path):
    from PIL import Image

    model, path = exported
    onnx_detector = detrkit.Detector.from_pretrained(path, batch_size=2)
    reference = detrkit.Detector(model, batch_size=2)
    assert onnx_detector.class_names == reference.class_names and "detr.onnx" in repr(onnx_detector)
    generator = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, (3, 90, 130), generator=generator, dtype=torch.uint8)
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    inputs = [  # every input type; two of one size (a batch), others alone
        tmp_path / "a.png", pixels.permute(1, 2, 0).numpy(), pixels, pixels.float() / 255,
        torch.randint(0, 256, (3, 200, 120), generator=generator, dtype=torch.uint8),
    ]  # fmt: skip
    # Halfway between two scores, so float rounding cannot move a detection across it.
    scores = reference.predict(inputs[0], threshold=0.0)[0].scores.sort().values
    middle = float(scores[len(scores) // 2 - 1 : len(scores) // 2 + 1].mean())
    for threshold in (0.0, middle):
        got = onnx_detector.predict(inputs, threshold=threshold)
        want = reference.predict(inputs, threshold=threshold)
        for g, w in zip(got, want, strict=True):
            assert g.names == w.names and torch.equal(g.labels, w.labels)
            torch.testing.assert_close(g.scores, w.scores, atol=1e-4, rtol=0)
            torch.testing.assert_close(g.boxes, w.boxes, atol=0.5, rtol=0)
    assert 0 < len(got[0]) < len(onnx_detector.predict(inputs[0], threshold=0.0)[0])  # the threshold applies
    with pytest.raises(ValueError, match="runs as it was exported"):
        detrkit.Detector.from_pretrained(path, precision="bf16")


def test_predict_cli_and_refusals_for_onnx_files(exported, tmp_path, capsys):
    _, path = exported
    raw = export_onnx(exported[0], tmp_path / "raw.onnx", postprocess=False)
    (tmp_path / "in").mkdir()
    torch.manual_seed(1)
    from PIL import Image

    Image.fromarray(torch.randint(0, 256, (90, 130, 3), dtype=torch.uint8).numpy()).save(
        tmp_path / "in/x.png"
    )
    argv = [
        "predict",
        str(tmp_path / "in"),
        "--weights",
        str(path),
        "--out",
        str(tmp_path / "out"),
        "--threshold",
        "0.0",
    ]
    assert detrkit.cli.main(argv) == 0
    assert "1 images, 12 detections" in capsys.readouterr().out
    argv[3], argv[5] = str(raw), str(tmp_path / "out2")
    assert detrkit.cli.main(argv) == 2
    assert "not a detrkit export with post-processing" in capsys.readouterr().err


def test_the_server_runs_an_onnx_file(exported):
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from detrkit.inference.serve import create_app

    model, path = exported
    pixels = torch.randint(
        0, 256, (100, 140, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    with TestClient(create_app(detrkit.Detector.from_pretrained(path))) as client:
        files = {"image": ("a.png", buffer.getvalue(), "image/png")}
        answer = client.post("/v1/detect?threshold=0.2", files=files).json()
        assert "detr.onnx" in client.get("/healthz").json()["model"]
    [expected] = detrkit.Detector(model).predict(pixels.numpy(), threshold=0.2)
    assert len(expected) > 0 and [d["name"] for d in answer["detections"]] == expected.names
    assert [d["score"] for d in answer["detections"]] == pytest.approx(expected.scores.tolist(), abs=1e-4)


def test_onnx_files_auto_precision_and_explain(exported, tmp_path, capsys):
    _, path = exported
    assert detrkit.Detector.from_pretrained(path, precision="auto").precision == "fp32"
    argv = ["explain", str(tmp_path / "x.png"), "--weights", str(path), "--out", str(tmp_path / "a.png")]
    assert detrkit.cli.main(argv) == 2
    assert "attention maps need the PyTorch model" in capsys.readouterr().err


def test_a_mask_models_export_gives_the_instance_masks_of_pytorch(tmp_path, mask_model):
    """Post-processed export of a mask model: Detector on the file gives PostProcessSegm's masks
    (every size, a batch), and the numpy recipe of the module docstring gives the same without
    detrkit; panoptic output is refused for the file."""
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    # Decisive masks: at random init the mask logits sit near 0, where rounding flips pixels.
    state = mask_model.state_dict()  # at a small input size (~120 px), as the images are
    mask_model = detrkit.build_model(tiny_config(masks=True, extra={"image_scale": 0.15})).eval()
    mask_model.load_state_dict(state)
    with torch.no_grad():
        mask_model.mask_head.out_lay.weight.mul_(50.0)
    path = export_onnx(mask_model, tmp_path / "masks.onnx")
    onnx_detector = detrkit.Detector.from_pretrained(path, batch_size=2)
    reference = detrkit.Detector(mask_model, batch_size=2)
    assert onnx_detector.model.config.num_queries == mask_model.config.num_queries
    generator = torch.Generator().manual_seed(3)
    inputs = [
        torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)
        for h, w in ((90, 130), (90, 130), (150, 70))
    ]
    got = onnx_detector.predict(inputs, threshold=0.0, segmentation="instance")
    want = reference.predict(inputs, threshold=0.0, segmentation="instance")
    for g, w, image in zip(got, want, inputs, strict=True):
        assert g.masks.shape == w.masks.shape == (len(w), *image.shape[1:])
        torch.testing.assert_close(g.scores, w.scores, atol=1e-4, rtol=0)
        # Pixels whose probability is within rounding of 0.5 may flip: all but a handful agree.
        assert (g.masks != w.masks).float().mean() < 1e-4
        assert w.masks.any(), "a test that compares empty masks proves nothing"
    assert onnx_detector.predict(inputs[0], threshold=0.0, segmentation=None)[0].masks is None
    with pytest.raises(ValueError, match="instance masks only"):
        onnx_detector.predict(inputs[0], segmentation="panoptic")

    # onnxruntime and numpy alone, on a padded batch of two sizes.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = [reference.prepare(image)[0] for image in (inputs[0], inputs[2])]
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    batch = np.zeros((2, 3, height, width), np.float32)
    padding = np.ones((2, height, width), bool)
    for k, image in enumerate(images):
        batch[k, :, : image.shape[1], : image.shape[2]] = image.numpy()
        padding[k, : image.shape[1], : image.shape[2]] = False
    originals = np.array([inputs[0].shape[1:], inputs[2].shape[1:]], np.int64)
    _, scores, _, masks = session.run(
        None, {"images": batch, "padding_mask": padding, "orig_sizes": originals}
    )
    from detrkit.models.postprocess import PostProcess, PostProcessSegm

    with torch.no_grad():  # PyTorch on the same padded batch (padding changes what a model sees)
        outputs = mask_model(torch.from_numpy(batch), torch.from_numpy(padding))
        image_sizes = torch.tensor([list(i.shape[1:]) for i in images])
        expected = PostProcessSegm()(PostProcess()(outputs, torch.from_numpy(originals)), outputs, image_sizes,
                                     torch.from_numpy(originals))  # fmt: skip
    for k, image in enumerate(images):
        h, w_in = image.shape[1:]
        (h0, w0) = originals[k]
        # Nearest neighbours as torch computes them: float32 scale, floor (the docstring's recipe).
        rows = np.minimum(np.floor(np.arange(h0, dtype=np.float32) * (np.float32(h) / np.float32(h0))), h - 1)
        cols = np.minimum(
            np.floor(np.arange(w0, dtype=np.float32) * (np.float32(w_in) / np.float32(w0))), w_in - 1
        )
        numpy_masks = masks[k][:, :h, :w_in][:, rows.astype(int)[:, None], cols.astype(int)]
        reference_masks = expected[k]["masks"][expected[k]["scores"].argsort(descending=True, stable=True)]
        assert numpy_masks.shape == tuple(reference_masks.shape)
        detected = onnx_detector.model.detect(torch.from_numpy(batch), torch.from_numpy(originals),
                                              torch.from_numpy(padding))[k]["masks"]  # fmt: skip
        assert (detected != reference_masks).float().mean() < 1e-4
        assert (torch.from_numpy(numpy_masks) != reference_masks).float().mean() < 1e-4


def test_the_exported_masks_follow_the_detections_order(mask_model):
    """Each query's mask stays with its box and score through the export's sort: with mask logits
    that differ per query (a random init gives near-identical ones), the graph's masks equal
    PostProcessSegm's, sorted by score."""
    from detrkit.models.postprocess import PostProcess, PostProcessSegm

    images, mask = example_inputs(((64, 96), (96, 64)), seed=4)

    def distinct_masks(module, inputs, out):  # the same logits on every call
        generator = torch.Generator().manual_seed(0)
        out["pred_masks"] = torch.randn(out["pred_masks"].shape, generator=generator) * 5
        return out

    handle = mask_model.register_forward_hook(distinct_masks)
    try:
        orig = torch.tensor([[70, 100], [120, 80]])
        with torch.no_grad():
            _, scores, _, masks = DetectionsExport(mask_model)(images, mask, orig)
            outputs = mask_model(images, mask)
        expected = PostProcessSegm()(
            PostProcess()(outputs, orig), outputs, torch.tensor([[64, 96], [96, 64]]), orig
        )
    finally:
        handle.remove()
    for k, (h, w) in enumerate(((64, 96), (96, 64))):
        order = expected[k]["scores"].argsort(descending=True)
        torch.testing.assert_close(scores[k], expected[k]["scores"][order])
        cropped = masks[k][:, :h, :w].unsqueeze(1).float()
        resized = torch.nn.functional.interpolate(cropped, size=tuple(orig[k].tolist()), mode="nearest")[:, 0]
        assert torch.equal(resized.bool(), expected[k]["masks"][order])
        assert (expected[k]["masks"] != expected[k]["masks"][:1]).any()
