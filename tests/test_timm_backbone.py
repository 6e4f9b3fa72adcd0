"""timm backbones (``DetrConfig(backbone="timm:<name>")``): numerical parity with transformers'
``use_timm_backbone=True`` models of three families, conversion, and the errors for models DETR
cannot use. Random weights, nothing downloaded; transformers and timm are test dependencies.
"""

import pytest
import torch
from safetensors.torch import load_file

import detrkit
import detrkit.cli
from conftest import padded_batch, randomize_buffers, require
from detrkit.errors import CheckpointError, ConfigError
from test_parity_hf import SMALL, TOL, _make_outputs_sensitive, assert_close, hf_outputs, ours

# One per family: MobileNetV3 (BatchNormAct2d, TF "same" padding, BN eps 1e-3), ResNet through timm
# (resnet18-101 load into torchvision's ResNet instead), RegNet (BatchNormAct2d, group convs).
FAMILIES = ["tf_mobilenetv3_small_075", "resnet26", "regnetx_002"]


def hf_timm_model(name: str, segmentation: bool = False, dilation: bool = False):
    """A small random transformers DETR with timm model ``name`` as its backbone."""
    transformers = require("transformers")
    require("timm")
    torch.manual_seed(1)
    config = transformers.DetrConfig(use_timm_backbone=True, backbone=name, dilation=dilation, **SMALL)
    cls = transformers.DetrForSegmentation if segmentation else transformers.DetrForObjectDetection
    model = cls(config).eval()
    randomize_buffers(model, seed=2)  # BatchNorm affine parameters away from identity
    _calibrate_batchnorm(model)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    _make_outputs_sensitive(model)
    return model


def _calibrate_batchnorm(model: torch.nn.Module) -> None:
    """Frozen BatchNorm statistics measured on images, as a trained network has them.

    With random statistics, and with the activations transformers drops from timm's BatchNormAct2d,
    the features grow ~100x per stage (1e5 at stride 32): float rounding then moves outputs by more
    than the tolerance between two identical models (transformers against its own reload)."""
    norms = [m for m in model.modules() if type(m).__name__ == "DetrFrozenBatchNorm2d"]

    def measure(module, args):
        x = args[0].detach()
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)))

    hooks = [m.register_forward_pre_hook(measure) for m in norms]
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(pixel_values=images)
    for hook in hooks:
        hook.remove()


def _saved(tmp_path, hf):
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.mark.parametrize("segmentation", [False, True], ids=["det", "seg"])
@pytest.mark.parametrize("name", FAMILIES)
def test_load_timm_backbone_matches_transformers(tmp_path, name, segmentation):
    hf = hf_timm_model(name, segmentation)
    images, padding_mask = padded_batch()
    expected = hf_outputs(hf, images, padding_mask)

    model = detrkit.load_model(_saved(tmp_path, hf))
    assert model.config.backbone == f"timm:{name}"
    assert model.config.masks == segmentation
    assert_close(expected, ours(model, images, padding_mask))
    # The channel count comes from timm's feature_info without building the model.
    (channels,) = {
        tuple(m.intermediate_channel_sizes) for m in hf.modules() if hasattr(m, "intermediate_channel_sizes")
    }
    assert model.config.num_channels == channels[-1]
    assert model.backbone.channels == (list(channels) if segmentation else [channels[-1]])


@pytest.mark.parametrize("segmentation", [False, True], ids=["det", "seg"])
def test_dc5_timm_backbone_matches_transformers(tmp_path, segmentation):
    """``dilation=True``: transformers asks timm for ``output_stride=16``."""
    hf = hf_timm_model("tf_mobilenetv3_small_075", segmentation, dilation=True)
    images, padding_mask = padded_batch()
    expected = hf_outputs(hf, images, padding_mask)

    model = detrkit.load_model(_saved(tmp_path, hf))
    assert model.config.dilation
    assert model.backbone.strides[-1] == 16
    assert_close(expected, ours(model, images, padding_mask))


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_through_every_format_that_holds_it(tmp_path, name, capsys):
    """hf -> detrkit -> hf gives back the same tensors (transformers loads them and computes the same);
    the original format, torchvision ResNets only, is refused by name."""
    transformers = require("transformers")
    hf = hf_timm_model(name, segmentation=True)
    images, padding_mask = padded_batch(seed=3)
    expected = hf_outputs(hf, images, padding_mask)

    source = _saved(tmp_path, hf)
    for i, (fmt, target) in enumerate(
        [("detrkit", "a.safetensors"), ("hf", "b"), ("detrkit", "c.safetensors")]
    ):
        target = tmp_path / f"{i}-{target}"
        assert detrkit.cli.main(["convert", str(source), str(target), "--to", fmt]) == 0
        assert_close(expected, ours(detrkit.load_model(target), images, padding_mask))
        source = target

    back = transformers.DetrForSegmentation.from_pretrained(tmp_path / "1-b").eval()
    assert back.config.backbone_config.backbone == name
    original, returned = hf.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    for key, value in original.items():
        assert torch.equal(value, returned[key]), key
    assert_close(expected, hf_outputs(back, images, padding_mask))

    capsys.readouterr()
    assert detrkit.cli.main(["convert", str(source), str(tmp_path / "d.pth"), "--to", "original"]) == 2
    err = capsys.readouterr().err
    assert "original DETR format" in err and "torchvision ResNet" in err and f"timm:{name}" in err
    assert not (tmp_path / "d.pth").exists()


