"""Numerical parity with Hugging Face transformers' DETR (random weights, nothing downloaded).

transformers and timm are declared test dependencies: the tests that use them import them, and fail
(never skip) where they are missing.
"""

import pytest
import torch
from torch import nn

import detrkit
import detrkit.cli
from conftest import padded_batch, randomize_buffers, require
from detrkit.checkpoints.io import save_model

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


def _make_outputs_sensitive(model: nn.Module) -> None:
    """Weights under which every output depends strongly on the image and its padding.

    transformers initialises linear layers from N(0, 0.02) and the object queries near zero: every
    output then sits at its bias, all queries alike, and a padding bug moves logits by ~1e-5 and boxes
    by ~1e-7, far inside the tolerance. The original's init (xavier weights, N(0, 1) queries) makes
    them differ; the mask head gets sharper attention maps, weighted up where they enter it, so that the
    masks depend on the attention (and its padding mask) rather than on the backbone features alone.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "query_position_embeddings" in name:
                p.normal_()
            elif name.startswith("bbox_attention.") and name.endswith("weight"):
                nn.init.xavier_uniform_(p)
                p.mul_(3.0)
            elif p.dim() > 1 and not any(k in name for k in ("backbone", "position_embedding", "mask_head")):
                nn.init.xavier_uniform_(p)
        heads = model.config.decoder_attention_heads
        for name, p in model.named_parameters():
            # The mask head's first conv (transformers 4.x: lay1, 5.x: conv1.conv) sees the
            # projected features followed by one attention map per head.
            if name in ("mask_head.lay1.weight", "mask_head.conv1.conv.weight"):
                p[:, -heads:] *= 30.0


# The paper's model: ResNet-50, 6 + 6 layers of width 256, 100 queries, COCO's 91 class ids.
FULL = dict(
    num_queries=100,
    encoder_layers=6,
    decoder_layers=6,
    d_model=256,
    encoder_ffn_dim=2048,
    decoder_ffn_dim=2048,
    encoder_attention_heads=8,
    decoder_attention_heads=8,
    id2label={i: f"class{i}" for i in range(91)},
    auxiliary_loss=False,
)


def hf_model(
    segmentation: bool,
    backbone: str = "timm",
    position: str = "sine",
    dilation: bool = False,
    full_size: bool = False,
):
    """A small (or, with ``full_size``, the paper's) random transformers DETR; ``backbone`` is "timm"
    (ResNet-18, or ResNet-50 for DC5, which needs bottleneck blocks, and at full size) or "hf"
    (transformers' own ResNet, with its own key names)."""
    transformers = require("transformers")
    torch.manual_seed(1)
    kwargs = dict(FULL if full_size else SMALL, position_embedding_type=position, dilation=dilation)
    if backbone == "timm":
        require("timm")
        name = "resnet50" if dilation or full_size else "resnet18"
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
    _make_outputs_sensitive(model)
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


def _ignoring_padding(model: detrkit.Detr, where: str):
    """Hooks that hide the padding mask from one of its users, as a bug there would."""
    if where == "encoder":
        return model.transformer.encoder.register_forward_pre_hook(lambda m, a: (a[0], None, *a[2:]))
    if where == "decoder":
        return model.transformer.decoder.register_forward_pre_hook(lambda m, a: (*a[:2], None, *a[3:]))
    if where == "position":
        return model.position_embedding.register_forward_pre_hook(lambda m, a: (a[0], torch.zeros_like(a[1])))
    return model.bbox_attention.register_forward_pre_hook(
        lambda m, a, kw: (a, {**kw, "mask": None}), with_kwargs=True
    )


@pytest.mark.parametrize("segmentation", [False, True], ids=["det", "seg"])
def test_a_padding_bug_anywhere_exceeds_the_parity_tolerance(tmp_path, segmentation):
    """The parity tests only mean something if a wrong use of the padding mask changes every output
    (logits, boxes, masks) by well over the tolerance; with transformers' own init it did not."""
    hf = hf_model(segmentation)
    hf.save_pretrained(tmp_path / "hf")
    model = detrkit.load_model(tmp_path / "hf")
    images, padding_mask = padded_batch()
    correct = ours(model, images, padding_mask)
    for where in ["encoder", "decoder", "position"] + (["mask head"] if segmentation else []):
        hook = _ignoring_padding(model, where)
        wrong = ours(model, images, padding_mask)
        hook.remove()
        keys = ["pred_masks"] if where == "mask head" else [k for k in correct if k.startswith("pred_")]
        for key in keys:
            diff = (wrong[key] - correct[key]).abs().max().item()
            assert diff > 10 * TOL, f"padding ignored in the {where}: {key} moves only {diff:.1e}"


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
    transformers = require("transformers")
    cls = transformers.DetrForSegmentation if segmentation else transformers.DetrForObjectDetection
    reloaded = cls.from_pretrained(tmp_path / "2-c").eval()
    assert_close(expected, hf_outputs(reloaded, images, padding_mask))


def test_hf_config_round_trip_keeps_everything(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "hf", "hf")
    save_model(detrkit.load_model(tmp_path / "hf"), tmp_path / "x.pth", "original")
    assert detrkit.config_of(tmp_path / "x.pth") == tiny_model.config


@pytest.mark.slow
@pytest.mark.parametrize("segmentation", [False, True], ids=["det", "seg"])
def test_full_size_models_match_transformers(tmp_path, segmentation):
    """The paper's architecture (the tests above use a narrow one): the widths, head counts and group
    norms of the full-size mask head, at a more realistic image size. Run with ``make test-slow``.
    (Here the random ResNet-50's features dwarf the attention maps in the mask head, so the masks
    hardly depend on them; the small seg tests are the ones that check that path.)"""
    hf = hf_model(segmentation, full_size=True)
    hf.save_pretrained(tmp_path / "hf")
    images, padding_mask = padded_batch(sizes=((320, 416), (288, 352)), seed=5)
    expected = hf_outputs(hf, images, padding_mask)
    model = detrkit.load_model(tmp_path / "hf")
    assert (model.config.backbone, model.config.d_model, model.config.num_queries) == ("resnet50", 256, 100)
    assert (model.config.enc_layers, model.config.dec_layers, model.config.num_classes) == (6, 6, 91)
    assert_close(expected, ours(model, images, padding_mask))
