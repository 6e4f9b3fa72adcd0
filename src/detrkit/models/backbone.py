"""ResNet backbone with frozen BatchNorm, as in the original DETR.

The state-dict layout (``body.conv1``, ``body.layer1.0.conv1``, ...) is torchvision's, so original
DETR and timm-style checkpoints map onto it by renaming prefixes only.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from ..errors import ConfigError
from .config import DetrConfig
from .feature_maps import with_masks
from .fold import absorb_frozen_norms

_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}


class Backbone(nn.Module):
    """torchvision ResNet returning the feature maps DETR needs, with downsampled padding masks.

    Args:
        name: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``.
        train_backbone: whether layers 2-4 get gradients (conv1 and layer1 never do, as in DETR).
        return_interm_layers: return layers 1-4 (for the mask head) instead of layer 4 only.
        dilation: replace the stride of the last stage by dilation (DC5 models, stride 16).
        pretrained: load torchvision's ImageNet weights (downloads them if not cached).
        frozen_bn: BatchNorm with fixed statistics, as DETR (right for a pretrained backbone);
            False trains ordinary BatchNorm, which a backbone trained from scratch needs.
        last_stage: deepest stage kept (2-4); the stages after it are not built.
    """

    def __init__(
        self,
        name: str = "resnet50",
        *,
        train_backbone: bool = True,
        return_interm_layers: bool = False,
        dilation: bool = False,
        pretrained: bool = False,
        frozen_bn: bool = True,
        last_stage: int = 4,
    ) -> None:
        super().__init__()
        weights = None
        if pretrained:
            # The original DETR used torchvision's first ImageNet weights (``pretrained=True``).
            weights = getattr(torchvision.models, _WEIGHTS[name]).IMAGENET1K_V1
        try:
            resnet = getattr(torchvision.models, name)(
                weights=weights,
                replace_stride_with_dilation=[False, False, dilation],
                norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d,
            )
        except OSError as e:  # the download (URLError is an OSError) or the cache
            raise ConfigError(
                f"pretrained_backbone=True: torchvision's ImageNet weights of {name} could not be "
                f"downloaded ({e}); connect to the internet once (they are cached), or set "
                "model.pretrained_backbone=false with --init-from a trained DETR"
            ) from None
        for pname, parameter in resnet.named_parameters():
            if not train_backbone or not pname.startswith(("layer2", "layer3", "layer4")):
                parameter.requires_grad_(False)
        strides = [4, 8, 16, 16 if dilation else 32]
        stages = range(1, last_stage + 1) if return_interm_layers else [last_stage]
        return_layers = {f"layer{i}": str(n) for n, i in enumerate(stages)}
        self.strides = [strides[i - 1] for i in stages]
        # IntermediateLayerGetter keeps the modules up to the last returned layer only.
        self.body = IntermediateLayerGetter(resnet, return_layers=return_layers)
        # NHWC convolutions are markedly faster with oneDNN on CPU and with tensor cores on GPU
        # (bench/forward_vs_transformers.py); load_state_dict keeps this layout.
        self.body.to(memory_format=torch.channels_last)
        if frozen_bn:  # each convolution applies its frozen norm through its weights (models/fold.py)
            absorb_frozen_norms(self.body)
        expansion = 1 if name in ("resnet18", "resnet34") else 4
        all_channels = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion][:last_stage]
        self.channels = all_channels if return_interm_layers else all_channels[-1:]
        self.num_channels = all_channels[-1]

    def forward(self, images: Tensor, padding_mask: Tensor | None) -> list[tuple[Tensor, Tensor | None]]:
        """
        Args:
            images: Tensor[B, 3, H, W], normalised.
            padding_mask: Bool Tensor[B, H, W], True on padding, or None when nothing is padded.

        Returns:
            One ``(features [B, C_l, H_l, W_l], mask [B, H_l, W_l] or None)`` per returned layer,
            shallowest first.
        """
        images = images.contiguous(memory_format=torch.channels_last)
        return with_masks(list(self.body(images).values()), padding_mask)


def build_backbone(config: DetrConfig) -> nn.Module:
    """The backbone ``config`` names: a torchvision ResNet, or any timm CNN (``timm:<name>``, see
    :mod:`detrkit.models.timm_backbone`)."""
    kwargs = dict(
        train_backbone=config.train_backbone,
        return_interm_layers=config.masks,
        dilation=config.dilation,
        pretrained=config.pretrained_backbone,
        frozen_bn=config.frozen_bn,
        last_stage=config.last_stage,
    )
    if config.timm_name is not None:
        from .timm_backbone import TimmBackbone

        return TimmBackbone(config.timm_name, transformers_bn=config.transformers_bn, **kwargs)
    return Backbone(config.backbone, **kwargs)
