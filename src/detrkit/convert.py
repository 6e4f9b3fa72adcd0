"""Key mappings between detrkit's state dict and the original DETR and Hugging Face layouts, and
inference of the architecture from the weights themselves.

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
from typing import Any

import torch
from torch import Tensor

from .config import TIMM_PREFIX, DetrConfig
from .errors import ConfigError

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


def _int_if_whole(value: float) -> int | float:
    # transformers declares the costs and most coefficients as ints and rejects floats there.
    return int(value) if float(value).is_integer() else value


def hf_config_dict(config: DetrConfig) -> dict[str, Any]:
    """A transformers ``config.json`` describing ``config`` (a timm backbone: the ResNet, or the
    ``timm:`` model). Raises ``ValueError`` for a model transformers would compute differently."""
    if config.last_stage != 4:
        raise ValueError(f"last_stage={config.last_stage}: Hugging Face DETR always uses all 4 ResNet stages")
    if config.timm_name is not None:
        from .timm_backbone import timm_features

        features = timm_features(config.timm_name, config.dilation)
        if features.out_indices != _HF_TIMM_OUT_INDICES:
            raise ValueError(
                f"backbone={config.backbone}: transformers takes the timm feature levels "
                f"{list(_HF_TIMM_OUT_INDICES)}, but this model's strides 4-32 are levels {list(features.out_indices)}"
            )
        if not (config.transformers_bn or features.transformers_compatible_bn):
            raise ValueError(
                f"backbone={config.backbone}: transformers replaces its BatchNorm layers by plain frozen "
                "BatchNorm (eps 1e-5, dropping the activations timm fuses into BatchNormAct2d), so it would "
                "compute a different network; only models built with transformers_bn=True export"
            )
    names = config.class_names or tuple(f"LABEL_{i}" for i in range(config.num_classes))
    return {
        "model_type": "detr",
        "architectures": ["DetrForSegmentation" if config.masks else "DetrForObjectDetection"],
        "use_timm_backbone": True,
        "backbone": config.timm_name or config.backbone,
        "use_pretrained_backbone": False,
        "dilation": config.dilation,
        "num_channels": 3,
        "num_queries": config.num_queries,
        "d_model": config.d_model,
        "encoder_layers": config.enc_layers,
        "decoder_layers": config.dec_layers,
        "encoder_attention_heads": config.nheads,
        "decoder_attention_heads": config.nheads,
        "encoder_ffn_dim": config.dim_feedforward,
        "decoder_ffn_dim": config.dim_feedforward,
        "dropout": config.dropout,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "activation_function": "relu",
        "position_embedding_type": config.position_embedding,
        # transformers' decoder changes its outputs when auxiliary_loss is on (it feeds the normalised
        # state to the next layer, unlike the original), so exported models keep it off.
        "auxiliary_loss": False,
        "class_cost": _int_if_whole(config.set_cost_class),
        "bbox_cost": _int_if_whole(config.set_cost_bbox),
        "giou_cost": _int_if_whole(config.set_cost_giou),
        "bbox_loss_coefficient": _int_if_whole(config.bbox_loss_coef),
        "giou_loss_coefficient": _int_if_whole(config.giou_loss_coef),
        "mask_loss_coefficient": _int_if_whole(config.mask_loss_coef),
        "dice_loss_coefficient": _int_if_whole(config.dice_loss_coef),
        "eos_coefficient": config.eos_coef,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
    }


# transformers DetrConfig options detrkit cannot honour: (option, allowed value(s), why). A folder
# that sets one otherwise is refused by name instead of being loaded as a different network.
_HF_REFUSED = (
    ("activation_function", ("relu",), "detrkit's feed-forward layers use ReLU, as the original DETR"),
    ("num_channels", (3,), "the backbones take RGB images"),
    ("encoder_layerdrop", (0, 0.0), "layer dropout is not implemented"),
    ("decoder_layerdrop", (0, 0.0), "layer dropout is not implemented"),
)


def _refuse_unsupported_hf_options(hf: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first transformers option that would change the network
    into one detrkit does not build (see the README's table of options)."""
    for option, allowed, why in _HF_REFUSED:
        if option in hf and hf[option] not in allowed:
            raise ValueError(
                f"config.json sets {option}={hf[option]!r}, which detrkit does not support: {why}"
            )
    for a, b, what in (
        ("encoder_attention_heads", "decoder_attention_heads", "attention heads"),
        ("encoder_ffn_dim", "decoder_ffn_dim", "feed-forward widths"),
    ):
        if a in hf and b in hf and hf[a] != hf[b]:
            raise ValueError(
                f"config.json sets {a}={hf[a]} but {b}={hf[b]}: detrkit's encoder and decoder share their {what}"
            )
    backbone_config = hf.get("backbone_config") or {}
    backbone_type = backbone_config.get("model_type")
    if _hf_timm_name(hf) is None and backbone_type not in (None, "resnet"):
        raise ValueError(
            f"config.json sets a transformers {backbone_type!r} backbone (use_timm_backbone=False): detrkit "
            "builds transformers' ResNet, or timm models (use_timm_backbone=True)"
        )
    out_indices = backbone_config.get("out_indices") or (hf.get("backbone_kwargs") or {}).get("out_indices")
    if _hf_timm_name(hf) is not None and out_indices and tuple(out_indices) != _HF_TIMM_OUT_INDICES:
        raise ValueError(
            f"config.json selects the timm feature levels out_indices={list(out_indices)}: detrkit "
            f"uses {list(_HF_TIMM_OUT_INDICES)} (strides 4, 8, 16, 32), as transformers by default"
        )


_TIMM_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
_HF_TIMM_OUT_INDICES = (1, 2, 3, 4)  # transformers' out_indices for timm backbones


