"""Input a hostile (or hurried) user gives: each case ends in the right result or in one line that
names the option, file or value and the reason, with exit status 2 -- and nothing already done is
lost: no earlier run, result or output file is replaced by a command that then fails."""

import json
import math
import re
import sys

import numpy as np
import pytest
import torch

import detrkit
import detrkit.cli
from conftest import TINY_MODEL, require, shapes_config, tiny
from detrkit.checkpoints.io import CheckpointError
from detrkit.data import SynthConfig, write_synthetic
from detrkit.errors import ConfigError
from detrkit.training.config import TrainConfig, build_config
from detrkit.training.run_dir import LAST
from detrkit.training.trainer import Trainer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    detrkit.save_model(detrkit.build_model(shapes_config()), root / "model.safetensors")
    data = write_synthetic(root / "data", SynthConfig(images=2, seed=0, min_size=64, max_size=80), {"val": 2})
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train": {"loss": 1.0}}) + "\n")
    (root / "clip.mp4").write_bytes(b"\x00" * 64)
    return {
        "root": root,
        "model": root / "model.safetensors",
        "data": data,
        "image": next((data / "val2017").iterdir()),
    }


def run_cli(argv, capsys):
    try:
        code = detrkit.cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


NO_MPS = not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())

CASES = {
    "query groups beyond memory": (
        ["train", "--query-groups", "10000000"],
        "query_groups=10000000: must be in [1, 64]",
    ),
    "denoising groups beyond memory": (["train", "--denoising-groups", "1000000"], "must be in [0, 100]"),
    "queries beyond memory": (
        ["train", "--set", "model.num_queries=300000000"],
        "num_queries=300000000: must be at most",
    ),
    "synthetic images beyond memory": (
        ["synth", "--out", "{tmp}/s", "--min-size", "13500", "--max-size", "13500"],
        "max_size <= 4096",
    ),
    "an image scale that leaves no image": (
        ["train", "--image-scale", "0.0001"],
        "image_scale=0.0001: must be in [0.04, 10]",
    ),
    "a negative loss weight": (
        ["train", "--set", "model.bbox_loss_coef=-1"],
        "bbox_loss_coef=-1.0: must be 0 or more",
    ),
    "a matcher without costs": (
        [
            "train",
            "--set",
            "model.set_cost_class=0",
            "--set",
            "model.set_cost_bbox=0",
            "--set",
            "model.set_cost_giou=0",
        ],
        "at least one of its three costs",
    ),
    "class names as an option": (
        ["train", "--set", 'model.class_names=["a", "b"]'],
        "model.class_names: a run's classes come from its dataset's categories",
    ),
    "a GPU that is not there": (["train", "--device", "cuda:7"], "device 'cuda:7': this machine has"),
    "a device name of another tool": (
        ["predict", "{image}", "--weights", "{model}", "--out", "{tmp}/p", "--device", "gpu"],
        "device 'gpu': expected auto",
    ),
    "a mistyped device index": (
        ["eval", "--weights", "{model}", "--data", "{data}", "--device", "cuda:7x"],
        "device 'cuda:7x': expected",
    ),
    "a device for serve": (["serve", "--weights", "{model}", "--device", "gpu"], "device 'gpu': expected"),
    "a preset on resume": (
        ["train", "--resume", "--preset", "cpu-tiny", "--output-dir", "{tmp}/r"],
        "--preset only starts a new run",
    ),
    "an opset onnx cannot write": (
        ["export", "--weights", "{model}", "--out", "{tmp}/m.onnx", "--opset", "99"],
        "opset=99: this onnx",
    ),
    "explain into a JPEG name": (
        ["explain", "{image}", "--weights", "{model}", "--out", "{tmp}/x.jpg"],
        "name it *.png",
    ),
    "plot into a JPEG name": (["plot", "{run}", "--out", "{tmp}/c.jpg"], "name it *.png"),
    "semantic masks of a box model": (
        ["predict", "{image}", "--weights", "{model}", "--out", "{tmp}/p", "--segmentation", "semantic"],
        "--segmentation semantic: segmentation='semantic' needs a model with a mask head",
    ),
}
if not torch.cuda.is_available():
    CASES["CUDA on a machine without a GPU"] = (
        ["train", "--device", "cuda"],
        "device 'cuda': this machine has no CUDA GPU",
    )
