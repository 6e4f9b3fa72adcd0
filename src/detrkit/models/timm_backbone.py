"""Any timm CNN as the DETR backbone (``DetrConfig(backbone="timm:<name>")``), built as transformers
builds it for ``use_timm_backbone=True``, so that its checkpoints load with the same outputs.

``timm`` is an optional dependency (``pip install 'detrkit[timm]'``); it is imported only when a
``timm:`` backbone is used.

Stages
    DETR reads four feature maps at strides 4, 8, 16, 32 ("stages 1-4", ResNet's ``layer1-4``): the
    last feeds the transformer, the first three the mask head. For a timm model they are the last
    four entries of its ``feature_info`` (transformers' ``out_indices=(1, 2, 3, 4)`` on the usual
    five-level CNNs: stem, then four stages). A model whose last four levels are not at strides
    4, 8, 16, 32 (ViTs, MLP-Mixers...) is refused with a :class:`ConfigError`.
DC5 (``dilation=True``)
    ``output_stride=16``, as transformers: timm dilates the last stage of the models that support it.
Frozen BatchNorm (``frozen_bn=True``)
    By default timm's own freezing (``timm.utils.model.freeze_batch_norm_2d``): each BatchNorm keeps its
    ``eps`` and, for timm's ``BatchNormAct2d``, the activation fused into it, so the network is the one
    its ImageNet weights were trained as. transformers instead replaces every ``BatchNorm2d``
    (subclasses included) by a plain frozen BatchNorm with ``eps=1e-5``, which drops the activations
    fused into ``BatchNormAct2d`` (MobileNetV3, EfficientNet, RegNet...) and changes the ``eps`` of the
    ``tf_`` ports. ``transformers_bn=True`` reproduces that exactly; checkpoints read from transformers
    set it, since their weights were trained that way. Both agree on models with plain BatchNorm
    (timm's ResNets).
Trainable parameters
    As the original DETR (conv1 and layer1 frozen): the stem and stage 1 (everything up to and including
    the module of the first of the four levels) never train; stages 2-4 train when ``train_backbone``.
    transformers does otherwise, inconsistently across versions: 4.x freezes like this for timm model
    names containing "resnet" and freezes nothing for the others; 5.x freezes nothing for any timm
    backbone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..errors import ConfigError
from .feature_maps import with_masks

_STRIDES = (4, 8, 16, 32)


def _timm():
    try:
        import timm
    except ImportError as e:
        raise ConfigError(
            f"timm backbones need the timm package: pip install 'detrkit[timm]' ({e})"
        ) from None
    return timm


@dataclass(frozen=True)
class TimmFeatures:
    """What DETR uses of a timm model's ``feature_info``: its four levels (strides 4-32)."""

    out_indices: tuple[int, ...]  # indices into feature_info of stages 1-4
    channels: tuple[int, ...]  # channels of stages 1-4
    reductions: tuple[int, ...]  # strides of stages 1-4 (the last is 16 with DC5)
    first_stage: str  # feature_info module name of stage 1 (frozen with everything before it)
    transformers_compatible_bn: bool  # transformers' BatchNorm replacement computes the same


def _create(name: str, dilation: bool, pretrained: bool = False, **kwargs) -> nn.Module:
    timm = _timm()
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model {name!r} (see timm.list_models())")
    if dilation:
        kwargs["output_stride"] = 16
    try:
        return timm.create_model(name, pretrained=pretrained, features_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm fails in many ways for models without feature maps
        what = "with output_stride=16 (DC5, dilation=True)" if dilation else "with features_only=True"
        raise ConfigError(
            f"timm model {name!r} cannot give feature maps {what}: {type(e).__name__}: {e}"
        ) from None


def _bn_like_transformers(model: nn.Module) -> bool:
    """Whether transformers' ``replace_batch_norm`` (plain frozen BN, eps 1e-5, no activation) leaves
    this model's function unchanged."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            if module.eps != 1e-5:
                return False
            for extra in ("act", "drop"):
                if not isinstance(getattr(module, extra, nn.Identity()), nn.Identity):
                    return False
    return True


@functools.lru_cache(maxsize=64)
def timm_features(name: str, dilation: bool = False) -> TimmFeatures:
    """The feature levels DETR uses of timm model ``name``; built on the meta device (no weights, no
    download), once per name. Raises :class:`ConfigError` for an unknown name or a model without
    feature maps at strides 4, 8, 16, 32."""
    with torch.device("meta"):
        model = _create(name, dilation)
    info = model.feature_info
    reductions = tuple(info.reduction())
    expected = (4, 8, 16, 16) if dilation else _STRIDES
    if len(reductions) < 4 or reductions[-4:] != expected:
        raise ConfigError(
            f"timm model {name!r} has feature maps at strides {list(reductions)}; DETR needs its last "
            f"four at strides {list(expected)} (a CNN with four stages, like ResNet)"
        )
    if getattr(model, "pretrained_cfg", {}).get("fixed_input_size"):
        raise ConfigError(
            f"timm model {name!r} takes images of one fixed size only (a windowed or ViT-style model); "
            "DETR feeds images of any size: choose a CNN (resnet*, mobilenetv3*, efficientnet*, convnext*...)"
        )
    out_indices = tuple(range(len(reductions) - 4, len(reductions)))
    return TimmFeatures(
        out_indices=out_indices,
        channels=tuple(info.channels()[i] for i in out_indices),
        reductions=reductions[-4:],
        first_stage=info.module_name()[out_indices[0]],
        transformers_compatible_bn=_bn_like_transformers(model),
    )


def _freeze_transformers_style(module: nn.Module) -> nn.Module:
    """transformers' ``replace_batch_norm``: every BatchNorm2d (timm's BatchNormAct2d included, its
    activation dropped) becomes a frozen BatchNorm with eps 1e-5."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=1e-5)
            if child.affine and child.weight.device.type != "meta":
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            module._modules[name] = frozen
        else:
            _freeze_transformers_style(child)
    return module


