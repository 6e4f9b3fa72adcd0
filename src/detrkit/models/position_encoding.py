"""2D position encodings added to the flattened feature map (sine as in the paper, or learned)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """The "Attention is all you need" sine encoding, generalised to images.

    Half of the channels encode y, half x. With ``normalize=True`` (DETR's setting) coordinates are
    the cumulative count of *valid* pixels divided by the valid extent, so an image's encoding does
    not depend on how much padding it got in a batch.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: int = 10000,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, features: Tensor, mask: Tensor | None) -> Tensor:
        """
        Args:
            features: Tensor[B, C, H, W] (only its shape, device and dtype are used).
            mask: Bool Tensor[B, H, W], True on padding, or None.

        Returns:
            Tensor[B, 2 * num_pos_feats, H, W] in ``features.dtype``.
        """
        batch, _, height, width = features.shape
        device = features.device
        if mask is None:
            # No padding: every image has the same encoding; compute one and broadcast.
            not_mask = torch.ones((1, height, width), dtype=torch.float32, device=device)
        else:
            not_mask = (~mask).float()
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(features.dtype)
        return pos.expand(batch, -1, -1, -1)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute row/column embeddings (feature maps up to 50x50, as in the original)."""

    max_size = 50

    def __init__(self, num_pos_feats: int = 128) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(self.max_size, num_pos_feats)
        self.col_embed = nn.Embedding(self.max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, features: Tensor, mask: Tensor | None) -> Tensor:
        """Returns Tensor[B, 2 * num_pos_feats, H, W]; ``mask`` is ignored (absolute positions)."""
        batch, _, height, width = features.shape
        if height > self.max_size or width > self.max_size:
            raise ValueError(
                f"learned position embeddings cover feature maps up to {self.max_size}x{self.max_size}, "
                f"got {height}x{width}: use smaller images or position_embedding='sine'"
            )
        device = features.device
        x_emb = self.col_embed(torch.arange(width, device=device))
        y_emb = self.row_embed(torch.arange(height, device=device))
        pos = torch.cat(
            [x_emb.unsqueeze(0).expand(height, -1, -1), y_emb.unsqueeze(1).expand(-1, width, -1)], dim=-1
        )
        return pos.permute(2, 0, 1).unsqueeze(0).expand(batch, -1, -1, -1).to(features.dtype)


def build_position_encoding(kind: str, d_model: int) -> nn.Module:
    if kind == "sine":
        return PositionEmbeddingSine(d_model // 2, normalize=True)
    if kind == "learned":
        return PositionEmbeddingLearned(d_model // 2)
    raise ValueError(f"unknown position embedding {kind!r}: expected 'sine' or 'learned'")
