"""Deployment paths: int8 export for CPUs (``detrkit export --int8 --calibrate``), the evaluation
of ONNX files, and ``detrkit benchmark``.

A small DETR learns the synthetic training images (so that AP means something), is exported in
fp32 and in int8, and both files are evaluated through the same loop as the PyTorch model.
"""

from __future__ import annotations

import json
import re
import time

import numpy as np
import onnx
import pytest
import torch
from torch.utils.data import DataLoader

import detrkit
from conftest import fit_batch, tiny_config
from detrkit.cli import main
from detrkit.data import CocoDetection, TransformConfig, collate, eval_transforms
from detrkit.evaluation.coco import CocoEvaluator
from detrkit.evaluation.loop import box_metrics, evaluate, open_detection_split
from detrkit.inference.benchmark import InferencePath, percentile, time_paths
from detrkit.inference.export import example_inputs, export_onnx
from detrkit.inference.onnx_model import OnnxDetr

pytest.importorskip("onnxruntime")
SCALE = 0.12


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """(checkpoint path, the model, its training split): a DETR that has learned 8 images."""
    torch.manual_seed(0)
    transforms = eval_transforms(TransformConfig.scaled(SCALE))
    probe, *_ = open_detection_split(tiny_config(), data_root, "train2017", "auto", transforms)
    cmap = probe.category_map
    config = tiny_config(
        num_classes=len(cmap.category_ids),
        category_ids=cmap.category_ids,
        class_names=cmap.names,
        frozen_bn=False,
        num_queries=10,
        extra={"image_scale": SCALE},
    )
    model = detrkit.build_model(config)
    dataset: CocoDetection = open_detection_split(config, data_root, "train2017", "auto", transforms)[0]
    fit_batch(model, collate([dataset[i] for i in range(len(dataset))]), 80)
    path = tmp_path_factory.mktemp("int8") / "model.safetensors"
    detrkit.save_model(model, path)
    return path, model, dataset


@pytest.fixture(scope="module")
def fp32_file(trained, tmp_path_factory):
    return export_onnx(trained[1], tmp_path_factory.mktemp("fp32") / "m.onnx")


def _evaluated(model, dataset) -> tuple[dict[str, float], dict[int, np.ndarray]]:
    """The metrics and, per image, its detections [score, x, y, w, h] sorted by score."""
    evaluator = CocoEvaluator(dataset.data, dataset.category_map)
    # Batches of 3 images of different sizes: padded, as evaluation batches are.
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate)
    metrics = evaluate(model, loader, evaluator, torch.device("cpu"))
    per_image = {}
    for image_id in {r["image_id"] for r in evaluator.results}:
        rows = [[r["score"], *r["bbox"]] for r in evaluator.results if r["image_id"] == image_id]
        per_image[image_id] = np.array(sorted(rows, reverse=True))
    return metrics, per_image


def test_an_onnx_file_is_evaluated_as_the_pytorch_model(trained, fp32_file):
    _, model, dataset = trained
    expected, expected_dets = _evaluated(model, dataset)
    assert expected["bbox/AP50"] > 0.3, "the model must have learned something for this to test anything"
    got, got_dets = _evaluated(OnnxDetr(fp32_file), dataset)
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/AR100"):
        assert got[key] == pytest.approx(expected[key], abs=1e-3), key
    assert got_dets.keys() == expected_dets.keys()
    for image_id, dets in expected_dets.items():  # the best five of each image
        assert np.abs(got_dets[image_id][:5] - dets[:5]).max() < 1e-3, image_id
    # (At these sizes the padding of an evaluation batch is under one feature cell.) A batch padded
    # by whole cells: the file reads the padding mask as the model does.
    images, mask = example_inputs(((128, 160), (64, 64)), seed=4)
    sizes = torch.tensor([[128, 160], [64, 64]])
    with torch.no_grad():
        reference = detrkit.PostProcess()(model(images, mask), sizes)
    for got_image, ref in zip(OnnxDetr(fp32_file).detect(images, sizes, mask), reference, strict=True):
        order = ref["scores"].argsort(descending=True)
        assert torch.allclose(got_image["scores"], ref["scores"][order], atol=1e-4)
        assert torch.allclose(got_image["boxes"], ref["boxes"][order], atol=0.05)
        assert torch.equal(got_image["labels"], ref["labels"][order])


