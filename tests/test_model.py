import pytest
import torch
import torch.nn.functional as F
from torch import nn

import detrkit
from conftest import padded_batch, tiny_config
from detrkit import DetrConfig, PostProcess, build_model
from detrkit.models.transformer import Transformer


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


# --- pre-norm transformer against torch.nn and a port of the original's forward_pre -----------------
def _prenorm_transformer(seed: int = 0) -> Transformer:
    """A small pre-norm transformer whose biases and norm affine parameters are random too, so that a
    misplaced or missing norm (identity at init) shows in the outputs."""
    torch.manual_seed(seed)
    model = Transformer(
        d_model=32,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=3,
        dim_feedforward=48,
        dropout=0.0,
        normalize_before=True,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.2)
            elif ".norm" in name or name.startswith(("encoder.norm", "decoder.norm")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _key_padding_mask(batch: int, length: int) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[1, -length // 3 :] = True  # the second sequence is padded at the end
    return mask


def _torch_reference(module: nn.Module, reference: nn.Module) -> nn.Module:
    """``reference`` with ``module``'s weights: detrkit keeps torch.nn's parameter names."""
    reference.load_state_dict(module.state_dict(), strict=True)
    return reference.eval()


def _no_fast_path(fn, *args, **kwargs):
    # In inference torch.nn's transformer layers may switch to a fused kernel; with gradients on they
    # run the plain composition of their modules, the reference meant here.
    with torch.enable_grad():
        return fn(*args, **kwargs).detach()


def test_pre_norm_layers_match_torch_norm_first_layers():
    """pos / query_pos zero: DETR's layers are then torch.nn's norm_first layers."""
    model = _prenorm_transformer()
    e, heads, ff = 32, 4, 48
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randn(2, 15, e, generator=g), torch.randn(2, 5, e, generator=g)
    mask = _key_padding_mask(2, 15)
    kw = dict(dropout=0.0, batch_first=True, norm_first=True)
    for layer in model.encoder.layers:
        ref = _torch_reference(layer, nn.TransformerEncoderLayer(e, heads, ff, **kw))
        with torch.no_grad():
            ours = layer(src, mask, None)
        assert _max_diff(ours, _no_fast_path(ref, src, src_key_padding_mask=mask)) < 1e-5
    for layer in model.decoder.layers:
        ref = _torch_reference(layer, nn.TransformerDecoderLayer(e, heads, ff, **kw))
        with torch.no_grad():
            ours = layer(tgt, src, mask, None, torch.zeros_like(tgt))
        expected = _no_fast_path(ref, tgt, src, memory_key_padding_mask=mask)
        assert _max_diff(ours, expected) < 1e-5

    # The stacks, with their final norms (the encoder has one only with pre-norm).
    assert model.encoder.norm is not None
    enc_ref = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(e, heads, ff, **kw), 2, norm=nn.LayerNorm(e), enable_nested_tensor=False
    )
    enc_ref = _torch_reference(model.encoder, enc_ref)
    with torch.no_grad():
        memory = model.encoder(src, mask, None)
    assert _max_diff(memory, _no_fast_path(enc_ref, src, src_key_padding_mask=mask)) < 1e-5
    with torch.no_grad():
        hs = model.decoder(tgt, memory, mask, None, torch.zeros_like(tgt), return_intermediate=True)
    for n in range(1, 4):  # intermediate output n = a decoder of the first n layers, normalised
        dec_ref = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(e, heads, ff, **kw), n, norm=nn.LayerNorm(e)
        )
        state = model.decoder.state_dict()
        dec_ref.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("layers.") or int(k.split(".")[1]) < n}
        )
        expected = _no_fast_path(dec_ref.eval(), tgt, memory, memory_key_padding_mask=mask)
        assert _max_diff(hs[n - 1], expected) < 1e-5


def _original_forward_pre(model: Transformer, src, mask, query_embed, pos_embed):
    """The original DETR's Transformer.forward with normalize_before=True, sequence-first, on
    torch.nn.MultiheadAttention copies of the attention weights."""

    def mha(attn):
        ref = nn.MultiheadAttention(attn.embed_dim, attn.num_heads, dropout=0.0)
        ref.load_state_dict(attn.state_dict(), strict=True)
        return ref.eval()

    def ffn(layer, x):
        return layer.linear2(F.relu(layer.linear1(x)))

    bs, c, h, w = src.shape
    src = src.flatten(2).permute(2, 0, 1)
    pos = pos_embed.flatten(2).permute(2, 0, 1)
    query_pos = query_embed.unsqueeze(1).repeat(1, bs, 1)
    mask = mask.flatten(1)
    for layer in model.encoder.layers:
        src2 = layer.norm1(src)
        q = k = src2 + pos
        src = src + mha(layer.self_attn)(q, k, value=src2, key_padding_mask=mask)[0]
        src = src + ffn(layer, layer.norm2(src))
    memory = model.encoder.norm(src)
    out = torch.zeros_like(query_pos)
    intermediate = []
    for layer in model.decoder.layers:
        tgt2 = layer.norm1(out)
        q = k = tgt2 + query_pos
        out = out + mha(layer.self_attn)(q, k, value=tgt2)[0]
        tgt2 = layer.norm2(out)
        out = (
            out
            + mha(layer.multihead_attn)(tgt2 + query_pos, memory + pos, value=memory, key_padding_mask=mask)[
                0
            ]
        )
        out = out + ffn(layer, layer.norm3(out))
        intermediate.append(model.decoder.norm(out))
    hs = torch.stack(intermediate).transpose(1, 2)
    return hs, memory.permute(1, 2, 0).view(bs, c, h, w)


def test_pre_norm_transformer_matches_the_original_forward_pre():
    """With position encodings (added to queries and keys, never values) and a padding mask."""
    model = _prenorm_transformer(seed=3)
    g = torch.Generator().manual_seed(4)
    src = torch.randn(2, 32, 3, 5, generator=g)
    pos = torch.randn(2, 32, 3, 5, generator=g)
    query = torch.randn(6, 32, generator=g)
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[1, :, 3:] = True
    mask[1, 2:, :] = True
    with torch.no_grad():
        hs, memory = model(src, mask, query, pos, return_intermediate=True)
        ref_hs, ref_memory = _original_forward_pre(model, src, mask, query, pos)
    assert hs.shape == ref_hs.shape == (3, 2, 6, 32)
    assert _max_diff(memory, ref_memory) < 1e-5
    assert _max_diff(hs, ref_hs) < 1e-5
    # The outputs depend on everything checked: not a degenerate comparison.
    assert hs[-1].std() > 0.3 and memory.std() > 0.3


def test_pre_norm_config_builds_a_pre_norm_transformer():
    model = build_model(tiny_config(pre_norm=True))
    layers = [*model.transformer.encoder.layers, *model.transformer.decoder.layers]
    assert all(layer.pre_norm for layer in layers) and model.transformer.encoder.norm is not None
    model = build_model(tiny_config())
    layers = [*model.transformer.encoder.layers, *model.transformer.decoder.layers]
    assert not any(layer.pre_norm for layer in layers) and model.transformer.encoder.norm is None
