"""DETR's encoder-decoder transformer, batch-first, on ``scaled_dot_product_attention``.

Parameter names follow the original (and ``torch.nn.MultiheadAttention``): ``self_attn.in_proj_weight``
packs the q/k/v projections, ``linear1/linear2`` form the FFN, ``norm1..3`` the layer norms. The
semantics are the original's: position encodings are added to queries and keys (never values), the
decoder keeps its un-normalised state between layers and normalises only the copies it returns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dropout import Dropout, dropout


class MultiheadAttention(nn.Module):
    """Multi-head attention with packed in-projection, computed by ``F.scaled_dot_product_attention``.

    Unlike ``nn.MultiheadAttention`` it takes the inputs to project separately for q, k and v, so the
    shared q/k projection of self-attention costs one matmul, and it is batch-first.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """
        Args:
            query: Tensor[B, Lq, E]; key: Tensor[B, Lk, E]; value: Tensor[B, Lk, E].
            key_padding_mask: Bool Tensor[B, Lk], True where the key is padding, or None.
            need_weights: also return the attention weights averaged over heads, Tensor[B, Lq, Lk].

        Returns:
            (Tensor[B, Lq, E], weights or None)
        """
        e = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key:
            q, k = F.linear(query, w[: 2 * e], b[: 2 * e]).chunk(2, dim=-1)
        else:
            q = F.linear(query, w[:e], b[:e])
            k = F.linear(key, w[e : 2 * e], b[e : 2 * e])
        v = F.linear(value, w[2 * e :], b[2 * e :])

        batch, len_q, _ = q.shape
        len_k = k.shape[1]
        head_dim = e // self.num_heads
        q = q.view(batch, len_q, self.num_heads, head_dim).transpose(1, 2)
        k = k.view(batch, len_k, self.num_heads, head_dim).transpose(1, 2)
        v = v.view(batch, len_k, self.num_heads, head_dim).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights or (dropout_p > 0.0 and q.device.type == "cpu"):
            # Explicit attention: for the weights, and for training on a CPU, where SDPA's dropout
            # (its math path, with bernoulli_ masks) costs more than this with models/dropout.py's.
            # In fp32, as the bf16 path below.
            with torch.autocast(q.device.type, enabled=False):
                probs = _attention_probs(q.float(), k.float(), key_padding_mask)
                if need_weights:
                    weights = probs.mean(1)
                out = (dropout(probs, dropout_p) @ v.float()).to(q.dtype)
        elif q.dtype == torch.bfloat16 and q.device.type == "cpu":
            # Under CPU bf16 autocast the projections run in bf16, but the CPU attention kernel's
            # bf16 backward is ~3x slower than its fp32 one (bench/profile_step.py): attend in fp32
            # (autocast would cast the inputs straight back to bf16).
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), attn_mask=_may_attend(key_padding_mask)
                ).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=_may_attend(key_padding_mask), dropout_p=dropout_p
            )
        out = out.transpose(1, 2).reshape(batch, len_q, e)
        return self.out_proj(out), weights


def _may_attend(key_padding_mask: Tensor | None) -> Tensor | None:
    """SDPA's boolean mask ("may attend"), Bool Tensor[B, 1, 1, Lk], from a key padding mask."""
    return None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]


def _attention_probs(q: Tensor, k: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(d)) over unpadded keys, Tensor[B, H, Lq, Lk], from q: Tensor[B, H, Lq, d],
    k: Tensor[B, H, Lk, d]. A sequence whose keys are all padding attends to nothing (zeros), as
    SDPA does, with finite gradients."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if key_padding_mask is None:
        return scores.softmax(-1)
    padding = key_padding_mask[:, None, None, :]
    # The most negative finite value rather than -inf: a fully padded row then softmaxes to a
    # finite uniform row (zeroed below) instead of NaN, whose gradient would spread NaN.
    probs = scores.masked_fill(padding, torch.finfo(scores.dtype).min).softmax(-1)
    empty = key_padding_mask.all(-1)
    return probs.masked_fill(empty[:, None, None, None], 0.0) if bool(empty.any()) else probs


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


