"""Hungarian matching between predicted queries and ground-truth objects (DETR §3.1, Conditional DETR §3.4).

The cost of assigning query i to object j is `class_cost * focal(i, j) + bbox_cost * L1(i, j) + giou_cost *
(-GIoU(i, j))`. The class term is the focal-loss difference used by Deformable / Conditional DETR with a sigmoid
classifier (no "no-object" logit): `alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))` at the object's
class. The original code and `transformers` hard-code alpha=0.25, gamma=2 here (docs/reference-compatibility.md,
Q4); they are arguments with those defaults; the criterion passes the config's `focal_alpha`.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from model.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment per image minimizing the weighted matching cost (scipy `linear_sum_assignment`)."""

    def __init__(self, class_cost: float = 2.0, bbox_cost: float = 5.0, giou_cost: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        if class_cost == 0 and bbox_cost == 0 and giou_cost == 0:
            raise ValueError("at least one matcher cost (class_cost, bbox_cost, giou_cost) must be non-zero")
        self.class_cost, self.bbox_cost, self.giou_cost = class_cost, bbox_cost, giou_cost
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, pred_boxes: torch.Tensor,
                targets: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match a batch.

        logits (B, Q, C) classification logits; pred_boxes (B, Q, 4) normalized cxcywh; targets: one dict per
        image with `class_labels` (N,) and `boxes` (N, 4) normalized cxcywh. Returns per image (query_indices,
        target_indices), int64 tensors of length min(Q, N), sorted by query index.
        """
        batch_size, num_queries = logits.shape[:2]
        if len(targets) != batch_size:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch_size} predictions")
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]
        prob = logits.flatten(0, 1).float().sigmoid()  # (B*Q, C)
        boxes = pred_boxes.flatten(0, 1).float()
        target_labels = torch.cat([t["class_labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets]).float()

        p = prob[:, target_labels]  # (B*Q, sum N): probability of each object's class
        positive = self.alpha * (1 - p) ** self.gamma * -(p + 1e-8).log()
        negative = (1 - self.alpha) * p**self.gamma * -(1 - p + 1e-8).log()
        cost = (self.class_cost * (positive - negative)
                + self.bbox_cost * torch.cdist(boxes, target_boxes, p=1)
                - self.giou_cost * generalized_box_iou(box_cxcywh_to_xyxy(boxes),
                                                       box_cxcywh_to_xyxy(target_boxes)))
        # Degenerate predicted boxes give NaN GIoU; make them unattractive instead of crashing scipy.
        cost = torch.nan_to_num(cost, nan=torch.finfo(cost.dtype).max, posinf=torch.finfo(cost.dtype).max)
        cost = cost.view(batch_size, num_queries, -1).cpu()

        matches = []
        for i, block in enumerate(cost.split(sizes, dim=-1)):
            rows, cols = linear_sum_assignment(block[i].numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return matches