def test_transformers_batchnorm_is_reproduced_only_when_asked(tmp_path):
    """transformers replaces timm's BatchNormAct2d by a plain frozen BatchNorm (eps 1e-5), dropping its
    activation: its checkpoints load with ``transformers_bn=True``. timm's own freezing keeps the
    activation (the network ImageNet weights expect), so it computes something else, and such a
    model is refused as a transformers export rather than written as a different network."""
    hf = hf_timm_model("tf_mobilenetv3_small_075")
    images, padding_mask = padded_batch()
    expected = hf_outputs(hf, images, padding_mask)
    folder = _saved(tmp_path, hf)

    assert detrkit.load_model(folder).config.transformers_bn
    timm_bn = detrkit.load_model(folder, transformers_bn=False)
    out = ours(timm_bn, images, padding_mask)
    assert (out["pred_logits"] - expected["pred_logits"]).abs().max() > 100 * TOL
    with pytest.raises(CheckpointError, match="BatchNormAct2d"):
        detrkit.save_model(timm_bn, tmp_path / "out", "hf")


def test_timm_resnet_batchnorm_needs_no_transformers_mode(tmp_path):
    """timm's ResNets have plain BatchNorm: both freezings compute transformers' network."""
    hf = hf_timm_model("resnet26")
    images, padding_mask = padded_batch()
    expected = hf_outputs(hf, images, padding_mask)
    model = detrkit.load_model(_saved(tmp_path, hf), transformers_bn=False)
    assert_close(expected, ours(model, images, padding_mask))
    detrkit.save_model(model, tmp_path / "out", "hf")  # exportable as it is


def test_trainable_parameters_follow_the_original(tmp_path):
    """The stem and stage 1 are frozen, stages 2-4 train: for timm's ResNets exactly the original's
    (and transformers 4.x's) rule, for other models the same cut at stage 1's feature_info module."""
    resnet = detrkit.build_model(backbone="timm:resnet26", d_model=64, nheads=8)
    trainable = {n for n, p in resnet.backbone.named_parameters() if p.requires_grad}
    assert trainable == {
        n
        for n, _ in resnet.backbone.named_parameters()
        if n.startswith(("body.layer2", "body.layer3", "body.layer4"))
    }
    mobilenet = detrkit.build_model(backbone="timm:tf_mobilenetv3_small_075", d_model=64, nheads=8)
    names = [n for n, p in mobilenet.backbone.named_parameters() if not p.requires_grad]
    assert all(n.startswith(("body.conv_stem.", "body.bn1.", "body.blocks.0.")) for n in names)
    assert any(n.startswith("body.blocks.0.") for n in names)
    assert all(
        p.requires_grad for n, p in mobilenet.backbone.named_parameters() if n.startswith("body.blocks.1.")
    )
    frozen_all = detrkit.build_model(backbone="timm:resnet26", d_model=64, nheads=8, train_backbone=False)
    assert not any(p.requires_grad for p in frozen_all.backbone.parameters())


@pytest.mark.parametrize(
    "backbone,dilation,match",
    [
        ("timm:no_such_model", False, "unknown timm model 'no_such_model'"),
        ("timm:vit_tiny_patch16_224", False, r"strides \[16, 16, 16\]; DETR needs .* \[4, 8, 16, 32\]"),
        ("timm:densenet121", True, "cannot give feature maps with output_stride=16"),
        ("timm:", False, "expected timm:<timm model name>"),
        ("mobilenet", False, "or timm:<timm model name>"),
    ],
)
def test_unusable_timm_models_are_refused(backbone, dilation, match):
    require("timm")
    with pytest.raises(ConfigError, match=match):
        detrkit.DetrConfig(backbone=backbone, dilation=dilation)


def test_hf_folders_with_unusable_backbones_are_refused(tmp_path):
    import json

    hf = hf_timm_model("tf_mobilenetv3_small_075")
    folder = _saved(tmp_path, hf)
    config = json.loads((folder / "config.json").read_text())
    for change, match in [
        ({"backbone": "no_such_model"}, "unknown timm model"),
        ({"out_indices": [2, 3, 4]}, r"out_indices=\[2, 3, 4\]"),
        ({"model_type": "convnext"}, "transformers 'convnext' backbone"),
    ]:
        broken = json.loads(json.dumps(config))
        broken["backbone_config"].update(change)
        (folder / "config.json").write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=match):
            detrkit.load_model(folder)


def test_backbone_weights_map_to_transformers_names(tmp_path):
    """The timm module names are kept: ``backbone.body.X`` <-> ``model.backbone.conv_encoder.model.X``."""
    hf = hf_timm_model("regnetx_002")
    folder = _saved(tmp_path, hf)
    theirs = load_file(folder / "model.safetensors")
    model = detrkit.load_model(folder)
    ours_ = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.body.")}
    assert ours_
    for key, value in ours_.items():
        assert torch.equal(value, theirs["model.backbone.conv_encoder.model." + key[len("backbone.body.") :]])
