"""Writers never destroy what is already there: an output that is an input, an existing file or
folder (without --overwrite), a file where a folder is expected, an unwritable place -- each is
refused with a clear message and exit status 2 before any work starts, and nothing is touched."""

import json

import pytest
import torch

import detrkit
import detrkit.cli
from conftest import shapes_config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    torch.manual_seed(0)
    detrkit.save_model(detrkit.build_model(shapes_config()), root / "model.safetensors")
    run = root / "run"
    run.mkdir()
    (run / "checkpoint_last.pth").write_bytes(b"the previous run's checkpoint")
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 1, "train": {"loss": 1.0}}) + "\n")
    data = root / "data"
    assert detrkit.cli.main(["synth", "--out", str(data), "--images", "2", "--val-images", "1"]) == 0
    (root / "image.png").write_bytes((data / "val2017").glob("*.jpg").__next__().read_bytes())
    (root / "a-file").write_text("not a folder")
    return root


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


CASES = {
    "synth into an existing dataset": (
        ["synth", "--out", "{data}", "--images", "2"],
        "exists and is not empty",
    ),
    "train into another run's folder": (
        ["train", "--data", "{data}", "--output-dir", "{run}", "--epochs", "1"],
        "exists and is not empty; pass --overwrite",
    ),
    "convert onto its source": (["convert", "{model}", "{model}", "--to", "detrkit"], "also an input"),
    "convert over an existing file": (
        ["convert", "{model}", "{run}/checkpoint_last.pth", "--to", "original"],
        "exists; pass --overwrite",
    ),
    "convert hf into a file": (
        ["convert", "{model}", "{image}", "--to", "hf"],
        "is a file; expected a folder",
    ),
    "export over its weights": (["export", "--weights", "{model}", "--out", "{model}"], "also an input"),
    "export into a folder": (["export", "--weights", "{model}", "--out", "{data}"], "is a folder"),
    "export under a file": (
        ["export", "--weights", "{model}", "--out", "{afile}/x.onnx"],
        "is a file, not a folder",
    ),
    "explain over its image": (
        ["explain", "{image}", "--weights", "{model}", "--out", "{image}"],
        "also an input",
    ),
    "explain over a checkpoint": (
        ["explain", "{image}", "--weights", "{model}", "--out", "{run}/checkpoint_last.pth"],
        "pass --overwrite",
    ),
    "plot over the metrics": (["plot", "{run}", "--out", "{run}/metrics.jsonl"], "pass --overwrite"),
    "predict into a file": (
        ["predict", "{image}", "--weights", "{model}", "--out", "{afile}"],
        "is a file; expected a folder",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_that_would_destroy_something_are_refused(files, name, capsys):
    argv, message = CASES[name]
    paths = {
        "data": files / "data",
        "run": files / "run",
        "model": files / "model.safetensors",
        "image": files / "image.png",
        "afile": files / "a-file",
    }
    argv = [a.format(**paths) for a in argv]
    before = _snapshot(files)
    assert detrkit.cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert _snapshot(files) == before, "a refused command changed files"


def test_overwrite_replaces_on_request(files, tmp_path, capsys):
    out = tmp_path / "copy.safetensors"
    out.write_text("old")
    assert detrkit.cli.main(["convert", str(files / "model.safetensors"), str(out), "--to", "detrkit"]) == 2
    assert out.read_text() == "old"
    args = ["convert", str(files / "model.safetensors"), str(out), "--to", "detrkit", "--overwrite"]
    assert detrkit.cli.main(args) == 0
    assert detrkit.load_model(out).config.class_names == ("rectangle", "ellipse", "triangle", "diamond")
