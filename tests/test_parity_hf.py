"""Numerical parity with Hugging Face transformers' DETR (random weights, nothing downloaded)."""

import pytest
import torch

import detrkit
import detrkit.cli
from conftest import padded_batch, randomize_buffers
from detrkit.checkpoints import save_model

transformers = pytest.importorskip("transformers")

TOL = 1e-4
SMALL = dict(
    num_queries=7,
    encoder_layers=2,
    decoder_layers=3,
    d_model=64,
    encoder_ffn_dim=96,
    decoder_ffn_dim=96,
    encoder_attention_heads=8,
    decoder_attention_heads=8,
    id2label={0: "circle", 1: "square", 2: "triangle"},
    auxiliary_loss=False,  # with aux loss on, transformers departs from the original (see REFERENCE)
)


def hf_model(segmentation: bool, backbone: str = "timm", position: str = "sine", dilation: bool = False):
    """A small random transformers DETR; ``backbone`` is "timm" (ResNet-18, or ResNet-50 for DC5,
    which needs bottleneck blocks) or "hf" (transformers' own ResNet, with its own key names)."""
    torch.manual_seed(1)
    kwargs = dict(SMALL, position_embedding_type=position, dilation=dilation)
    if backbone == "timm":
        pytest.importorskip("timm")
        name = "resnet50" if dilation else "resnet18"
        config = transformers.DetrConfig(use_timm_backbone=True, backbone=name, **kwargs)
    else:
        resnet = transformers.ResNetConfig(
            depths=[2, 2, 2, 2],
            layer_type="basic",
            hidden_sizes=[64, 128, 256, 512],
            out_features=["stage1", "stage2", "stage3", "stage4"] if segmentation else ["stage4"],
        )
        config = transformers.DetrConfig(use_timm_backbone=False, backbone_config=resnet, **kwargs)
    cls = transformers.DetrForSegmentation if segmentation else transformers.DetrForObjectDetection
    model = cls(config).eval()
    randomize_buffers(model, seed=2)
    with torch.no_grad():  # learned position embeddings and biases start at trivial values
        for name, p in model.named_parameters():
            if "position_embedding" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def hf_outputs(model, images, padding_mask):
    with torch.no_grad():
        out = model(pixel_values=images, pixel_mask=(~padding_mask).long())
    result = {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}
    if getattr(out, "pred_masks", None) is not None:
        result["pred_masks"] = out.pred_masks
    return result


def ours(model, images, padding_mask):
    with torch.no_grad():
        return model(images, padding_mask)


def assert_close(expected: dict, actual: dict) -> None:
    for key, value in expected.items():
        diff = (value - actual[key]).abs().max().item()
        assert diff <= TOL, f"{key}: max abs diff {diff:.2e} > {TOL}"


@pytest.mark.parametrize(
    "segmentation,backbone,position,dilation",
    [
        (False, "timm", "sine", False),
        (True, "timm", "sine", False),
        (False, "hf", "learned", False),
        (True, "hf", "sine", False),
        (False, "timm", "sine", True),
    ],
    ids=["det-timm", "seg-timm", "det-hfresnet-learned", "seg-hfresnet", "det-dc5"],
)
def test_load_hf_checkpoint_matches_transformers(tmp_path, segmentation, backbone, position, dilation):
    hf = hf_model(segmentation, backbone, position, dilation)
    hf.save_pretrained(tmp_path / "hf")
    images, padding_mask = padded_batch()
    expected = hf_outputs(hf, images, padding_mask)

    model = detrkit.load_model(tmp_path / "hf")
    assert model.config.masks == segmentation
    assert model.config.dilation == dilation
    assert model.config.position_embedding == position
    assert model.config.class_names == ("circle", "square", "triangle")
    assert_close(expected, ours(model, images, padding_mask))


@pytest.mark.parametrize("segmentation", [False, True], ids=["det", "seg"])
def test_round_trip_through_every_format(tmp_path, segmentation):
    hf = hf_model(segmentation)
    hf.save_pretrained(tmp_path / "hf")
    images, padding_mask = padded_batch(seed=3)
    expected = hf_outputs(hf, images, padding_mask)

    source = tmp_path / "hf"
    for i, (fmt, name) in enumerate(
        [("detrkit", "a.safetensors"), ("original", "b.pth"), ("hf", "c"), ("detrkit", "d.safetensors")]
    ):
        target = tmp_path / f"{i}-{name}"
        assert detrkit.cli.main(["convert", str(source), str(target), "--to", fmt]) == 0
        model = detrkit.load_model(target)
        assert_close(expected, ours(model, images, padding_mask))
        source = target

    # The Hugging Face folder we wrote loads in transformers itself and gives the same outputs.
    cls = transformers.DetrForSegmentation if segmentation else transformers.DetrForObjectDetection
    reloaded = cls.from_pretrained(tmp_path / "2-c").eval()
    assert_close(expected, hf_outputs(reloaded, images, padding_mask))


def test_hf_config_round_trip_keeps_everything(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "hf", "hf")
    save_model(detrkit.load_model(tmp_path / "hf"), tmp_path / "x.pth", "original")
    assert detrkit.config_of(tmp_path / "x.pth") == tiny_model.config
