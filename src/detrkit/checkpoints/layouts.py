"""Key mappings between detrkit's state dict and the original DETR and Hugging Face layouts (the
configurations that go with them are in :mod:`detrkit.checkpoints.configs`).

detrkit's own layout is the original's with the ``Joiner`` and ``detr.`` wrappers removed:

=================================  ==========================================
original                           detrkit
=================================  ==========================================
``[detr.]backbone.0.body.X``       ``backbone.body.X``
``[detr.]backbone.1.row_embed``    ``position_embedding.row_embed``
``[detr.]transformer.X``           ``transformer.X``
``bbox_attention.* mask_head.*``   unchanged
=================================  ==========================================
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

StateDict = dict[str, Tensor]

# ---------------------------------------------------------------------------------------------------
# original <-> detrkit
# ---------------------------------------------------------------------------------------------------


def original_to_detrkit(state_dict: StateDict) -> StateDict:
    """Rename an original DETR (detection or ``detr.``-prefixed segmentation) state dict."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("detr."):
            key = key[len("detr.") :]
        if key.startswith("backbone.0."):
            key = "backbone." + key[len("backbone.0.") :]
        elif key.startswith("backbone.1."):
            key = "position_embedding." + key[len("backbone.1.") :]
        if key.endswith("num_batches_tracked"):
            continue
        out[key] = value
    return out


def detrkit_to_original(state_dict: StateDict) -> StateDict:
    """Inverse of :func:`original_to_detrkit`; segmentation models get the ``detr.`` prefix."""
    masks = any(k.startswith("mask_head.") for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            key = "backbone.0." + key[len("backbone.") :]
        elif key.startswith("position_embedding."):
            key = "backbone.1." + key[len("position_embedding.") :]
        if masks and not key.startswith(("bbox_attention.", "mask_head.")):
            key = "detr." + key
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------
# Hugging Face <-> detrkit
# ---------------------------------------------------------------------------------------------------

# transformers 5.x renames -> the 4.x names published checkpoints use (applied to the key as a whole).
_HF5_TO_HF4 = [
    (re.compile(r"\.o_proj\."), ".out_proj."),
    (re.compile(r"(layers\.\d+)\.mlp\.fc([12])\."), r"\1.fc\2."),
    (re.compile(r"bbox_attention\.q_proj\."), "bbox_attention.q_linear."),
    (re.compile(r"bbox_attention\.k_proj\."), "bbox_attention.k_linear."),
    (re.compile(r"mask_head\.conv1\.conv\."), "mask_head.lay1."),
    (re.compile(r"mask_head\.conv1\.norm\."), "mask_head.gn1."),
    (re.compile(r"mask_head\.conv2\.conv\."), "mask_head.lay2."),
    (re.compile(r"mask_head\.conv2\.norm\."), "mask_head.gn2."),
    (re.compile(r"mask_head\.fpn_stages\.0\.fpn_adapter\."), "mask_head.adapter1."),
    (re.compile(r"mask_head\.fpn_stages\.0\.refine\.conv\."), "mask_head.lay3."),
    (re.compile(r"mask_head\.fpn_stages\.0\.refine\.norm\."), "mask_head.gn3."),
    (re.compile(r"mask_head\.fpn_stages\.1\.fpn_adapter\."), "mask_head.adapter2."),
    (re.compile(r"mask_head\.fpn_stages\.1\.refine\.conv\."), "mask_head.lay4."),
    (re.compile(r"mask_head\.fpn_stages\.1\.refine\.norm\."), "mask_head.gn4."),
    (re.compile(r"mask_head\.fpn_stages\.2\.fpn_adapter\."), "mask_head.adapter3."),
    (re.compile(r"mask_head\.fpn_stages\.2\.refine\.conv\."), "mask_head.lay5."),
    (re.compile(r"mask_head\.fpn_stages\.2\.refine\.norm\."), "mask_head.gn5."),
    (re.compile(r"mask_head\.output_conv\."), "mask_head.out_lay."),
]

# Hugging Face ResNet module names -> torchvision's (applied to the backbone-relative key).
_HF_RESNET = [
    (re.compile(r"^embedder\.embedder\.convolution\."), "conv1."),
    (re.compile(r"^embedder\.embedder\.normalization\."), "bn1."),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\."),
        "layer{s}.{l}.downsample.0.",
    ),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\."),
        "layer{s}.{l}.downsample.1.",
    ),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\."),
        "layer{s}.{l}.conv{i}.",
    ),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\."),
        "layer{s}.{l}.bn{i}.",
    ),
]

_HF_ENCODER_LAYER = {
    "self_attn_layer_norm": "norm1",
    "final_layer_norm": "norm2",
    "fc1": "linear1",
    "fc2": "linear2",
}
_HF_DECODER_LAYER = {
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "final_layer_norm": "norm3",
    "fc1": "linear1",
    "fc2": "linear2",
    "encoder_attn": "multihead_attn",
}
_HF_TOP = {
    "input_projection": "input_proj",
    "query_position_embeddings": "query_embed",
    "position_embedding.row_embeddings": "position_embedding.row_embed",
    "position_embedding.column_embeddings": "position_embedding.col_embed",
    "decoder.layernorm": "transformer.decoder.norm",
    "class_labels_classifier": "class_embed",
    "bbox_predictor": "bbox_embed",
}