class TimmBackbone(nn.Module):
    """A timm CNN (``features_only``) returning DETR's feature maps, with downsampled padding masks.

    The timm model is ``self.body``, so its parameters are ``backbone.body.<timm name>`` (transformers:
    ``model.backbone.conv_encoder.model.<timm name>``). Same interface as :class:`Backbone`.

    Args:
        name: a timm model name (without the ``timm:`` prefix), e.g. ``tf_mobilenetv3_small_075``.
        train_backbone: whether stages 2-4 get gradients (the stem and stage 1 never do).
        return_interm_layers: return stages 1-4 (for the mask head) instead of the last one only.
        dilation: DC5 (``output_stride=16``).
        pretrained: load timm's ImageNet weights (downloads them if not cached).
        frozen_bn: BatchNorm with fixed statistics; False trains ordinary BatchNorm.
        transformers_bn: freeze BatchNorm exactly as transformers does (see the module docstring).
        last_stage: deepest stage kept (2-4).
    """

    def __init__(
        self,
        name: str,
        *,
        train_backbone: bool = True,
        return_interm_layers: bool = False,
        dilation: bool = False,
        pretrained: bool = False,
        frozen_bn: bool = True,
        transformers_bn: bool = False,
        last_stage: int = 4,
    ) -> None:
        super().__init__()
        features = timm_features(name, dilation)
        stages = list(range(1, last_stage + 1)) if return_interm_layers else [last_stage]
        out_indices = tuple(features.out_indices[i - 1] for i in stages)
        body = _create(name, dilation, pretrained=pretrained, out_indices=out_indices)
        if frozen_bn:
            with torch.no_grad():
                if transformers_bn:
                    body = _freeze_transformers_style(body)
                else:
                    from timm.utils.model import freeze_batch_norm_2d

                    body = freeze_batch_norm_2d(body)
        self._freeze_stem_and_stage1(body, features.first_stage, train_backbone)
        self.body = body
        self.strides = [features.reductions[i - 1] for i in stages]
        self.channels = [features.channels[i - 1] for i in stages]
        self.num_channels = features.channels[last_stage - 1]

    @staticmethod
    def _freeze_stem_and_stage1(body: nn.Module, first_stage: str, train_backbone: bool) -> None:
        params = list(body.named_parameters())
        # feature_info names modules as in the full model ("blocks.1"); timm's FeatureListNet flattens
        # nested names ("stages_0").
        prefixes = (first_stage + ".", first_stage.replace(".", "_") + ".")
        in_stage1 = [i for i, (n, _) in enumerate(params) if n.startswith(prefixes)]
        if not in_stage1:
            raise ConfigError(f"cannot find the parameters of the timm module {first_stage!r} to freeze")
        for i, (_, parameter) in enumerate(params):
            if not train_backbone or i <= in_stage1[-1]:
                parameter.requires_grad_(False)

    def forward(self, images: Tensor, padding_mask: Tensor | None) -> list[tuple[Tensor, Tensor | None]]:
        """
        Args:
            images: Tensor[B, 3, H, W], normalised.
            padding_mask: Bool Tensor[B, H, W], True on padding, or None when nothing is padded.

        Returns:
            One ``(features [B, C_l, H_l, W_l], mask [B, H_l, W_l] or None)`` per returned stage,
            shallowest first.
        """
        return with_masks(list(self.body(images)), padding_mask)
