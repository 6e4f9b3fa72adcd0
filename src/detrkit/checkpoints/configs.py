"""Configurations of foreign checkpoints: transformers' ``config.json`` to and from
:class:`~detrkit.models.config.DetrConfig`, and the architecture inferred from the weights
themselves (the original DETR's files carry at most an ``args`` namespace)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import Tensor

from ..errors import ConfigError
from ..models.config import TIMM_PREFIX, DetrConfig

StateDict = dict[str, Tensor]


def _int_if_whole(value: float) -> int | float:
    # transformers declares the costs and most coefficients as ints and rejects floats there.
    return int(value) if float(value).is_integer() else value


def hf_config_dict(config: DetrConfig) -> dict[str, Any]:
    """A transformers ``config.json`` describing ``config`` (a timm backbone: the ResNet, or the
    ``timm:`` model). Raises ``ValueError`` for a model transformers would compute differently."""
    if config.last_stage != 4:
        raise ValueError(f"last_stage={config.last_stage}: Hugging Face DETR always uses all 4 ResNet stages")
    if config.timm_name is not None:
        from ..models.timm_backbone import timm_features

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
    into one detrkit does not build (see docs/guides/checkpoints.md, "`transformers` options")."""
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
        from ..models.timm_backbone import timm_features

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
        in_turn = [str(i) for i in range(len(id2label))]
        if not isinstance(id2label, dict) or sorted(id2label, key=int) != in_turn:
            keys = sorted(id2label, key=int) if isinstance(id2label, dict) else id2label
            raise ValueError(
                f"config.json: id2label must name the labels 0 to N-1 in turn, got keys {keys}: "
                "a label would take another's name"
            )
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
    unknown = sorted(set(known) - {f.name for f in dataclasses.fields(DetrConfig)})
    if unknown:  # e.g. written by a newer detrkit
        raise ValueError(f"unknown DetrConfig field(s) in the checkpoint's config: {', '.join(unknown)}")
    fields.update(known)
    return DetrConfig(**fields)
