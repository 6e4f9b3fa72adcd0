import argparse
import hashlib
import http.server
import json
import os
import pickle
import threading
from functools import partial

import pytest
import torch

import detrkit
import detrkit.cli
from conftest import padded_batch, randomize_buffers, tiny_config
from detrkit import CheckpointError, load_model, save_model
from detrkit.checkpoints import hub
from detrkit.checkpoints.layouts import detrkit_to_original


def outputs_of(model):
    images, padding_mask = padded_batch()
    with torch.no_grad():
        return model(images, padding_mask)


def assert_same_outputs(a, b):
    oa, ob = outputs_of(a), outputs_of(b)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(oa[key], ob[key], atol=1e-6), key


def test_detrkit_format_keeps_config_and_weights(tmp_path, tiny_model):
    config = tiny_model.config.replace(class_names=("a", "b", "c", "d"), category_ids=(1, 5, 9, 12))
    model = detrkit.Detr(config)
    model.load_state_dict(tiny_model.state_dict())
    path = save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.config == config
    assert not loaded.training
    assert_same_outputs(model.eval(), loaded)
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_original_training_checkpoint_with_args_namespace(tmp_path):
    """What the original main.py writes: model, optimizer, lr_scheduler, epoch and an argparse
    Namespace. It loads without unrestricted unpickling, and args supply what weights can't."""
    torch.manual_seed(0)
    config = tiny_config(backbone="resnet50", dilation=True, nheads=4)
    model = detrkit.build_model(config).eval()
    randomize_buffers(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 200)
    args = argparse.Namespace(
        lr=1e-4,
        dilation=True,
        nheads=4,
        dropout=0.0,
        aux_loss=True,
        eos_coef=0.1,
        backbone="resnet50",
        coco_path="/data/coco",
        output_dir="out",
        masks=False,
    )
    torch.save(
        {
            "model": detrkit_to_original(model.state_dict()),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": 12,
            "args": args,
        },
        tmp_path / "checkpoint.pth",
    )
    loaded = load_model(tmp_path / "checkpoint.pth")
    assert loaded.config.dilation and loaded.config.nheads == 4 and loaded.config.backbone == "resnet50"
    assert_same_outputs(model, loaded)


def test_published_style_checkpoint_needs_overrides_only_for_what_weights_hide(tmp_path, tiny_model):
    torch.save({"model": detrkit_to_original(tiny_model.state_dict())}, tmp_path / "published.pth")
    loaded = load_model(tmp_path / "published.pth", dropout=0.0)
    assert loaded.config.replace(extra={}) == tiny_model.config.replace(extra={})
    assert_same_outputs(tiny_model, loaded)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pickle"])
