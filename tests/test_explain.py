"""Attention maps: recorded weights are real attention distributions and change nothing; the figure."""

from __future__ import annotations

import torch
from PIL import Image

import detrkit
from conftest import tiny_config
from detrkit.cli import main
from detrkit.data import SynthConfig, make_synthetic
from detrkit.inference.explain import attention_maps


def test_attention_maps(tmp_path):
    torch.manual_seed(0)
    model = detrkit.build_model(tiny_config(extra={"image_scale": 0.15}))
    detector = detrkit.Detector(model, device="cpu")
    picture = next(iter(make_synthetic(SynthConfig(images=1, seed=1))["images"].values()))
    maps = attention_maps(detector, picture, threshold=0.0)
    tensor = detector.preprocess(picture)
    h, w = -(-tensor.shape[1] // 32), -(-tensor.shape[2] // 32)
    n = model.config.num_queries
    assert maps.decoder.shape == (n, h, w) and maps.encoder.shape == (h, w, h, w)
    # Each map is a softmax over the feature positions (averaged over heads).
    assert torch.allclose(maps.decoder.sum((1, 2)), torch.ones(n), atol=1e-5)
    assert torch.allclose(maps.encoder.sum((2, 3)), torch.ones(h, w), atol=1e-5)
    # Recording changed neither the detections nor the model afterwards.
    plain = detector.predict(picture, threshold=0.0)[0]
    assert torch.allclose(maps.scores, plain.scores, atol=1e-5) and maps.names == plain.names
    layer = model.transformer.decoder.layers[-1].multihead_attn
    assert "forward" not in vars(layer)
    # The encoder map is the last layer's self-attention: recompute it by hand.
    with torch.no_grad():
        features, _ = model.backbone(tensor[None], None)[-1]
        x = model.input_proj(features).flatten(2).transpose(1, 2)
        pos = model.position_embedding(features, None).flatten(2).transpose(1, 2)
        for layer in model.transformer.encoder.layers[:-1]:
            x = layer(x, None, pos)
        attn = model.transformer.encoder.layers[-1].self_attn
        e, heads = attn.embed_dim, attn.num_heads
        qk = x + pos  # positions go into queries and keys
        q = (
            (qk @ attn.in_proj_weight[:e].T + attn.in_proj_bias[:e])
            .view(1, -1, heads, e // heads)
            .transpose(1, 2)
        )
        k = (qk @ attn.in_proj_weight[e : 2 * e].T + attn.in_proj_bias[e : 2 * e]).view(
            1, -1, heads, e // heads
        )
        weights = ((q @ k.permute(0, 2, 3, 1)) * (e // heads) ** -0.5).softmax(-1).mean(1)[0]
    assert torch.allclose(maps.encoder.reshape(h * w, h * w), weights, atol=1e-5)


def test_explain_cli(tmp_path):
    torch.manual_seed(0)
    detrkit.save_model(
        detrkit.build_model(tiny_config(extra={"image_scale": 0.15})), tmp_path / "m.safetensors"
    )
    picture = next(iter(make_synthetic(SynthConfig(images=1, seed=1))["images"].values()))
    picture.save(tmp_path / "a.png")
    out = tmp_path / "attention.png"
    assert (
        main(
            [
                "explain",
                str(tmp_path / "a.png"),
                "--weights",
                str(tmp_path / "m.safetensors"),
                "--out",
                str(out),
                "--threshold",
                "0",
            ]
        )
        == 0
    )
    figure = Image.open(out)
    assert figure.width > figure.height > 0
