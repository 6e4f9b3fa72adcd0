"""Feature maps paired with their padding masks: the one helper every backbone shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def with_masks(feature_maps: list[Tensor], padding_mask: Tensor | None) -> list[tuple[Tensor, Tensor | None]]:
    """Pair each feature map Tensor[B, C, h, w] with the padding mask downsampled to it, Bool
    Tensor[B, h, w] (None when nothing is padded)."""
    out = []
    for features in feature_maps:
        mask = None
        if padding_mask is not None:
            # Nearest-neighbour downsampling, exactly as the original (so padded outputs match).
            mask = F.interpolate(padding_mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        out.append((features, mask))
    return out