def test_pickle_payload_is_not_executed(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "evil.pth"
    if zip_format:
        torch.save({"model": {"w": torch.zeros(1)}, "x": payload}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": payload}, f)
    with pytest.raises(CheckpointError, match="refused to load") as excinfo:
        load_model(path)
    assert str(path) in str(excinfo.value)
    assert not marker.exists(), "the pickle payload ran"


@pytest.mark.parametrize(
    "content,name,match",
    [
        (b"", "empty.pth", "empty file"),
        (b"hello, not a checkpoint", "text.pth", "not a readable PyTorch checkpoint"),
        (b"\x00\x01garbage", "bad.safetensors", "not a readable safetensors file"),
    ],
)
def test_corrupt_files_give_clear_errors(tmp_path, content, name, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_model(path)


def test_truncated_checkpoint(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "m.pth", "original")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(path)


def test_not_a_detr_state_dict(tmp_path):
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a DETR checkpoint"):
        load_model(tmp_path / "other.pth")


def test_unknown_source_lists_official_names(tmp_path):
    with pytest.raises(CheckpointError, match="detr-r50"):
        load_model(tmp_path / "missing.pth")


def test_cli_convert_and_info(tmp_path, tiny_model, capsys):
    src = save_model(tiny_model, tmp_path / "m.safetensors")
    assert detrkit.cli.main(["convert", str(src), str(tmp_path / "o.pth"), "--to", "original"]) == 0
    assert detrkit.cli.main(["info", str(tmp_path / "o.pth")]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["backbone"] == "resnet18" and info["num_queries"] == 7
    assert detrkit.cli.main(["info", str(tmp_path / "nope.pth")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_pre_norm_cannot_become_hf(tmp_path):
    model = detrkit.build_model(tiny_config(pre_norm=True))
    with pytest.raises(CheckpointError, match="pre-norm"):
        save_model(model, tmp_path / "hf", "hf")


# --- official checkpoints: downloaded for real, from a server on 127.0.0.1 --------------------------


@pytest.fixture
def local_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_official_checkpoint_download(tmp_path, tiny_model, local_server, monkeypatch):
    root, url = local_server
    torch.save({"model": detrkit_to_original(tiny_model.state_dict())}, root / "detr-tiny.pth")
    digest = hashlib.sha256((root / "detr-tiny.pth").read_bytes()).hexdigest()
    entry = hub.OfficialCheckpoint(
        f"detr-tiny-{digest[:8]}.pth", digest[:8], {"dropout": 0.0, "class_names": tuple("abcd")}
    )
    (root / "detr-tiny.pth").rename(root / entry.filename)
    monkeypatch.setitem(hub.OFFICIAL_CHECKPOINTS, "detr-tiny", entry)
    monkeypatch.setattr(hub, "BASE_URL", url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    loaded = load_model("detr-tiny")
    assert (tmp_path / "torch-home" / "hub" / "checkpoints" / entry.filename).exists()
    assert loaded.config.class_names == tuple("abcd")
    assert_same_outputs(tiny_model, loaded)
    (root / entry.filename).unlink()  # the cached copy is used from now on
    assert_same_outputs(tiny_model, load_model("detr-tiny"))


def test_official_checkpoint_offline_and_corrupt(tmp_path, local_server, monkeypatch):
    root, url = local_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    entry = hub.OfficialCheckpoint("detr-x-12345678.pth", "12345678")
    monkeypatch.setitem(hub.OFFICIAL_CHECKPOINTS, "detr-x", entry)

    monkeypatch.setattr(hub, "BASE_URL", "http://127.0.0.1:9/")  # nothing listens on the discard port
    with pytest.raises(CheckpointError, match="put it at .*detr-x-12345678.pth"):
        load_model("detr-x")

    (root / entry.filename).write_bytes(b"not the published file")
    monkeypatch.setattr(hub, "BASE_URL", url)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model("detr-x")
    assert not (tmp_path / "torch-home" / "hub" / "checkpoints" / entry.filename).exists()

    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / entry.filename
    cached.write_bytes(b"placed by hand, wrong file")
    with pytest.raises(CheckpointError, match="does not match the published"):
        load_model("detr-x")


def test_official_registry_matches_published_names():
    for name, entry in hub.OFFICIAL_CHECKPOINTS.items():
        assert entry.filename.startswith(name + "-") and entry.filename.endswith(f"{entry.sha256_prefix}.pth")
        assert entry.url.startswith("https://dl.fbaipublicfiles.com/detr/")
        assert entry.config.get("dilation", False) == ("dc5" in name)


def test_trainable_batchnorm_models_round_trip(tmp_path):
    torch.manual_seed(0)
    model = detrkit.build_model(tiny_config(frozen_bn=False)).train()
    model(torch.randn(2, 3, 64, 64))  # updates the running statistics
    model.eval()
    for fmt, name in (("detrkit", "m.safetensors"), ("original", "m.pth")):
        loaded = load_model(save_model(model, tmp_path / name, fmt))
        assert not loaded.config.frozen_bn
        assert_same_outputs(model, loaded)


def _tampered(tmp_path, tiny_model, name):
    """A detrkit checkpoint broken in one way: its file path."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    good = save_model(tiny_model, tmp_path / "good.safetensors")
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    state = load_file(good)
    config = json.loads(meta["config"])
    out = tmp_path / name
    if name == "wrong-shape.safetensors":
        state["class_embed.weight"] = torch.zeros(3, state["class_embed.weight"].shape[1])
        save_file(state, out, metadata=meta)
    elif name == "contradicting-config.safetensors":
        save_file(state, out, metadata={**meta, "config": json.dumps({**config, "num_queries": 3})})
    elif name == "contradicting-config.pth":
        torch.save({"model": state, "detrkit_config": {**config, "num_classes": 2}}, out)
    elif name == "bad-typed-config.safetensors":
        save_file(state, out, metadata={**meta, "config": json.dumps({**config, "nheads": "eight"})})
    elif name == "unknown-field.safetensors":
        save_file(state, out, metadata={**meta, "config": json.dumps({**config, "bogus": 1})})
    return out


@pytest.mark.parametrize(
    "name,match",
    [
        ("wrong-shape.safetensors", r"class_embed.weight is \[3, \d+\] in the file but \[\d+, \d+\]"),
        (
            "contradicting-config.safetensors",
            r"contradict the checkpoint's config \(.*num_queries=3.*query_embed",
        ),
        ("contradicting-config.pth", r"contradict the checkpoint's config \(num_classes=2.*class_embed"),
        ("bad-typed-config.safetensors", r"DetrConfig.nheads='eight': expected int"),
        ("unknown-field.safetensors", r"bogus"),
    ],
)
def test_checkpoints_that_contradict_themselves_name_the_file_and_the_key(
    tmp_path, tiny_model, name, match, capsys
):
    path = _tampered(tmp_path, tiny_model, name)
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(path)
    assert str(path) in str(info.value)
    # `detrkit info` reads the config without the model: it must notice too.
    assert detrkit.cli.main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err


def test_files_are_read_by_their_content_not_their_name(tmp_path, tiny_model):
    good = save_model(tiny_model, tmp_path / "model.safetensors")
    renamed = tmp_path / "model.pth"
    renamed.write_bytes(good.read_bytes())  # never called a pickle
    assert_same_outputs(load_model(renamed), tiny_model)
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"model": tiny_model.state_dict(), "detrkit_config": tiny_model.config.to_dict()}, pickled)
    assert_same_outputs(load_model(pickled), tiny_model)


def test_a_model_trained_from_imagenet_weights_loads_offline(tmp_path, tiny_model):
    """pretrained_backbone=True says how training started; loading must not fetch those weights
    again (offline it would fail), since the file's weights replace them."""
    import dataclasses

    tiny_model.config = dataclasses.replace(tiny_model.config, pretrained_backbone=True)
    try:
        path = save_model(tiny_model, tmp_path / "from-imagenet.safetensors")
    finally:
        tiny_model.config = dataclasses.replace(tiny_model.config, pretrained_backbone=False)
    assert_same_outputs(load_model(path), tiny_model)


@pytest.mark.parametrize(
    "option,value",
    [
        ("activation_function", "gelu"),
        ("num_channels", 1),
        ("encoder_layerdrop", 0.1),
        ("decoder_layerdrop", 0.2),
        ("decoder_attention_heads", 4),
        ("decoder_ffn_dim", 17),
        ("backbone", "vit_tiny_patch16_224"),  # a timm model without feature maps at strides 4-32
    ],
)
def test_transformers_options_detrkit_cannot_honour_are_refused_by_name(tmp_path, tiny_model, option, value):
    folder = save_model(tiny_model, tmp_path / "hf", fmt="hf")
    config = json.loads((folder / "config.json").read_text())
    config.pop("detrkit_config", None)  # as transformers itself writes it
    assert load_model(_with_config(folder, config, tmp_path / "plain")) is not None
    config[option] = value
    with pytest.raises(CheckpointError, match=rf"{option}={value!r}"):
        load_model(_with_config(folder, config, tmp_path / "refused"))


def _with_config(folder, config, out):
    import shutil

    shutil.copytree(folder, out, dirs_exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    return out
