"""Every option is validated where it is parsed: a bad value gets exit status 2 and one line that
names the option and the reason -- never a traceback, and before any work starts."""

import pytest

import detrkit.cli

CASES = [
    # training options: one validation layer on TrainConfig / DetrConfig, for --set, flags and files
    (["train", "--set", "lr=abc"], "TrainConfig.lr='abc': expected float"),
    (["train", "--lr", "5"], "lr=5.0: a learning rate must be in (0, 1]"),
    (["train", "--lr=-1e-4"], "a learning rate must be in (0, 1]"),
    (["train", "--set", "lr_backbone=0"], "lr_backbone=0.0"),
    (["train", "--weight-decay", "-1"], "weight_decay=-1.0: must be in [0, 1]"),
    (["train", "--ema-decay", "1.5"], "ema_decay=1.5: must be in (0, 1)"),
    (["train", "--epochs", "0"], "epochs=0: must be at least 1"),
    (["train", "--set", "epochs=2.5"], "TrainConfig.epochs=2.5: expected int"),
    (["train", "--set", "batch_size=true"], "TrainConfig.batch_size=True: expected int"),
    (["train", "--image-scale", "0"], "image_scale=0.0"),
    (["train", "--set", "image_scale=NaN"], "image_scale=nan: must be a finite number"),
    (["train", "--num-workers", "-2"], "num_workers=-2: must be 0 or more"),
    (["train", "--device", "gpu"], "device='gpu': expected auto, cpu, mps, cuda or cuda:N"),
    (["train", "--amp", "fp8"], "amp='fp8'"),
    (["train", "--clip-max-norm", "-1"], "clip_max_norm=-1.0"),
    (["train", "--time-budget", "0"], "time_budget=0.0"),
    (["train", "--set", "seed=-1"], "seed=-1"),
    (["train", "--set", "model.num_queries=0"], "DetrConfig.num_queries=0"),
    (["train", "--set", "model.d_model=abc"], "DetrConfig.d_model='abc': expected int"),
    (["train", "--set", "model.dropout=1.5"], "DetrConfig.dropout=1.5"),
    (["train", "--set", "model.backbone=vgg"], "DetrConfig.backbone='vgg'"),
    (["train", "--set", "model.nonsense=1"], "unknown DetrConfig field(s) nonsense"),
    (["train", "--set", "nonsense=1"], "unknown training option(s): nonsense"),
    (["train", "--set", "lr"], "expected key=value"),
    # other commands: argparse types with ranges
    (["predict", "x.jpg", "--weights", "w", "--out", "o", "--threshold", "2"], "must be between 0.0 and 1.0"),
    (["predict", "x.jpg", "--weights", "w", "--out", "o", "--batch-size", "0"], "must be at least 1"),
    (["explain", "x.jpg", "--weights", "w", "--out", "o.png", "--threshold", "-0.1"], "between 0.0 and 1.0"),
    (["eval", "--weights", "w", "--data", "d", "--batch-size", "0"], "must be at least 1"),
    (["eval", "--weights", "w", "--data", "d", "--num-workers", "-1"], "must be at least 0"),
    (["eval", "--weights", "w", "--data", "d", "--image-scale", "inf"], "not a finite number"),
    (["export", "--weights", "w", "--out", "o.onnx", "--opset", "11"], "the ONNX opset must be at least 18"),
    (["serve", "--weights", "w", "--port", "70000"], "a TCP port must be between 0 and 65535"),
    (["serve", "--weights", "w", "--threshold", "1.5"], "between 0.0 and 1.0"),
    (["serve", "--weights", "w", "--max-upload-mb", "-1"], "a size must be at least"),
    (["serve", "--weights", "w", "--max-queue", "0"], "must be at least 1"),
    (["synth", "--out", "o", "--images", "-3"], "must be at least 1"),
    (["synth", "--out", "o", "--min-size", "abc"], "'abc' is not an integer"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_bad_values_are_refused_with_a_clear_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were, not into the checkout
    try:
        code = detrkit.cli.main(argv)
    except SystemExit as e:  # argparse's own errors exit with status 2
        code = e.code
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert message in captured.err, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not any(tmp_path.iterdir()), "a refused command wrote files"


BAD_FILES = [
    (["plot", "{missing}"], "no metrics log"),
    (["convert", "{garbage}", "{out}/o.safetensors", "--to", "detrkit"], "not a readable PyTorch checkpoint"),
    (["info", "{garbage}"], "not a readable PyTorch checkpoint"),
    (
        ["predict", "{garbage}", "--weights", "{garbage}", "--out", "{out}/p"],
        "not a readable PyTorch checkpoint",
    ),
    (["eval", "--weights", "{garbage}", "--data", "{missing}"], "not a readable PyTorch checkpoint"),
    (["explain", "{garbage}", "--weights", "{garbage}", "--out", "{out}/x.png"], "not a readable PyTorch"),
    (["serve", "--weights", "{garbage}"], "not a readable PyTorch checkpoint"),
    (["export", "--weights", "{missing}", "--out", "{out}/m.onnx"], "no such file or directory"),
    (["data", "check", "{missing}"], "no instances_*.json"),
    (["train", "--data", "{missing}", "--output-dir", "{out}/run"], "no annotations for split"),
    (["train", "--config", "{garbage}", "--output-dir", "{out}/run"], "garbage.pth: not a config file"),
]


@pytest.mark.parametrize("argv,message", BAD_FILES, ids=[" ".join(a[:2]) for a, _ in BAD_FILES])
def test_every_command_names_a_bad_file_without_a_traceback(argv, message, capsys, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("hello: [not, a, checkpoint\n")
    paths = {"garbage": garbage, "missing": tmp_path / "nothing-here", "out": tmp_path / "out"}
    code = detrkit.cli.main([a.format(**paths) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert message in captured.err and "Traceback" not in captured.out + captured.err
