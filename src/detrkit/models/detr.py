"""The DETR model: backbone -> 1x1 projection -> transformer -> class and box heads (+ mask head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import build_backbone
from .config import DetrConfig
from .position_encoding import build_position_encoding
from .segmentation import MaskHeadSmallConv, MHAttentionMap
from .transformer import DenoisingQueries, Transformer


class MLP(nn.Module):
    """A plain multi-layer perceptron with ReLU between layers (the box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < last else layer(x)
        return x


class Detr(nn.Module):
    """DETR for detection, and for segmentation when ``config.masks`` is set.

    The model returns raw outputs; ``SetCriterion`` turns them into losses and the post-processors
    into detections. Build it with ``detrkit.build_model(config)``; the config stays on
    ``model.config``.
    """

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        self.position_embedding = build_position_encoding(config.position_embedding, config.d_model)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, config.d_model, kernel_size=1)
        self.query_embed = nn.Embedding(config.num_queries, config.d_model)
        self.transformer = Transformer(
            d_model=config.d_model,
            nhead=config.nheads,
            num_encoder_layers=config.enc_layers,
            num_decoder_layers=config.dec_layers,
            dim_feedforward=config.dim_feedforward,
            dropout=config.dropout,
            normalize_before=config.pre_norm,
        )
        self.class_embed = nn.Linear(config.d_model, config.num_classes + 1)
        self.bbox_embed = MLP(config.d_model, config.d_model, 4, 3)
        if config.masks:
            self.bbox_attention = MHAttentionMap(config.d_model, config.d_model, config.nheads, dropout=0.0)
            fpn_dims = self.backbone.channels[:3][::-1]
            self.mask_head = MaskHeadSmallConv(config.d_model + config.nheads, fpn_dims, config.d_model)
            if config.freeze_detector:
                for name, parameter in self.named_parameters():
                    if not name.startswith(("bbox_attention.", "mask_head.")):
                        parameter.requires_grad_(False)

    def forward(
        self,
        images: Tensor,
        padding_mask: Tensor | None = None,
        extra_queries: Tensor | None = None,
        denoising: DenoisingQueries | None = None,
    ) -> dict[str, Tensor | list]:
        """
        Args:
            images: normalised images, Tensor[B, 3, H, W].
            padding_mask: Bool Tensor[B, H, W], True on padded pixels; None when nothing is padded.
            extra_queries: training only (:mod:`detrkit.training.aids`): Tensor[(G-1)*Q, E], more groups of
                Q object queries decoded alongside the model's own, each group attending only to
                itself; the outputs then cover all G*Q queries, the model's own first.
            denoising: training only (:mod:`detrkit.training.aids`): D queries built from noised ground
                truth, decoded alongside (unseen by the object queries); their outputs come apart,
                as ``denoising``: a dict with ``pred_logits``, ``pred_boxes`` (and ``aux_outputs``).

        Returns:
            ``pred_logits`` Tensor[B, Q, K+1] (last class = no object), ``pred_boxes`` Tensor[B, Q, 4]
            normalised (cx, cy, w, h); ``aux_outputs`` (one dict with both keys per earlier decoder
            layer) when ``config.aux_loss``; ``pred_masks`` Tensor[B, Q, H/4, W/4] (mask logits) when
            ``config.masks``.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a Tensor[B, 3, H, W], got shape {tuple(images.shape)}")
        if padding_mask is not None and (
            padding_mask.dtype != torch.bool or padding_mask.shape != (images.shape[0], *images.shape[-2:])
        ):
            raise ValueError(
                f"padding_mask must be a Bool Tensor[B, H, W] matching images {tuple(images.shape)}, "
                f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        features = self.backbone(images, padding_mask)
        src, mask = features[-1]
        pos = self.position_embedding(src, mask)
        src_proj = self.input_proj(src)
        aux = self.config.aux_loss
        queries, groups = self.query_embed.weight, 1
        if self.config.masks and (extra_queries is not None or denoising is not None):
            raise ValueError(
                "training-only queries are for detection models: the mask head runs on one group"
            )
        if extra_queries is not None:
            if extra_queries.shape[0] % queries.shape[0]:
                raise ValueError(
                    f"extra_queries must be Tensor[k*{queries.shape[0]}, E], got {tuple(extra_queries.shape)}"
                )
            groups = 1 + extra_queries.shape[0] // queries.shape[0]
            queries = torch.cat([queries, extra_queries])
        hs, memory = self.transformer(
            src_proj, mask, queries, pos, return_intermediate=aux, query_groups=groups, denoising=denoising
        )

        outputs_class = self.class_embed(hs)
        outputs_coord = self.bbox_embed(hs).sigmoid()
        if denoising is None:
            out = _head_outputs(outputs_class, outputs_coord, aux)
        else:  # the denoising queries' outputs come after the object queries'
            out = _head_outputs(outputs_class, outputs_coord, aux, slice(None, queries.shape[0]))
            out["denoising"] = _head_outputs(outputs_class, outputs_coord, aux, slice(queries.shape[0], None))
        if self.config.masks:
            bbox_mask = self.bbox_attention(hs[-1], memory, mask=mask)
            # Strides 16, 8, 4 (with last_stage 3 the first is the transformer input's own stride).
            fpns = [features[2][0], features[1][0], features[0][0]]
            seg_masks = self.mask_head(src_proj, bbox_mask, fpns)
            out["pred_masks"] = seg_masks.view(images.shape[0], -1, *seg_masks.shape[-2:])
        return out


def _head_outputs(
    logits: Tensor, boxes: Tensor, aux: bool, part: slice | None = None
) -> dict[str, Tensor | list]:
    """The output dict of the queries ``part`` (all by default) from the heads' outputs of every
    decoder layer (Tensor[L, B, Q, *])."""
    if part is not None:
        logits, boxes = logits[:, :, part], boxes[:, :, part]
    out: dict[str, Tensor | list] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux:
        out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
    return out


def build_model(config: DetrConfig | None = None, **overrides) -> Detr:
    """Build a DETR with random weights (ImageNet backbone only if ``pretrained_backbone``).

    ``build_model(DetrConfig(num_classes=3))`` or ``build_model(num_classes=3)``.
    """
    config = (config or DetrConfig()).replace(**overrides) if overrides else (config or DetrConfig())
    return Detr(config)


def unwrap(module: nn.Module) -> nn.Module:
    """The DETR inside a DistributedDataParallel and/or a training wrapper (or ``module`` itself).

    A training wrapper (such as :class:`~detrkit.training.aids.TrainingAids`) exposes the model it
    trains as ``.detr``; recognising it by that attribute keeps this module free of training code."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    inner = getattr(module, "detr", None)
    return inner if isinstance(inner, Detr) else module
