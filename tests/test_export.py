"""ONNX export with dynamic batch/height/width checked against onnxruntime; TorchScript."""

from __future__ import annotations

import pytest
import torch

import detrkit
from conftest import randomize_buffers, tiny_config
from detrkit.cli import main
from detrkit.inference.export import (
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
    path = export_onnx(mask_model, tmp_path / "export" / "detr.onnx")
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