if NO_MPS:
    CASES["MPS on a machine without it"] = (
        ["explain", "{image}", "--weights", "{model}", "--out", "{tmp}/x.png", "--device", "mps"],
        "MPS (Apple GPUs) is not available",
    )


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_values_are_refused_in_one_line_before_any_work(name, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def not_refused(self):
        raise AssertionError("the command was not refused: it started training")

    monkeypatch.setattr(Trainer, "fit", not_refused)
    argv, message = CASES[name]
    paths = {
        "tmp": tmp_path / "out",
        "model": files["model"],
        "data": files["data"],
        "image": files["image"],
        "run": files["root"] / "run",
    }
    code, out, err = run_cli([a.format(**paths) for a in argv], capsys)
    assert code == 2, out + err
    assert message in err and "Traceback" not in out + err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*")), (
        "a refused command wrote files"
    )


def test_numbers_written_as_yaml_1_1_reads_them_are_numbers(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 1e-4\nlr_backbone: 3E-5\nweight_decay: .5e-4\nmodel:\n  dropout: 1e-1\n")
    cfg = build_config(config_file=config)
    assert (cfg.lr, cfg.lr_backbone, cfg.weight_decay) == (1e-4, 3e-5, 5e-5)
    with pytest.raises(ConfigError, match="TrainConfig.lr='1e-4x': expected float"):
        TrainConfig(lr="1e-4x")


def test_overwrite_destroys_nothing_when_the_new_run_is_refused(tmp_path, data_root, capsys):
    Trainer(tiny(tmp_path, data_root, epochs=1), log=lambda m: None).fit()
    before = (tmp_path / "run" / LAST).read_bytes()
    argv = ["train", "--data", tmp_path / "typo", "--output-dir", tmp_path / "run", "--overwrite"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "typo: no such file or directory" in err
    assert (tmp_path / "run" / LAST).read_bytes() == before


def test_a_predict_run_whose_every_image_fails_keeps_the_earlier_results(files, tmp_path, capsys):
    out = tmp_path / "pred"
    assert (
        run_cli(
            ["predict", files["image"], "--weights", files["model"], "--out", out, "--threshold", "0"], capsys
        )[0]
        == 0
    )
    earlier = (out / "results.json").read_bytes()
    assert json.loads(earlier)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    code, stdout, _ = run_cli(["predict", broken, "--weights", files["model"], "--out", out], capsys)
    assert code == 1 and "nothing written" in stdout
    assert (out / "results.json").read_bytes() == earlier


def test_eval_keeps_earlier_results_and_checks_out_before_evaluating(files, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "--weights", files["model"], "--data", files["data"], "--num-workers", "0", "--out"]
    assert run_cli([*args, out], capsys)[0] == 0
    earlier = (out / "results.json").read_bytes()
    code, _, err = run_cli([*args, out], capsys)
    assert code == 2 and "pass --overwrite" in err
    assert (out / "results.json").read_bytes() == earlier
    assert run_cli([*args, out, "--overwrite"], capsys)[0] == 0
    code, stdout, err = run_cli([*args, files["model"].parent / "run" / "metrics.jsonl"], capsys)
    assert (
        code == 2 and "is a file; expected a folder" in err and "images)" not in stdout
    )  # refused before evaluating


def test_resume_refuses_init_from_and_applies_a_config_file(tmp_path, data_root, capsys):
    cfg = tiny(tmp_path, data_root, epochs=1, eval_every=0)
    Trainer(cfg, log=lambda m: None).fit()
    with pytest.raises(ConfigError, match="--init-from other.pth would be ignored"):
        Trainer(TrainConfig(output_dir=cfg.output_dir), resume=True, overrides={"init_from": "other.pth"})
    more = tmp_path / "more.yaml"
    more.write_text(f"output_dir: {cfg.output_dir}\nepochs: 2\n")
    code, out, err = run_cli(["train", "--resume", "--config", more], capsys)
    assert code == 0, err
    assert "resume: epochs 1 -> 2" in out
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2
    # A model option in the file is one too, and is refused as the flag would be.
    other = tmp_path / "other.yaml"
    other.write_text(f"output_dir: {cfg.output_dir}\nmodel:\n  num_queries: 9\n")
    code, _, err = run_cli(["train", "--resume", "--config", other], capsys)
    assert code == 2 and "--resume: model.num_queries=9 would change the model" in err


def test_a_category_id_beyond_int64_is_refused():
    with pytest.raises(
        ConfigError, match=r"DetrConfig.category_ids=\(1180591620717411303424,\): ids must be in"
    ):
        detrkit.DetrConfig(num_classes=1, category_ids=(2**70,))


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    model = detrkit.build_model(detrkit.DetrConfig(**{**TINY_MODEL, "num_classes": 3}))
    with torch.no_grad():
        model.class_embed.weight[0, 0] = math.nan
    detrkit.save_model(model, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="class_embed.weight hold NaN or infinite values"):
        detrkit.load_model(tmp_path / "nan.safetensors")


@pytest.mark.parametrize(
    "image,threshold,message",
    [
        (np.zeros((0, 0, 3), np.uint8), 0.5, "numpy image of size 0x0"),
        (torch.zeros(3, 0, 5), 0.5, "tensor image of size 0x5"),
        (torch.full((3, 16, 16), math.nan), 0.5, "holds NaN"),
        (torch.rand(3, 16, 16) * 255, 0.5, "must be in [0, 1], got values in"),
        (torch.rand(3, 16, 16), math.nan, "threshold=nan: a score threshold must be a number in [0, 1]"),
        (torch.rand(3, 16, 16), 1.5, "threshold=1.5"),
        (torch.rand(3, 16, 16), {"panoptic_threshold": math.nan}, "panoptic_threshold=nan"),
    ],
)
def test_detector_refuses_images_and_thresholds_it_would_get_wrong(files, image, threshold, message):
    detector = detrkit.Detector.from_pretrained(files["model"], device="cpu")
    kwargs = threshold if isinstance(threshold, dict) else {"threshold": threshold}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        detector.predict(image, **kwargs)


def test_a_missing_extra_names_its_install_line(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed: `import av` fails
    code, _, err = run_cli(
        ["predict", files["root"] / "clip.mp4", "--weights", files["model"], "--out", tmp_path / "p"], capsys
    )
    assert code == 2 and "video input needs the video extra: pip install 'detrkit[video]'" in err
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "detrkit.inference.serve", raising=False)
    code, _, err = run_cli(["serve", "--weights", files["model"]], capsys)
    assert code == 2 and "pip install 'detrkit[serve]'" in err


def test_imagenet_weights_that_cannot_be_downloaded_are_named(monkeypatch):
    import urllib.error

    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    config = detrkit.DetrConfig(**{**TINY_MODEL, "num_classes": 3, "pretrained_backbone": True})
    with pytest.raises(ConfigError, match="ImageNet weights of resnet18 could not be downloaded"):
        detrkit.build_model(config)


def test_another_synthetic_dataset_is_written_anew_not_reused(tmp_path):
    from detrkit.data.synthetic import ensure_synthetic

    small = SynthConfig(images=2, seed=0, min_size=64, max_size=64)
    assert ensure_synthetic(tmp_path, small, {"train": 2, "val": 1})
    assert not ensure_synthetic(tmp_path, small, {"train": 2, "val": 1})  # the same one: reused
    assert ensure_synthetic(tmp_path, small, {"train": 3, "val": 1})  # more images: written
    images = json.loads((tmp_path / "annotations" / "instances_train2017.json").read_text())["images"]
    assert len(images) == 3


def test_a_model_option_that_is_not_a_mapping_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: 5\n")
    with pytest.raises(ConfigError, match="TrainConfig.model=5: expected dict"):
        build_config(config_file=config)


def test_broken_links_in_a_folder_are_named_and_counted(files, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(files["image"].read_bytes())
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    code, out, err = run_cli(
        ["predict", folder, "--weights", files["model"], "--out", tmp_path / "p"], capsys
    )
    assert code == 1 and "1 images" in out and "2 failed" in out
    assert "gone.jpg: a symbolic link to nothing readable" in err and "loop.jpg" in err


def test_eval_warns_when_the_dataset_names_the_models_classes_otherwise(files, tmp_path, capsys):
    import shutil

    data = tmp_path / "renamed"
    shutil.copytree(files["data"], data)
    ann = data / "annotations" / "instances_val2017.json"
    content = json.loads(ann.read_text())
    for category in content["categories"]:
        if category["id"] == 2:
            category["name"] = "circle"  # the model calls id 2 "ellipse"
    ann.write_text(json.dumps(content))
    code, _, err = run_cli(
        ["eval", "--weights", files["model"], "--data", data, "--num-workers", "0"], capsys
    )
    assert code == 0
    assert "name 1 category id(s) differently (model / dataset): 2: 'ellipse' / 'circle'" in err


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("backbone_config", "resnet", "config.json: a field has a type transformers does not write"),
        ("backbone_kwargs", [1], "config.json: a field has a type transformers does not write"),
        ("eos_coefficient", None, "config.json: a field has a type transformers does not write"),
        ("id2label", {"0": "a", "1": "b", "2": "c", "7": "d"}, "id2label must name the labels 0 to N-1"),
    ],
)
def test_a_transformers_config_with_fields_of_other_types_is_named(tmp_path, field, value, message):
    from conftest import tiny_config

    detrkit.save_model(detrkit.build_model(tiny_config()), tmp_path / "hf", "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("detrkit_config")
    config[field] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        detrkit.load_model(tmp_path / "hf")


def test_training_without_one_readable_validation_image_is_refused_before_it_starts(tmp_path):
    data = write_synthetic(
        tmp_path / "d", SynthConfig(images=4, seed=0, min_size=64, max_size=64), {"train": 4, "val": 2}
    )
    for image in (data / "val2017").iterdir():
        image.write_bytes(b"not an image")
    with pytest.raises(detrkit.data.DatasetError, match=r"none of the 2 validation images of .* can be read"):
        Trainer(tiny(tmp_path, data, epochs=1), log=lambda m: None)


def test_fine_tuning_boxes_from_a_mask_model_leaves_its_mask_head_out(tmp_path, data_root):
    source = detrkit.build_model(
        detrkit.DetrConfig(**{**TINY_MODEL, "d_model": 64, "nheads": 8, "num_classes": 4, "masks": True})
    )
    detrkit.save_model(source, tmp_path / "masks.safetensors")
    messages = []
    trainer = Trainer(
        tiny(tmp_path, data_root, epochs=1, model={}, init_from=str(tmp_path / "masks.safetensors")),
        log=messages.append,
    )
    assert not trainer.model.config.masks
    assert any("mask head of" in m and "is not trained" in m for m in messages)
    assert "bbox/AP" in trainer.fit()


def test_a_video_too_thin_to_encode_is_named_and_skipped(files, tmp_path, capsys):
    av = require("av")
    thin = tmp_path / "thin.mkv"
    with av.open(str(thin), "w") as container:
        stream = container.add_stream("mjpeg", rate=5)
        stream.width, stream.height, stream.pix_fmt = 1, 16, "yuvj444p"
        for _ in range(2):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 1, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    code, out, err = run_cli(
        ["predict", thin, files["image"], "--weights", files["model"], "--out", tmp_path / "p"], capsys
    )
    assert code == 1 and "1 failed" in out
    assert "a video of 1x16 pixels is too small to encode" in err


def test_model_extras_must_be_json_data():
    with pytest.raises(ConfigError, match="DetrConfig.extra=.*: must be JSON data"):
        detrkit.DetrConfig(num_classes=2, extra={"when": object()})


def test_a_timm_backbone_of_one_fixed_input_size_is_refused():
    require("timm")
    with pytest.raises(ConfigError, match="takes images of one fixed size only"):
        detrkit.DetrConfig(num_classes=2, backbone="timm:swin_tiny_patch4_window7_224")


@pytest.mark.parametrize("source", ["R/checkpoint..pth", "ab/c--d", "runs/model.pth", "a/-b"])
def test_a_mistyped_local_path_is_not_sent_to_the_hub(source, tmp_path, monkeypatch):
    import detrkit.checkpoints.hub as hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "download_hub_repo", lambda *a, **k: pytest.fail("sent to the Hub"))
    with pytest.raises(CheckpointError, match=f"{re.escape(source)}: no such file or directory"):
        detrkit.load_model(source)


@pytest.mark.parametrize("config", ["[1, 2]", "null"])
def test_a_detrkit_file_whose_config_is_not_an_object_is_named(files, tmp_path, config):
    from safetensors.torch import load_file, save_file

    state = load_file(files["model"])
    save_file(state, tmp_path / "odd.safetensors", metadata={"format": "detrkit", "config": config})
    with pytest.raises(
        CheckpointError, match="odd.safetensors: detrkit checkpoint whose config is not a JSON object"
    ):
        detrkit.load_model(tmp_path / "odd.safetensors")


def test_devices_are_checked_before_a_checkpoint_is_read(files):
    from detrkit.distributed import pick_device

    assert (
        pick_device(None)
        == pick_device("auto")
        == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    )
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device 'gpu': expected auto, cpu, cuda, cuda:N or mps"):
        detrkit.load_model(files["model"], device="gpu")
    with pytest.raises(ConfigError, match="device 'cpu:1': the CPU is cpu"):
        pick_device("cpu:1")


def test_the_synthetic_image_size_bounds_are_inclusive():
    SynthConfig(min_size=32, max_size=4096)  # both ends allowed
    for low, high in ((31, 64), (64, 4097), (100, 99)):
        with pytest.raises(ConfigError, match="need 32 <= min_size <= max_size <= 4096"):
            SynthConfig(min_size=low, max_size=high)


def test_predict_prepared_checks_its_segmentation_mode_too(files):
    # The server prepares images in another thread and calls this directly: it checks for itself.
    detector = detrkit.Detector.from_pretrained(files["model"], device="cpu")
    prepared = [detector.prepare(files["image"])]
    with pytest.raises(ValueError, match="segmentation='semantic' needs a model with a mask head"):
        detector.predict_prepared(prepared, 0.5, segmentation="semantic")
    assert detector.predict_prepared(prepared, 0.0, segmentation="auto")[0].masks is None


def test_init_from_another_size_says_what_was_reinitialised_and_why(tmp_path, data_root):
    source = detrkit.build_model(detrkit.DetrConfig(**{**TINY_MODEL, "num_classes": 4, "d_model": 64}))
    detrkit.save_model(source, tmp_path / "wide.safetensors")
    messages = []
    Trainer(tiny(tmp_path, data_root, init_from=str(tmp_path / "wide.safetensors")), log=messages.append)
    # Same 4 classes and 6 queries: nothing is said of the class count; the size is the reason.
    assert not any("class head re-initialised" in m or "object queries" in m for m in messages)
    (line,) = [m for m in messages if "their shapes differ" in m]
    assert "(d_model 64 -> 32)" in line and "class_embed" in line and "transformer" in line
    assert not any("not in the checkpoint" in m and "transformer" in m for m in messages)


def test_single_channel_panoptic_pngs_are_refused_when_the_dataset_is_built(tmp_path):
    from PIL import Image

    from detrkit.data import CocoPanoptic

    root = write_synthetic(
        tmp_path / "p", SynthConfig(images=2, seed=0, min_size=64, max_size=64), {"val": 2}
    )
    pngs = root / "annotations" / "panoptic_val2017"
    args = (root / "val2017", root / "annotations" / "panoptic_val2017.json", pngs)
    assert len(CocoPanoptic(*args)) == 2  # RGB, as written: fine
    for png in pngs.iterdir():
        Image.open(png).convert("L").save(png)
    with pytest.raises(
        detrkit.data.DatasetError, match=r"a single-channel \(L\) PNG; COCO panoptic PNGs are RGB"
    ):
        CocoPanoptic(*args)
