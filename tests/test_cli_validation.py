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
    (["plot", "{badrun}"], "metrics.jsonl:2: not a JSON line"),
    (["plot", "{listrun}"], "metrics.jsonl:1: not an epoch record"),
    (["convert", "{garbage}", "{out}/o.safetensors", "--to", "detrkit"], "not a readable PyTorch checkpoint"),
    (["convert", "{hfdir}", "{out}/o.safetensors", "--to", "detrkit"], "config.json: not valid JSON"),
    (["info", "{garbage}"], "not a readable PyTorch checkpoint"),
    (["info", "{hfdir}"], "config.json: not valid JSON"),
    (["info", "{missing}"], "nothing-here"),
    (
        ["predict", "{garbage}", "--weights", "{garbage}", "--out", "{out}/p"],
        "not a readable PyTorch checkpoint",
    ),
    (["predict", "{garbage}", "--weights", "{hfdir}", "--out", "{out}/p"], "config.json: not valid JSON"),
    (["eval", "--weights", "{garbage}", "--data", "{missing}"], "not a readable PyTorch checkpoint"),
    (["eval", "--weights", "{model}", "--data", "{badjson}"], "instances_val2017.json: not valid JSON"),
    (
        ["eval", "--weights", "{model}", "--data", "{latin1}"],
        "instances_val2017.json: the annotation file is not UTF-8",
    ),
    (["eval", "--weights", "{model}", "--data", "{nocats}"], "'categories' is a list"),
    (["eval", "--weights", "{model}", "--data", "{missing}"], "nothing-here"),
    (["explain", "{garbage}", "--weights", "{garbage}", "--out", "{out}/x.png"], "not a readable PyTorch"),
    (["explain", "{missing}", "--weights", "{model}", "--out", "{out}/x.png"], "nothing-here"),
    (["serve", "--weights", "{garbage}"], "not a readable PyTorch checkpoint"),
    (["serve", "--weights", "{hfdir}"], "config.json: not valid JSON"),
    (["export", "--weights", "{missing}", "--out", "{out}/m.onnx"], "no such file or directory"),
    (["export", "--weights", "{hfdir}", "--out", "{out}/m.onnx"], "config.json: not valid JSON"),
    (["data", "check", "{missing}"], "no instances_*.json"),
    (
        ["train", "--data", "{missing}", "--output-dir", "{out}/run"],
        "nothing-here: no such file or directory",
    ),
    (["train", "--data", "{badjson}", "--output-dir", "{out}/run"], "not valid JSON"),
    (["train", "--data", "{latin1}", "--output-dir", "{out}/run"], "is not UTF-8 text"),
    (["train", "--config", "{garbage}", "--output-dir", "{out}/run"], "garbage.pth: not a config file"),
    (["train", "--config", "{missing}.yaml"], "nothing-here.yaml: config file not found"),
    (["train", "--config", "{confdir}"], "conf.yaml: is a folder; expected a config file"),
    (["train", "--config", "{pipe}"], "pipe.yaml: not a regular file"),
    (["train", "--config", "{badyaml}"], "bad.yaml: invalid config file"),
    (["train", "--config", "{badtoml}"], "bad.toml: invalid config file"),
    (["train", "--config", "{badjsonconf}"], "bad.json: invalid config file"),
    (["train", "--config", "{listyaml}"], "list.yaml: a config file must hold a mapping"),
    (["train", "--config", "{typesyaml}"], "TrainConfig.epochs=[1]: expected int"),
    (["train", "--config", "{latin1yaml}"], "latin.yaml: the config file is not UTF-8 text"),
    (["train", "--resume", "--output-dir", "{out}/norun"], "--resume: no checkpoint at"),
    (["train", "--init-from", "{garbage}", "--output-dir", "{out}/run"], "not a readable PyTorch checkpoint"),
    (["plot", "{dirlog}"], "no metrics log"),
    (["explain", "{notimage}", "--weights", "{model}", "--out", "{out}/x.png"], "not an image"),
]

