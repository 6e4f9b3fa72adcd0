"""Training-only convergence aids: modules that wrap a DETR during training and vanish after it.

The saved model is always the plain :class:`~detrkit.model.Detr` inside the wrapper: the aid's own
parameters are kept apart (``aid_state_dict``), in the training checkpoint for ``--resume`` only,
so every reader of a checkpoint — ``load_model``, ``convert`` to the original's or transformers'
layout, ONNX export — sees a vanilla DETR of the configured size.

Group DETR (Chen et al., "Group DETR: Fast DETR Training with Group-Wise One-to-Many Assignment",
ICCV 2023): ``G - 1`` more groups of object queries are decoded alongside the model's own, with
shared decoder weights and heads; self-attention stays within a group, and each group is matched
one-to-one with the ground truth on its own. Every ground-truth box thus supervises ``G`` queries
per decoder layer (more positive samples, hence faster convergence) while each group keeps DETR's
duplicate-free one-to-one semantics. At evaluation the wrapper runs the model's own queries only,
so inference is exactly DETR's.
"""

from __future__ import annotations

from torch import Tensor, nn

from .model import Detr


class GroupDetr(nn.Module):
    """A :class:`Detr` trained with ``groups`` query groups (its own counts as the first).

    ``forward(images, padding_mask)`` in training mode returns outputs over ``groups * Q`` queries
    (Tensor[B, G*Q, K+1] logits, Tensor[B, G*Q, 4] boxes, per decoder layer), which a criterion
    built for the model (``SetCriterion(num_queries=Q)``) matches group by group; in eval mode it is
    the model itself.
    """

    def __init__(self, detr: Detr, groups: int) -> None:
        super().__init__()
        if groups < 2:
            raise ValueError(f"Group DETR needs at least 2 query groups, got {groups}")
        if detr.config.masks:
            raise ValueError("query groups are for detection models: the mask head runs on one group")
        self.detr = detr
        self.groups = groups
        config = detr.config
        # Initialised like the model's own queries (nn.Embedding's N(0, 1)), one row per query.
        self.extra_queries = nn.Embedding((groups - 1) * config.num_queries, config.d_model)

    def forward(self, images: Tensor, padding_mask: Tensor | None = None) -> dict[str, Tensor | list]:
        if not self.training:
            return self.detr(images, padding_mask)
        return self.detr(images, padding_mask, extra_queries=self.extra_queries.weight)

    def aid_state_dict(self) -> dict[str, Tensor]:
        """The aid's own parameters (none of the model's): what ``--resume`` needs besides the model."""
        return {f"extra_queries.{k}": v for k, v in self.extra_queries.state_dict().items()}

    def load_aid_state_dict(self, state: dict[str, Tensor]) -> None:
        prefix = "extra_queries."
        self.extra_queries.load_state_dict({k[len(prefix) :]: v for k, v in state.items()})


def unwrap(module: nn.Module) -> nn.Module:
    """The DETR inside a DistributedDataParallel and/or a training aid wrapper (or the module)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    return module.detr if isinstance(module, GroupDetr) else module
