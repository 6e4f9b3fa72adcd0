"""The mask head of DETR's segmentation models: an attention map per query over the encoder memory,
refined by a small FPN-style convolutional head fed with backbone layers 3, 2 and 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _expand(tensor: Tensor, length: int) -> Tensor:
    """[B, C, H, W] -> [B * length, C, H, W], each image repeated for each of its queries."""
    return tensor.unsqueeze(1).repeat(1, length, 1, 1, 1).flatten(0, 1)


class MHAttentionMap(nn.Module):
    """2D attention that returns only the softmax weights (no values), as in the original.

    The softmax runs jointly over heads and positions, a quirk of the original kept for parity.
    """

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        nn.init.zeros_(self.k_linear.bias)
        nn.init.zeros_(self.q_linear.bias)
        nn.init.xavier_uniform_(self.k_linear.weight)
        nn.init.xavier_uniform_(self.q_linear.weight)
        self.normalize_fact = float(hidden_dim / num_heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            q: decoder output, Tensor[B, Q, E]; k: encoder memory, Tensor[B, E, H, W];
            mask: Bool Tensor[B, H, W], True on padding, or None.

        Returns:
            Tensor[B, Q, num_heads, H, W].
        """
        q = self.q_linear(q)
        k = F.conv2d(k, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        head_dim = self.hidden_dim // self.num_heads
        qh = q.view(q.shape[0], q.shape[1], self.num_heads, head_dim)
        kh = k.view(k.shape[0], self.num_heads, head_dim, k.shape[-2], k.shape[-1])
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)
        if mask is not None:
            weights = weights.masked_fill(mask[:, None, None], float("-inf"))
        weights = F.softmax(weights.flatten(2), dim=-1).view(weights.shape)
        return self.dropout(weights)


class MaskHeadSmallConv(nn.Module):
    """Upsampling conv head: concatenated features + attention maps, fused with FPN features.

    Args:
        dim: input channels (d_model + num_heads).
        fpn_dims: channels of backbone layers 3, 2, 1.
        context_dim: d_model.
    """

    def __init__(self, dim: int, fpn_dims: list[int], context_dim: int) -> None:
        super().__init__()
        inter_dims = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]

        def gn(channels: int) -> nn.GroupNorm:
            # 8 groups as in the original; fewer only for the tiny widths of test-sized models.
            return nn.GroupNorm(min(8, channels), channels)

        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = gn(dim)
        self.lay2 = nn.Conv2d(dim, inter_dims[1], 3, padding=1)
        self.gn2 = gn(inter_dims[1])
        self.lay3 = nn.Conv2d(inter_dims[1], inter_dims[2], 3, padding=1)
        self.gn3 = gn(inter_dims[2])
        self.lay4 = nn.Conv2d(inter_dims[2], inter_dims[3], 3, padding=1)
        self.gn4 = gn(inter_dims[3])
        self.lay5 = nn.Conv2d(inter_dims[3], inter_dims[4], 3, padding=1)
        self.gn5 = gn(inter_dims[4])
        self.out_lay = nn.Conv2d(inter_dims[4], 1, 3, padding=1)
        self.adapter1 = nn.Conv2d(fpn_dims[0], inter_dims[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], inter_dims[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], inter_dims[3], 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor, bbox_mask: Tensor, fpns: list[Tensor]) -> Tensor:
        """
        Args:
            x: projected features, Tensor[B, E, H, W].
            bbox_mask: attention maps, Tensor[B, Q, N, H, W].
            fpns: backbone layers 3, 2, 1: Tensor[B, C_i, H_i, W_i].

        Returns:
            mask logits, Tensor[B * Q, 1, H_1, W_1] (1/4 of the input resolution).
        """
        num_queries = bbox_mask.shape[1]
        x = torch.cat([_expand(x, num_queries), bbox_mask.flatten(0, 1)], 1)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        for adapter, lay, norm, fpn in (
            (self.adapter1, self.lay3, self.gn3, fpns[0]),
            (self.adapter2, self.lay4, self.gn4, fpns[1]),
            (self.adapter3, self.lay5, self.gn5, fpns[2]),
        ):
            # The 1x1 adapter runs once per image, before repeating over queries.
            cur_fpn = _expand(adapter(fpn), num_queries)
            x = cur_fpn + F.interpolate(x, size=cur_fpn.shape[-2:], mode="nearest")
            x = F.relu(norm(lay(x)))
        return self.out_lay(x)