def _split_groups(x: Tensor, groups: int) -> Tensor:
    """Tensor[B, G*Q, E] -> Tensor[B*G, Q, E]: each group of queries becomes its own sequence, so
    self-attention stays within a group (cheaper and exact, unlike a block-diagonal mask)."""
    return x if groups == 1 else x.reshape(x.shape[0] * groups, x.shape[1] // groups, x.shape[2])


def _join_groups(x: Tensor, groups: int) -> Tensor:
    """Tensor[B*G, Q, E] -> Tensor[B, G*Q, E] (the inverse of :func:`_split_groups`)."""
    return x if groups == 1 else x.reshape(x.shape[0] // groups, x.shape[1] * groups, x.shape[2])


class QuerySegment(NamedTuple):
    """``count`` consecutive groups of ``size`` decoder queries; each group attends only to itself
    in self-attention. ``key_padding``: Bool Tensor[B * count, size], per group (batch-major), True
    on queries no other query of the group may attend to (empty slots), or None."""

    count: int
    size: int
    key_padding: Tensor | None = None


class DenoisingQueries(NamedTuple):
    """Training-only decoder queries built from noised ground truth (:mod:`detrkit.training.aids`): initial
    decoder states ``content`` and position embeddings ``position``, Tensor[B, groups * M, E] each,
    in ``groups`` groups of M that attend only within themselves (never to the object queries, which
    never see them either); ``padding`` Bool Tensor[B, groups * M] marks slots without an object."""

    content: Tensor
    position: Tensor
    groups: int
    padding: Tensor | None = None


class _Layer(nn.Module):
    """What encoder and decoder layers share: self-attention, the ReLU FFN, norms and dropouts
    (``norm1..n``/``dropout1..n``, the original's parameter names)."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool, num_norms: int
    ) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = Dropout(dropout)
        for i in range(1, num_norms + 1):
            setattr(self, f"norm{i}", nn.LayerNorm(d_model))
            setattr(self, f"dropout{i}", Dropout(dropout))
        self.pre_norm = pre_norm

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class TransformerEncoderLayer(_Layer):
    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool
    ) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, pre_norm, num_norms=2)

    def forward(self, src: Tensor, key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        """src, pos: Tensor[B, S, E]; key_padding_mask: Bool Tensor[B, S] or None."""
        if self.pre_norm:
            x = self.norm1(src)
            qk = _with_pos(x, pos)
            src = src + self.dropout1(self.self_attn(qk, qk, x, key_padding_mask)[0])
            return src + self.dropout2(self._ffn(self.norm2(src)))
        qk = _with_pos(src, pos)
        src = self.norm1(src + self.dropout1(self.self_attn(qk, qk, src, key_padding_mask)[0]))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(_Layer):
    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool
    ) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, pre_norm, num_norms=3)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None,
        pos: Tensor | None,
        query_pos: Tensor,
        segments: tuple[QuerySegment, ...] | None = None,
    ) -> Tensor:
        """tgt, query_pos: Tensor[B, Q, E]; memory, pos: Tensor[B, S, E]; mask: Bool Tensor[B, S] or None.

        ``segments``: the queries are consecutive groups that do not see each other in self-attention
        (the training-only query groups and denoising queries); None = the plain DETR layer."""
        key = _with_pos(memory, pos)
        if self.pre_norm:
            x = self.norm1(tgt)
            tgt = tgt + self.dropout1(self._self_attention(x + query_pos, x, segments))
            x = self.norm2(tgt)
            tgt = tgt + self.dropout2(
                self.multihead_attn(x + query_pos, key, memory, memory_key_padding_mask)[0]
            )
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        tgt = self.norm1(tgt + self.dropout1(self._self_attention(tgt + query_pos, tgt, segments)))
        attended = self.multihead_attn(tgt + query_pos, key, memory, memory_key_padding_mask)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))

    def _self_attention(self, qk: Tensor, value: Tensor, segments: tuple[QuerySegment, ...] | None) -> Tensor:
        if segments is None:
            return self.self_attn(qk, qk, value)[0]
        outs, start = [], 0
        for count, size, key_padding in segments:
            end = start + count * size
            q = _split_groups(qk[:, start:end], count)
            attended = self.self_attn(q, q, _split_groups(value[:, start:end], count), key_padding)[0]
            outs.append(_join_groups(attended, count))
            start = end
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


class TransformerEncoder(nn.Module):
    def __init__(self, layers: list[TransformerEncoderLayer], norm: nn.LayerNorm | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm  # only with pre-norm layers, as in the original

    def forward(self, src: Tensor, key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    def __init__(self, layers: list[TransformerDecoderLayer], norm: nn.LayerNorm) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None,
        pos: Tensor | None,
        query_pos: Tensor,
        return_intermediate: bool,
        segments: tuple[QuerySegment, ...] | None = None,
    ) -> Tensor:
        """Returns Tensor[L, B, Q, E] (every layer, normalised) or Tensor[1, B, Q, E] (last layer only)."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos, segments)
            if return_intermediate:
                # The un-normalised state goes on to the next layer; only this copy is normalised.
                intermediate.append(self.norm(tgt))
        if return_intermediate:
            return torch.stack(intermediate)
        return self.norm(tgt)[None]


class Transformer(nn.Module):
    """Encoder over the flattened feature map, decoder over the object queries.

    Args mirror the original: d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
    dropout (also applied to attention weights), normalize_before (pre-norm).
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        args = (d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.encoder = TransformerEncoder(
            [TransformerEncoderLayer(*args) for _ in range(num_encoder_layers)],
            nn.LayerNorm(d_model) if normalize_before else None,
        )
        self.decoder = TransformerDecoder(
            [TransformerDecoderLayer(*args) for _ in range(num_decoder_layers)], nn.LayerNorm(d_model)
        )
        self.d_model = d_model
        self.nhead = nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None,
        query_embed: Tensor,
        pos_embed: Tensor,
        return_intermediate: bool = True,
        query_groups: int = 1,
        denoising: DenoisingQueries | None = None,
    ) -> tuple[Tensor, Tensor]:
        """
        Args:
            src: projected features, Tensor[B, E, H, W].
            mask: Bool Tensor[B, H, W], True on padding, or None.
            query_embed: learned object queries, Tensor[Q, E].
            pos_embed: Tensor[B, E, H, W].
            query_groups: split the queries into this many equal groups that do not attend to each
                other (training-only query groups); 1 for DETR itself.
            denoising: training-only denoising queries, decoded after the object queries.

        Returns:
            hs: decoder outputs, Tensor[L, B, Q (+ D), E] (L = 1 unless ``return_intermediate``), the
                D denoising queries' after the object queries';
            memory: encoder output, Tensor[B, E, H, W].
        """
        batch, channels, height, width = src.shape
        src = src.flatten(2).transpose(1, 2)
        pos = pos_embed.flatten(2).transpose(1, 2)
        key_padding_mask = None if mask is None else mask.flatten(1)
        query_pos = query_embed.unsqueeze(0).expand(batch, -1, -1)
        memory = self.encoder(src, key_padding_mask, pos)
        tgt = torch.zeros_like(query_pos)
        segments = None
        if query_groups > 1 or denoising is not None:
            segments = (QuerySegment(query_groups, query_pos.shape[1] // query_groups),)
        if denoising is not None:
            size = denoising.content.shape[1] // denoising.groups
            key_padding = None
            if denoising.padding is not None:
                key_padding = denoising.padding.reshape(-1, size)
                # A group with no query to attend to (an image without objects) attends to all of
                # them instead: its outputs are unused, and older PyTorch releases return NaN for an
                # all-masked row, which would reach the gradients.
                key_padding = key_padding & ~key_padding.all(1, keepdim=True)
            segments += (QuerySegment(denoising.groups, size, key_padding),)
            tgt = torch.cat([tgt, denoising.content], 1)
            query_pos = torch.cat([query_pos, denoising.position], 1)
        hs = self.decoder(tgt, memory, key_padding_mask, pos, query_pos, return_intermediate, segments)
        return hs, memory.transpose(1, 2).reshape(batch, channels, height, width)