def _hf_timm_name(hf: dict[str, Any]) -> str | None:
    """The timm model of a transformers config: ``backbone`` with ``use_timm_backbone`` (4.x, and what
    detrkit writes), or a ``timm_backbone`` backbone_config (what transformers 5.x saves)."""
    backbone_config = hf.get("backbone_config") or {}
    if backbone_config.get("model_type") == "timm_backbone":
        return backbone_config.get("backbone")
    if not backbone_config and hf.get("use_timm_backbone", True):
        return hf.get("backbone") or "resnet50"  # transformers' default
    return None


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """DetrConfig fields that a transformers ``config.json`` states (the rest come from the weights).

    Raises ``ValueError`` naming an option that would make it a network detrkit does not build."""
    _refuse_unsupported_hf_options(hf)
    fields: dict[str, Any] = {}
    if "encoder_attention_heads" in hf:
        fields["nheads"] = int(hf["encoder_attention_heads"])
    if "dropout" in hf:
        fields["dropout"] = float(hf["dropout"])
    if "position_embedding_type" in hf:
        fields["position_embedding"] = hf["position_embedding_type"]
    backbone_config = hf.get("backbone_config") or {}
    dilation = hf.get("dilation", False) or backbone_config.get("output_stride") == 16
    fields["dilation"] = bool(dilation)
    timm_name = _hf_timm_name(hf)
    if timm_name is not None and timm_name not in _TIMM_RESNETS:
        # transformers' own ResNet names and timm's for resnet18-101 load into torchvision's ResNet.
        from .timm_backbone import timm_features

        try:
            timm_features(timm_name, fields["dilation"])
        except ConfigError as e:
            raise ValueError(f"config.json sets backbone={timm_name!r}: {e}") from None
        fields["backbone"] = TIMM_PREFIX + timm_name
        fields["transformers_bn"] = True  # the weights were trained with transformers' BatchNorm
    for ours, theirs in (
        ("set_cost_class", "class_cost"),
        ("set_cost_bbox", "bbox_cost"),
        ("set_cost_giou", "giou_cost"),
        ("bbox_loss_coef", "bbox_loss_coefficient"),
        ("giou_loss_coef", "giou_loss_coefficient"),
        ("mask_loss_coef", "mask_loss_coefficient"),
        ("dice_loss_coef", "dice_loss_coefficient"),
        ("eos_coef", "eos_coefficient"),
    ):
        if theirs in hf:
            fields[ours] = float(hf[theirs])
    id2label = hf.get("id2label")
    if id2label:
        fields["class_names"] = tuple(id2label[k] for k in sorted(id2label, key=int))
    return fields


# ---------------------------------------------------------------------------------------------------
# Architecture from weights
# ---------------------------------------------------------------------------------------------------

_RESNETS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
}


def _count(state_dict: StateDict, pattern: str) -> int:
    regex = re.compile(pattern)
    found = {m.group(1) for k in state_dict if (m := regex.match(k))}
    return len(found)


def infer_config(state_dict: StateDict, **known: Any) -> DetrConfig:
    """The DetrConfig of a detrkit-layout state dict. ``known`` supplies what weights cannot tell
    (``dilation``, ``nheads`` of detection models, ``dropout``, class names, loss weights...).
    A ``timm:`` backbone must be among ``known`` (its weights do not name the timm model)."""
    if str(known.get("backbone", "")).startswith(TIMM_PREFIX):
        return _infer_head_config(state_dict, {}, known)
    blocks = tuple(_count(state_dict, rf"backbone\.body\.layer{i}\.(\d+)\.") for i in range(1, 5))
    kind = "bottleneck" if "backbone.body.layer1.0.conv3.weight" in state_dict else "basic"
    # Models built with last_stage < 4 have no weights for the later stages.
    last_stage = max((i + 1 for i, n in enumerate(blocks) if n), default=0)
    matches = sorted(
        name for (k, full), name in _RESNETS.items() if k == kind and full[:last_stage] == blocks[:last_stage]
    )
    backbone = matches[0] if last_stage >= 2 and all(blocks[:last_stage]) and matches else None
    if backbone is None:
        raise ValueError(f"unsupported backbone: ResNet with {kind} blocks {list(blocks)} per stage")

    return _infer_head_config(state_dict, {"backbone": backbone, "last_stage": last_stage}, known)


def _infer_head_config(state_dict: StateDict, fields: dict[str, Any], known: dict[str, Any]) -> DetrConfig:
    def need(key: str) -> Tensor:
        if key not in state_dict:
            raise ValueError(f"not a DETR checkpoint: parameter {key!r} is missing")
        return state_dict[key]

    input_proj = need("input_proj.weight")
    d_model = input_proj.shape[0]
    fields = {
        **fields,
        "d_model": d_model,
        "num_queries": need("query_embed.weight").shape[0],
        "num_classes": need("class_embed.weight").shape[0] - 1,
        "enc_layers": _count(state_dict, r"transformer\.encoder\.layers\.(\d+)\."),
        "dec_layers": _count(state_dict, r"transformer\.decoder\.layers\.(\d+)\."),
        "dim_feedforward": need("transformer.decoder.layers.0.linear1.weight").shape[0],
        "pre_norm": "transformer.encoder.norm.weight" in state_dict,
        "position_embedding": "learned" if "position_embedding.row_embed.weight" in state_dict else "sine",
        "masks": "mask_head.lay1.weight" in state_dict,
    }
    if fields["masks"]:
        # The mask head's input is d_model features + one attention map per head.
        fields["nheads"] = state_dict["mask_head.lay1.weight"].shape[1] - d_model
    fields.update(known)
    return DetrConfig(**fields)
