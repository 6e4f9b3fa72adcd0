"""Training-only convergence aids: modules that wrap a DETR during training and vanish after it.

The saved model is always the plain :class:`~detrkit.models.detr.Detr` inside the wrapper: the aids' own
parameters are kept apart (``aid_state_dict``), in the training checkpoint for ``--resume`` only,
so every reader of a checkpoint — ``load_model``, ``convert`` to the original's or transformers'
layout, ONNX export — sees a vanilla DETR of the configured size. At evaluation the wrapper runs
the model itself, so inference is exactly DETR's.

Query groups (Chen et al., "Group DETR: Fast DETR Training with Group-Wise One-to-Many
Assignment", ICCV 2023): ``G - 1`` more groups of object queries are decoded alongside the model's
own, with shared decoder weights and heads; self-attention stays within a group, and each group is
matched one-to-one with the ground truth on its own. Every ground-truth box thus supervises ``G``
queries per decoder layer (more positive samples, hence faster convergence) while each group keeps
DETR's duplicate-free one-to-one semantics.

Denoising queries (Li et al., "DN-DETR: Accelerate DETR Training by Introducing Query DeNoising",
CVPR 2022), adapted to vanilla DETR: ``denoising_groups`` copies of each image's ground truth are
noised — each label flipped to a random class with probability ``label_noise``, each box's centre
moved by up to ``box_noise`` times half its size and its width and height scaled by up to
``1 ± box_noise`` — and fed to the decoder as extra queries: a label embedding as the initial
decoder state (DETR's own queries start from zeros) and an embedding of the box as the query's
position embedding (where DETR has its learned one). Each must reconstruct its object; no
matching is involved, so these queries give the decoder and the heads a stable signal while the
Hungarian matching of the object queries still flips between epochs (DN-DETR's analysis). The
object queries never see them (and the groups do not see each other), so the model's own
decoding is unchanged; the two embeddings are thrown away after training.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..models.detr import MLP, Detr
from ..models.transformer import DenoisingQueries


def box_sine_embedding(boxes: Tensor, dim: int) -> Tensor:
    """Tensor[..., 4] (normalised cx, cy, w, h) -> Tensor[..., dim]: each coordinate as ``dim / 4``
    sines and cosines of geometrically spaced frequencies (scale 2π, temperature 10000, as DETR's
    sine position encoding of the feature map)."""
    n = dim // 4
    steps = torch.arange(n, dtype=torch.float32, device=boxes.device)
    frequencies = 10000 ** (2 * (steps // 2) / n)
    x = boxes.float()[..., None] * (2 * math.pi) / frequencies  # [..., 4, n]
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), -1).flatten(-3)


class TrainingAids(nn.Module):
    """A :class:`Detr` trained with query groups and/or denoising queries.

    ``forward(images, padding_mask, targets)`` in training mode returns outputs over ``G * Q``
    object queries (Tensor[B, G*Q, K+1] logits, Tensor[B, G*Q, 4] boxes, per decoder layer), which
    a criterion built for the model (``SetCriterion(num_queries=Q)``) matches group by group; with
    denoising, also ``denoising``: the denoising queries' outputs (Tensor[B, D, *] per layer) with
    ``indices`` (per image, which of them reconstructs which target) and ``groups``. In eval mode it
    is the model itself.

    Args:
        detr: the model to train (a detection model: the mask head would run on every query).
        query_groups: groups of object queries, the model's own included (1 = none added).
        denoising_groups: noised copies of the ground truth per image (0 = no denoising).
        label_noise, box_noise: DN-DETR's label flip probability and box noise scale.
    """

    def __init__(
        self,
        detr: Detr,
        query_groups: int = 1,
        denoising_groups: int = 0,
        label_noise: float = 0.2,
        box_noise: float = 0.4,
    ) -> None:
        super().__init__()
        if query_groups < 1 or denoising_groups < 0 or (query_groups == 1 and denoising_groups == 0):
            raise ValueError(
                f"nothing to add: query_groups={query_groups} (at least 2 to add groups), "
                f"denoising_groups={denoising_groups} (at least 1 to denoise)"
            )
        if detr.config.masks:
            raise ValueError("training aids are for detection models: the mask head runs on one group")
        config = detr.config
        if denoising_groups and config.d_model % 8:
            raise ValueError(
                f"denoising needs d_model divisible by 8 (a box's sine embedding), got {config.d_model}"
            )
        self.detr = detr
        self.groups = query_groups
        self.denoising_groups = denoising_groups
        self.label_noise = label_noise
        self.box_noise = box_noise
        if query_groups > 1:
            # Initialised like the model's own queries (nn.Embedding's N(0, 1)), one row per query.
            self.extra_queries = nn.Embedding((query_groups - 1) * config.num_queries, config.d_model)
        if denoising_groups:
            # One row per class and one ("no object") for empty slots.
            self.label_embed = nn.Embedding(config.num_classes + 1, config.d_model)
            self.box_embed = MLP(config.d_model, config.d_model, config.d_model, 2)

    def forward(
        self,
        images: Tensor,
        padding_mask: Tensor | None = None,
        targets: list[dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor | list]:
        if not self.training:
            return self.detr(images, padding_mask)
        extra = self.extra_queries.weight if self.groups > 1 else None
        if not self.denoising_groups:
            return self.detr(images, padding_mask, extra_queries=extra)
        if targets is None:
            raise ValueError(
                "denoising queries are built from the targets: call the aid with targets in training"
            )
        queries, indices = self.denoising_queries(targets)
        out = self.detr(images, padding_mask, extra_queries=extra, denoising=queries)
        out["denoising"].update(indices=indices, groups=self.denoising_groups)
        return out

    def noised_targets(self, targets: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        """``denoising_groups`` noised copies of each image's targets, padded to M slots per copy (M =
        the batch's largest object count, at least 1): labels Int64Tensor[B, G*M] (``num_classes``
        on empty slots), boxes Tensor[B, G*M, 4] (normalised cxcywh) and valid Bool Tensor[B, G*M];
        copy ``g`` of target ``j`` is slot ``g * M + j``."""
        device = self.label_embed.weight.device
        groups, num_classes = self.denoising_groups, self.detr.config.num_classes
        counts = [len(t["labels"]) for t in targets]
        size = max(max(counts, default=0), 1)
        labels = torch.full((len(targets), size), num_classes, dtype=torch.int64, device=device)
        boxes = torch.zeros(len(targets), size, 4, device=device)
        for i, t in enumerate(targets):
            labels[i, : counts[i]] = t["labels"]
            boxes[i, : counts[i]] = t["boxes"].to(boxes)
        valid = torch.arange(size, device=device) < torch.tensor(counts, device=device)[:, None]
        labels, boxes, valid = labels.repeat(1, groups), boxes.repeat(1, groups, 1), valid.repeat(1, groups)

        flip = (torch.rand(labels.shape, device=device) < self.label_noise) & valid
        labels = torch.where(flip, torch.randint_like(labels, num_classes), labels)
        # Centres move by up to box_noise * half the size, sizes scale by 1 +- box_noise (DN-DETR).
        spread = torch.cat([boxes[..., 2:] / 2, boxes[..., 2:]], -1)
        boxes = (boxes + (torch.rand_like(boxes) * 2 - 1) * spread * self.box_noise).clamp(0.0, 1.0)
        return labels, boxes, valid

    def denoising_queries(
        self, targets: list[dict[str, Tensor]]
    ) -> tuple[DenoisingQueries, list[tuple[Tensor, Tensor]]]:
        """The noised copies of ``targets`` (:meth:`noised_targets`) as decoder queries, and per image
        the ``(query indices, target indices)`` pairs: which query reconstructs which target. Empty
        slots (M >= 1 even without objects: the aid's parameters take part in every step, as DDP
        needs) are padding."""
        labels, boxes, valid = self.noised_targets(targets)
        groups = self.denoising_groups
        size = labels.shape[1] // groups
        queries = DenoisingQueries(
            content=self.label_embed(labels),
            # The sine embedding is computed in fp32; the MLP takes the model's own dtype.
            position=self.box_embed(
                box_sine_embedding(boxes, self.label_embed.embedding_dim).to(self.label_embed.weight.dtype)
            ),
            groups=groups,
            padding=~valid,
        )
        indices = []
        for t in targets:
            target = torch.arange(len(t["labels"]), device=labels.device)
            query = (torch.arange(groups, device=labels.device)[:, None] * size + target).flatten()
            indices.append((query, target.repeat(groups)))
        return queries, indices

    def aid_parameters(self) -> list[nn.Parameter]:
        """The aids' own parameters (none of the model's), for the optimizer."""
        return [p for name, p in self.named_parameters() if not name.startswith("detr.")]

    def aid_state_dict(self) -> dict[str, Tensor]:
        """The aids' own parameters (none of the model's): what ``--resume`` needs besides the model."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("detr.")}

    def load_aid_state_dict(self, state: dict[str, Tensor]) -> None:
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("detr.")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"training aids' state: missing {missing}, unexpected {result.unexpected_keys} "
                "(saved with other aids?)"
            )