# Every command that reads weights, against every kind of broken weights file.
WEIGHT_COMMANDS = {
    "info": ["info", "{w}"],
    "convert": ["convert", "{w}", "{out}/o.safetensors", "--to", "detrkit"],
    "predict": ["predict", "{notimage}", "--weights", "{w}", "--out", "{out}/p"],
    "eval": ["eval", "--weights", "{w}", "--data", "{missing}"],
    "explain": ["explain", "{notimage}", "--weights", "{w}", "--out", "{out}/x.png"],
    "serve": ["serve", "--weights", "{w}", "--port", "0"],
    "export": ["export", "--weights", "{w}", "--out", "{out}/m.onnx"],
    "train": ["train", "--init-from", "{w}", "--output-dir", "{out}/run"],
}
BAD_WEIGHTS = {
    "{missing}": "no such file or directory, not an official checkpoint name",
    "{garbage}": "not a readable PyTorch checkpoint",
    "{emptydir}": "a directory without config.json",
    "{hfdir}": "config.json: not valid JSON",
    "{hflist}": "config.json: expected a JSON object",
    "{tensorpth}": "expected a state dict of tensors",
    "{truncated}": "not a readable safetensors file",
    "{metalist}": "detrkit checkpoint whose config is not a JSON object",
    "{metabroken}": "detrkit checkpoint with a broken config",
    "{metatypes}": "DetrConfig.num_classes='x': expected int",
    "{metaunknown}": "unknown DetrConfig field(s) in the checkpoint's config: zzz",
}
BAD_FILES += [
    ([a.replace("{w}", weights) for a in argv], message)
    for argv in WEIGHT_COMMANDS.values()
    for weights, message in BAD_WEIGHTS.items()
]
# Every command that reads a dataset, against annotation files of the wrong shape.
BAD_FILES += [
    (argv + [data], message)
    for argv in (["eval", "--weights", "{model}", "--data"], ["train", "--output-dir", "{out}/run", "--data"])
    for data, message in {
        "{bboxstr}": "annotations[0].bbox = 'x': expected [x, y, width, height]",
        "{imgsdict}": "missing or invalid 'images' list",
        "{toplist}": "expected a JSON object",
    }.items()
]


BAD_METADATA = ("metalist", "metabroken", "metatypes", "metaunknown")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """One of each kind of broken user file, and a small model to pair them with."""
    import json
    import os

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from conftest import shapes_config

    root = tmp_path_factory.mktemp("badfiles")
    torch.manual_seed(0)
    detrkit.save_model(detrkit.build_model(shapes_config()), root / "model.safetensors")
    (root / "garbage.pth").write_text("hello: [not, a, checkpoint\n")
    for name, text in {
        "badrun/metrics.jsonl": '{"epoch": 1}\n{"epoch": 2\n',
        "listrun/metrics.jsonl": "[1, 2]\n",
        "hfdir/config.json": '{"model_type": "detr", ',
        "hfdir/model.safetensors": "",
        "badjson/annotations/instances_val2017.json": '{"images": [',
        "badjson/annotations/instances_train2017.json": '{"images": [',
        "nocats/annotations/instances_val2017.json": '{"images": [], "categories": 5}',
        "bad.yaml": "lr: [1, 2\n",
        "bad.toml": "lr = \n",
        "bad.json": '{"lr": ',
        "list.yaml": "- 1\n- 2\n",
        "types.yaml": "epochs: [1]\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    latin = '{"images": [], "annotations": [], "categories": [{"id": 1, "name": "caf\xe9"}]}'
    for split in ("train2017", "val2017"):
        (root / "latin1/annotations").mkdir(parents=True, exist_ok=True)
        (root / f"latin1/annotations/instances_{split}.json").write_bytes(latin.encode("latin-1"))
    (root / "latin.yaml").write_bytes("data: caf\xe9\n".encode("latin-1"))
    (root / "emptydir").mkdir()
    (root / "dirlog/metrics.jsonl").mkdir(parents=True)
    (root / "notimage.jpg").write_text("not an image")
    (root / "hflist").mkdir()
    (root / "hflist/config.json").write_text("[1]")
    torch.save(torch.zeros(3), root / "tensor.pth")
    (root / "truncated.safetensors").write_bytes((root / "model.safetensors").read_bytes()[:1000])
    tensors = load_file(root / "model.safetensors")
    with safe_open(root / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["config"])
    for name, text in {
        "metalist": "[1, 2]",
        "metabroken": "{",
        "metatypes": json.dumps({**config, "num_classes": "x"}),
        "metaunknown": json.dumps({**config, "zzz": 1}),
    }.items():
        save_file(tensors, root / f"{name}.safetensors", metadata={**metadata, "config": text})
    bad_annotations = {
        "bboxstr": {
            "images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": "x"}],
            "categories": [{"id": 1, "name": "a"}],
        },
        "imgsdict": {"images": {"a": 1}, "annotations": [], "categories": [{"id": 1, "name": "a"}]},
        "toplist": [1, 2],
    }
    for name, content in bad_annotations.items():
        (root / name / "annotations").mkdir(parents=True)
        for split in ("train2017", "val2017"):
            (root / name / f"annotations/instances_{split}.json").write_text(json.dumps(content))
    (root / "conf.yaml").mkdir()
    os.mkfifo(root / "pipe.yaml")  # reading it would block forever
    return root