def _hf_backbone_key(rest: str) -> str:
    for pattern, template in _HF_RESNET:
        m = pattern.match(rest)
        if m:
            groups = [int(g) for g in m.groups()]
            names = {}
            if groups:  # stage and block indices; conv/bn indices count from 1 in torchvision
                names = {"s": groups[0] + 1, "l": groups[1]}
            if len(groups) > 2:
                names["i"] = groups[2] + 1
            return template.format(**names) + rest[m.end() :]
    return rest  # timm-style names are torchvision's


def _learned_pe(name: str) -> str:
    return name.replace("row_embeddings", "row_embed").replace("column_embeddings", "col_embed")


def hf_to_detrkit(state_dict: StateDict) -> StateDict:
    """Convert a ``DetrForObjectDetection`` / ``DetrForSegmentation`` state dict (either layout)."""
    renamed: StateDict = {}
    for key, value in state_dict.items():
        for pattern, repl in _HF5_TO_HF4:
            key = pattern.sub(repl, key)
        if key.startswith("detr."):
            key = key[len("detr.") :]
        if key.startswith("model."):
            key = key[len("model.") :]
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("backbone."):
            rest = key[len("backbone.") :]
            if rest.startswith("position_embedding."):  # transformers 4.x kept it under the backbone
                renamed["position_embedding." + _learned_pe(rest[len("position_embedding.") :])] = value
                continue
            for prefix in ("conv_encoder.model.", "model."):
                if rest.startswith(prefix):
                    rest = rest[len(prefix) :]
                    break
            key = "backbone.body." + _hf_backbone_key(rest)
        elif key.startswith(("encoder.layers.", "decoder.layers.")):
            part, _, index, name = key.split(".", 3)
            table = _HF_ENCODER_LAYER if part == "encoder" else _HF_DECODER_LAYER
            module, _, param = name.partition(".")
            key = f"transformer.{part}.layers.{index}.{table.get(module, module)}.{param}"
        else:
            for old, new in _HF_TOP.items():
                if key.startswith(old + "."):
                    key = new + key[len(old) :]
                    break
        renamed[key] = value

    # Fuse q/k/v projections into the packed in-projection.
    out: StateDict = {}
    for key, value in renamed.items():
        m = re.match(r"(.*attn)\.(q|k|v)_proj\.(weight|bias)$", key)
        if not m:
            out[key] = value
            continue
        prefix, which, kind = m.groups()
        if which != "q":
            continue
        parts = [renamed.get(f"{prefix}.{p}_proj.{kind}") for p in "qkv"]
        if any(p is None for p in parts):
            raise ValueError(
                f"Hugging Face checkpoint has {prefix}.q_proj.{kind} without matching k/v projections"
            )
        out[f"{prefix}.in_proj_{kind}"] = torch.cat(parts)
    return out


def detrkit_to_hf(state_dict: StateDict) -> StateDict:
    """detrkit -> the key layout of published Hugging Face checkpoints (timm-style backbone names),
    which every transformers release loads."""
    masks = any(k.startswith("mask_head.") for k in state_dict)
    base = "detr.model." if masks else "model."
    heads = "detr." if masks else ""
    enc = {v: k for k, v in _HF_ENCODER_LAYER.items()}
    dec = {v: k for k, v in _HF_DECODER_LAYER.items()}
    top = {v: k for k, v in _HF_TOP.items()}
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith(("bbox_attention.", "mask_head.")):
            out[key] = value
        elif key.startswith("backbone.body."):
            out[base + "backbone.conv_encoder.model." + key[len("backbone.body.") :]] = value
        elif key.startswith("transformer.encoder.norm."):
            raise ValueError("pre-norm models (pre_norm=True) have no Hugging Face equivalent")
        elif key.startswith(("transformer.encoder.layers.", "transformer.decoder.layers.")):
            _, part, _, index, name = key.split(".", 4)
            module, _, param = name.partition(".")
            table = enc if part == "encoder" else dec
            prefix = f"{base}{part}.layers.{index}.{table.get(module, module)}"
            if param in ("in_proj_weight", "in_proj_bias"):
                kind = param.split("_")[-1]
                for name_, chunk in zip("qkv", value.chunk(3)):
                    out[f"{prefix}.{name_}_proj.{kind}"] = chunk.clone()
            else:
                out[f"{prefix}.{param}"] = value
        else:
            for new, old in top.items():
                if key.startswith(new + "."):
                    is_head = old in ("class_labels_classifier", "bbox_predictor")
                    out[(heads if is_head else base) + old + key[len(new) :]] = value
                    break
            else:
                raise ValueError(f"no Hugging Face name for parameter {key!r}")
    return out
