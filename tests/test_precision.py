"""Inference precision: bf16 runs the forward in bf16 (results close to fp32, not equal), post-
processing stays fp32, ``auto`` follows the CPU, and what cannot run is refused."""

from __future__ import annotations

import pytest
import torch

import detrkit
import detrkit.cli
from conftest import shapes_config
from detrkit.inference.detector import resolve_precision


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return detrkit.build_model(shapes_config()).eval()


def test_bf16_is_close_to_fp32_but_really_bf16(model):
    image = torch.rand(3, 120, 160)
    [fp32] = detrkit.Detector(model).predict(image, threshold=0.0)
    [bf16] = detrkit.Detector(model, precision="bf16").predict(image, threshold=0.0)
    assert bf16.scores.dtype == torch.float32 and bf16.boxes.dtype == torch.float32
    assert not torch.equal(fp32.scores, bf16.scores)  # the forward did run in bf16
    torch.testing.assert_close(bf16.scores.sort().values, fp32.scores.sort().values, atol=0.03, rtol=0)


def test_auto_follows_the_cpu(monkeypatch):
    import detrkit.amp

    cpu = torch.device("cpu")
    monkeypatch.setattr(detrkit.amp, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(detrkit.amp, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"


@pytest.mark.parametrize("precision,message", [("fp16", "needs a CUDA device"), ("int4", "expected one of")])
def test_what_cannot_run_is_refused(model, precision, message):
    with pytest.raises(ValueError, match=message):
        detrkit.Detector(model, precision=precision)


def test_eval_in_bf16(model, tmp_path, capsys):
    weights = tmp_path / "m.safetensors"
    detrkit.save_model(model, weights)
    argv = ["eval", "--weights", str(weights), "--data", "synthetic", "--out", str(tmp_path / "e"),
            "--num-workers", "0", "--precision", "bf16"]  # fmt: skip
    assert detrkit.cli.main(argv) == 0
    assert "images, bf16)" in capsys.readouterr().out
