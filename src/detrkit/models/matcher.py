"""Hungarian matching between predictions and ground truth (one optimal assignment per image)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Assigns each ground-truth object to one prediction by minimising

        cost = cost_class * (-p[target class]) + cost_bbox * L1(boxes) + cost_giou * (-GIoU(boxes))

    Unmatched predictions are supervised as "no object" by the criterion.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError(
                "all matcher costs are 0: at least one of cost_class, cost_bbox, cost_giou must be set"
            )
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], groups: int = 1
    ) -> list[tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` Tensor[B, Q, K+1] and ``pred_boxes`` Tensor[B, Q, 4] (cxcywh, normalised).
            targets: one dict per image with ``labels`` Int64Tensor[N_i] and ``boxes`` Tensor[N_i, 4].
            groups: the Q queries are this many equal, consecutive groups (Group DETR), each matched
                one-to-one with the targets on its own.

        Returns:
            One ``(prediction indices, target indices)`` pair per image, Int64Tensor[groups * min(Q /
            groups, N_i)] each, the groups' matches one after the other (prediction indices sorted
            within each group).
        """
        batch, num_queries = outputs["pred_logits"].shape[:2]
        if num_queries % groups:
            raise ValueError(f"{num_queries} queries cannot form {groups} equal groups")
        sizes = [len(t["boxes"]) for t in targets]
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in sizes]

        # All images at once: [B*Q, sum N_i]; each image then reads only its own block of columns.
        prob = outputs["pred_logits"].flatten(0, 1).float().softmax(-1)
        out_bbox = outputs["pred_boxes"].flatten(0, 1).float()
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(out_bbox)

        # The classification cost approximates the NLL by 1 - p[class]; the constant 1 is dropped.
        cost_class = -prob[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(out_bbox, "cxcywh", "xyxy"), box_convert(tgt_bbox, "cxcywh", "xyxy")
        )
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        # Non-finite costs (degenerate boxes, a diverging model) would make the solver raise; make them
        # the most expensive choice instead, so they are matched only if nothing else can be.
        cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=1e8)
        group_size = num_queries // groups
        cost = cost.view(batch, groups, group_size, -1).cpu()

        indices = []
        for i, c in enumerate(cost.split(sizes, -1)):
            if sizes[i] == 0:
                indices.append((empty, empty))
                continue
            matches = [linear_sum_assignment(c[i, g].numpy()) for g in range(groups)]
            rows = [
                torch.as_tensor(r, dtype=torch.int64) + g * group_size for g, (r, _) in enumerate(matches)
            ]
            cols = [torch.as_tensor(c, dtype=torch.int64) for _, c in matches]
            indices.append((torch.cat(rows), torch.cat(cols)))
        return indices


def build_matcher(config) -> HungarianMatcher:
    return HungarianMatcher(config.set_cost_class, config.set_cost_bbox, config.set_cost_giou)