def _printed(out: str, name: str) -> tuple[float, float]:
    match = re.search(rf"{name}: AP (\S+)\s+AP50 (\S+)", out)
    assert match, out
    return float(match[1]), float(match[2])


def test_int8_export_quantises_the_convolutions_and_prints_the_ap_it_costs(
    trained, data_root, tmp_path, capsys
):
    weights, model, dataset = trained
    out = tmp_path / "int8.onnx"
    args = ["export", "--weights", str(weights), "--out", str(out), "--int8", "--calibrate", str(data_root)]
    # The AP is measured on the images the model learned (its held-out AP is ~0 at this size).
    assert main([*args, "--calibration-images", "5", "--eval-split", "train2017"]) == 0
    printed = capsys.readouterr().out
    assert "calibrated on 5 image(s) of train2017" in printed
    fp32, int8 = _printed(printed, "fp32"), _printed(printed, "int8")
    expected = box_metrics(model, dataset)
    assert fp32 == pytest.approx((100 * expected["bbox/AP"], 100 * expected["bbox/AP50"]), abs=0.051)

    # Every convolution reads int8 weights and quantised activations; the transformer stays fp32.
    graph = onnx.load(str(out)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(producers.get(n.input[0]) == "DequantizeLinear" for n in convs)
    assert all(producers.get(n.input[1]) == "DequantizeLinear" for n in convs)
    # Weights per output channel: one scale per filter.
    dequantize = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for conv in convs:
        weight = dequantize[conv.input[1]]
        assert shapes[weight.input[1]] == shapes[weight.input[0]][:1], conv.name
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert matmuls and not any(producers.get(n.input[1]) == "DequantizeLinear" for n in matmuls)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert "on 5 image(s)" in meta["quantization"] and "class_names" in meta

    # What export printed is what `detrkit eval` measures on the int8 file; int8 costs little.
    quantised = box_metrics(OnnxDetr(out), dataset)
    assert int8 == pytest.approx((100 * quantised["bbox/AP"], 100 * quantised["bbox/AP50"]), abs=0.051)
    assert abs(quantised["bbox/AP50"] - expected["bbox/AP50"]) <= 0.05
    assert main(["eval", "--weights", str(out), "--data", str(data_root), "--split", "train2017",
                 "--num-workers", "0"]) == 0  # fmt: skip
    assert re.search(rf"bbox\s+{int8[0]:.1f}\s+{int8[1]:.1f}\s", capsys.readouterr().out)

    # The int8 detections are the fp32 ones, up to quantisation: same top boxes, close scores.
    image = collate([dataset[0]])
    sizes = torch.stack([t["orig_size"] for t in image.targets])
    with torch.no_grad():
        reference = detrkit.PostProcess()(model(image.images, image.padding_mask), sizes)[0]
    got = OnnxDetr(out).detect(image.images, sizes, image.padding_mask)[0]
    best = reference["scores"].argmax()
    top = got["scores"].argmax()
    assert got["labels"][top] == reference["labels"][best]
    assert (got["boxes"][top] - reference["boxes"][best]).abs().max() < 2.0
    assert abs(float(got["scores"][top] - reference["scores"][best])) < 0.1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--int8"], "--int8 needs --calibrate DATA"),
        (["--int8", "--raw", "--calibrate", "{data}"], "drop --format torchscript / --raw"),
        (["--calibrate", "{data}"], "--calibrate is for --int8"),
        (["--int8", "--calibrate", "{tmp}/nothing"], "no such file or directory"),
        (["--int8", "--calibrate", "{data}", "--eval-split", "test"], "test"),
    ],
)
def test_int8_export_refusals_write_nothing(trained, data_root, tmp_path, capsys, extra, message):
    out = tmp_path / "int8.onnx"
    extra = [e.format(data=data_root, tmp=tmp_path) for e in extra]
    assert main(["export", "--weights", str(trained[0]), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_an_onnx_file_runs_in_its_own_precision(fp32_file, data_root, capsys):
    code = main(["eval", "--weights", str(fp32_file), "--data", str(data_root), "--precision", "bf16"])
    assert code == 2 and "runs as it was exported" in capsys.readouterr().err


def test_percentile_is_numpys():
    values = [5.0, 1.0, 9.0, 3.0, 7.5, 2.0, 8.0]
    for q in (0.0, 0.5, 0.9, 1.0):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q * 100)))