@pytest.mark.parametrize("argv,message", BAD_FILES, ids=[" ".join(a[:2] + a[-1:]) for a, _ in BAD_FILES])
def test_every_command_names_a_bad_file_without_a_traceback(argv, message, capsys, tmp_path, bad_files):
    names = ("badrun", "listrun", "hfdir", "badjson", "nocats", "latin1", "emptydir", "hflist", "bboxstr")
    paths = {name: bad_files / name for name in names + ("imgsdict", "toplist")}
    paths.update({name: bad_files / f"{name}.safetensors" for name in BAD_METADATA + ("truncated",)})
    paths.update(
        tensorpth=bad_files / "tensor.pth", notimage=bad_files / "notimage.jpg", dirlog=bad_files / "dirlog"
    )
    paths.update(
        garbage=bad_files / "garbage.pth", missing=tmp_path / "nothing-here", out=tmp_path / "out",
        model=bad_files / "model.safetensors", confdir=bad_files / "conf.yaml", pipe=bad_files / "pipe.yaml",
        badyaml=bad_files / "bad.yaml", badtoml=bad_files / "bad.toml", badjsonconf=bad_files / "bad.json",
        listyaml=bad_files / "list.yaml", typesyaml=bad_files / "types.yaml", latin1yaml=bad_files / "latin.yaml",
    )  # fmt: skip
    code = detrkit.cli.main([a.format(**paths) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert message in captured.err and "Traceback" not in captured.out + captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    # Refused before any work: nothing written (no run folder, no synthesised data, no partial file).
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_a_user_error_is_one_line_whatever_its_message(monkeypatch, capsys):
    # Messages from other libraries (a parser's, the OS's) may span lines: the user still gets one.
    import detrkit.cli.info
    from detrkit.errors import ConfigError

    def fail(args):
        raise ConfigError("first line\n  second line\n\n")

    monkeypatch.setattr(detrkit.cli.info, "run", fail)
    assert detrkit.cli.main(["info", "x"]) == 2
    assert capsys.readouterr().err == "detrkit info: error: first line second line\n"


@pytest.mark.parametrize(
    "name,message",
    [
        ("bboxstr", "annotations[0].bbox = 'x': expected [x, y, width, height]"),
        ("imgsdict", "no 'images' list"),
        ("toplist", "the file holds list, not a JSON object"),
        ("badjson", "instances_val2017.json: not valid JSON"),
        ("latin1", "instances_val2017.json: the annotation file is not UTF-8"),
    ],
)
def test_data_check_reports_a_bad_annotation_file_and_fails(name, message, capsys, bad_files):
    """``data check`` reports (exit 1) rather than refusing: every split's file is named with its fault."""
    code = detrkit.cli.main(["data", "check", str(bad_files / name)])
    captured = capsys.readouterr()
    assert code == 1, captured.out + captured.err
    assert message in captured.out and "Traceback" not in captured.out + captured.err
    assert "FAILED" in captured.out
