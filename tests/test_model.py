import pytest
import torch

import detrkit
from conftest import padded_batch, tiny_config
from detrkit import DetrConfig, PostProcess, build_model


def test_forward_contract(tiny_model):
    images, padding_mask = padded_batch()
    with torch.no_grad():
        out = tiny_model(images, padding_mask)
    cfg = tiny_model.config
    assert out["pred_logits"].shape == (2, cfg.num_queries, cfg.num_classes + 1)
    assert out["pred_boxes"].shape == (2, cfg.num_queries, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == out["pred_logits"].shape
        assert aux["pred_boxes"].shape == out["pred_boxes"].shape
    assert "pred_masks" not in out


def test_segmentation_outputs_masks_at_quarter_resolution():
    torch.manual_seed(0)
    model = build_model(tiny_config(masks=True)).eval()
    images, padding_mask = padded_batch()
    with torch.no_grad():
        out = model(images, padding_mask)
    assert out["pred_masks"].shape == (2, 7, 96 // 4, 128 // 4)


def test_no_aux_outputs_without_aux_loss():
    model = build_model(tiny_config(aux_loss=False)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert "aux_outputs" not in out


def test_no_padding_mask_equals_all_false_mask(tiny_model):
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a = tiny_model(images)
        b = tiny_model(images, torch.zeros(2, 64, 96, dtype=torch.bool))
    assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=1e-5)
    assert torch.allclose(a["pred_boxes"], b["pred_boxes"], atol=1e-6)


def test_aux_outputs_follow_the_original_semantics():
    """Each auxiliary head sees the decoder norm of that layer's *un-normalised* state, and the
    last entry of the stack is the final output (the original's return_intermediate)."""
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    images = torch.randn(1, 3, 64, 64)
    states = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: states.append(o))
        for layer in model.transformer.decoder.layers
    ]
    with torch.no_grad():
        out = model(images)
    for h in hooks:
        h.remove()
    norm = model.transformer.decoder.norm
    with torch.no_grad():
        for i, aux in enumerate(out["aux_outputs"]):
            assert torch.allclose(aux["pred_logits"], model.class_embed(norm(states[i])), atol=1e-6)
        assert torch.allclose(out["pred_logits"], model.class_embed(norm(states[-1])), atol=1e-6)


@pytest.mark.parametrize(
    "overrides", [dict(pre_norm=True), dict(position_embedding="learned"), dict(enc_layers=0)]
)
def test_variants_run_and_train(overrides):
    model = build_model(tiny_config(**overrides)).train()
    out = model(torch.randn(2, 3, 64, 64))
    out["pred_logits"].sum().backward()
    assert model.query_embed.weight.grad is not None
    if overrides.get("pre_norm"):
        assert model.transformer.encoder.norm is not None


def test_frozen_parts():
    model = build_model(tiny_config(masks=True, freeze_detector=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("mask_head.", "bbox_attention.")) for n in trainable)

    model = build_model(tiny_config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.body.layer2.0.conv1.weight" in trainable
    assert (
        "backbone.body.conv1.weight" not in trainable
        and "backbone.body.layer1.0.conv1.weight" not in trainable
    )

    model = build_model(tiny_config(train_backbone=False))
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))


def test_bad_inputs_are_rejected(tiny_model):
    with pytest.raises(ValueError, match=r"Tensor\[B, 3, H, W\]"):
        tiny_model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="padding_mask"):
        tiny_model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="padding_mask"):
        tiny_model(torch.randn(1, 3, 64, 64), torch.zeros(1, 32, 64, dtype=torch.bool))


def test_learned_positions_reject_large_feature_maps():
    model = build_model(tiny_config(position_embedding="learned")).eval()
    with pytest.raises(ValueError, match="up to 50x50"):
        model(torch.randn(1, 3, 32 * 51, 64))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("backbone", "vgg16", "backbone"),
        ("nheads", 7, "divisible"),
        ("dilation", True, "DC5 needs a bottleneck"),
        ("class_names", ("a",), "has 1 entries"),
        ("position_embedding", "rope", "position_embedding"),
        ("dropout", 1.5, "dropout"),
    ],
)
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**{field: value})


def test_config_json_round_trip():
    config = tiny_config(class_names=("a", "b", "c", "d"), category_ids=(3, 7, 12, 40))
    assert DetrConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown DetrConfig field"):
        DetrConfig.from_dict({"num_clases": 3})


def test_paper_defaults():
    config = DetrConfig()
    assert (config.backbone, config.d_model, config.nheads, config.enc_layers, config.dec_layers) == (
        "resnet50",
        256,
        8,
        6,
        6,
    )
    assert (config.dim_feedforward, config.num_queries, config.dropout, config.eos_coef) == (
        2048,
        100,
        0.1,
        0.1,
    )
    assert (config.set_cost_class, config.set_cost_bbox, config.set_cost_giou) == (1, 5, 2)
    assert detrkit.build_criterion(config).weight_dict["loss_bbox"] == 5


def test_postprocess_scales_and_converts_boxes():
    logits = torch.tensor([[[4.0, 0.0, 1.0], [0.0, 0.0, 9.0]]])  # 2 classes + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.25], [0.1, 0.1, 0.2, 0.2]]])
    (result,) = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[200, 400]]))
    assert result["labels"].tolist() == [0, 0]
    assert torch.allclose(result["boxes"][0], torch.tensor([100.0, 75.0, 300.0, 125.0]))
    expected = torch.softmax(logits[0, 0], -1)[0]
    assert result["scores"][0] == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([200, 400]))