def test_paths_are_timed_interleaved_after_their_warm_up():
    calls = []

    def path(name):
        def run(*inputs):
            calls.append(name)
            time.sleep(0.002 * (1 + len(calls) % 3))  # runs of different lengths

        return InferencePath(name, "fp32", run, model=None)

    rows = time_paths([path("a"), path("b")], 2, 32, 48, torch.device("cpu"), runs=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert [(r.backend, r.batch, r.height, r.width, len(r.runs_ms)) for r in rows] == [
        ("a", 2, 32, 48, 3),
        ("b", 2, 32, 48, 3),
    ]
    for r in rows:
        assert r.median_ms == pytest.approx(float(np.median(r.runs_ms)), abs=0.001)
        assert r.p90_ms == pytest.approx(float(np.percentile(r.runs_ms, 90)), abs=0.001)
        assert r.images_per_s == pytest.approx(2000 / r.median_ms, rel=1e-3)


def test_benchmark_times_every_path_and_measures_each_ones_ap(trained, data_root, capsys):
    weights, model, dataset = trained
    args = ["benchmark", "--weights", str(weights), "--data", str(data_root), "--split", "train2017",
            "--calibration-images", "3", "--batch", "1", "2", "--size", "64x96", "--runs", "3", "--warmup", "1"]  # fmt: skip
    assert main([*args, "--precision", "fp32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["calibration"] == "3 images of train2017"
    rows = result["rows"]
    assert [(r["backend"], r["precision"], r["batch"]) for r in rows] == [
        (backend, precision, batch)
        for batch in (1, 2)
        for backend, precision in (("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))
    ]
    assert all((r["height"], r["width"]) == (64, 96) for r in rows)
    for r in rows:
        assert min(r["runs_ms"]) <= r["median_ms"] <= r["p90_ms"] <= max(r["runs_ms"])
    # Each path's AP is the evaluation's: the PyTorch model's, its fp32 export's, int8 close to them.
    expected = box_metrics(model, dataset)
    ap = {(r["backend"], r["precision"]): (r["AP"], r["AP50"]) for r in rows}
    assert ap["pytorch", "fp32"] == pytest.approx((expected["bbox/AP"], expected["bbox/AP50"]), abs=1e-6)
    assert ap["onnxruntime", "fp32"] == pytest.approx(ap["pytorch", "fp32"], abs=1e-3)
    assert ap["onnxruntime", "int8"][1] == pytest.approx(expected["bbox/AP50"], abs=0.05)


def test_benchmark_of_an_onnx_file_and_its_table(fp32_file, capsys):
    args = ["benchmark", "--weights", str(fp32_file), "--runs", "3", "--warmup", "1"]
    assert main(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("machine: ") and "threads" in table[0]
    # The file runs as it is: one path, at the model's own input size (scale 0.12: 96 x 128).
    assert [line.split()[:4] for line in table[3:]] == [["onnxruntime", "fp32", "1", "96x128"]]
    with pytest.raises(SystemExit):
        main([*args, "--size", "20x400"])
    assert "expected HEIGHTxWIDTH, each at least 32" in capsys.readouterr().err


def test_benchmark_refuses_a_bad_split_before_any_slow_work(trained, data_root, capsys):
    args = ["benchmark", "--weights", str(trained[0]), "--data", str(data_root), "--split", "test"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "test" in err.splitlines()[-1] and "exporting" not in err and "timing" not in err, err
