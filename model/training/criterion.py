"""Set prediction loss of Conditional DETR: Hungarian matching, then focal / L1 / GIoU (+ mask focal / dice) losses.

Follows the original Atten4Vis code (and Deformable DETR, whose loss Conditional DETR reuses):
- classification: sigmoid focal loss on one-hot targets (unmatched queries have all-zero targets, there is no
  "no-object" logit), `loss.mean(1).sum() / num_boxes * Q`, i.e. summed over classes, averaged over queries then
  scaled by Q, normalized by the number of objects;
- boxes: L1 on normalized cxcywh and 1 - GIoU, summed over matched pairs / num_boxes;
- masks (segmentation head): sigmoid focal and dice on the matched masks, upsampled to the target mask size;
- auxiliary losses: the same losses on every intermediate decoder output, each matched independently.

Weights follow the ORIGINAL recipe: `loss_ce` gets `cls_loss_coefficient` (2). `transformers` ignores that config
field and hard-codes 1 (docs/reference-compatibility.md, Q4); we honour it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from model.training.matcher import HungarianMatcher


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017, eq. 5) on logits (N, M, ...) vs binary targets: mean over dim 1, sum / num_boxes.

    alpha weighs positives (1 - alpha negatives); alpha < 0 disables the weighting.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_boxes: float) -> torch.Tensor:
    """1 - Dice coefficient (V-Net, Milletari et al. 2016) per mask, with +1 smoothing; logits/targets (N, HW)."""
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(1)
    denominator = prob.sum(1) + targets.sum(1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


class SetCriterion(nn.Module):
    """Matches predictions to targets and computes the weighted DETR set loss described by a config.

    `losses` picks the terms: "labels" (loss_ce), "boxes" (loss_bbox, loss_giou), "masks" (loss_mask, loss_dice).
    Weights and matching costs come from the config's `*_loss_coefficient` / `*_cost` fields; auxiliary terms reuse
    the weights under a `_{i}` suffix.
    """

    def __init__(self, config, losses: tuple[str, ...] = ("labels", "boxes")):
        super().__init__()
        unknown = set(losses) - {"labels", "boxes", "masks"}
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; choose from labels, boxes, masks")
        self.matcher = HungarianMatcher(config.class_cost, config.bbox_cost, config.giou_cost, config.focal_alpha)
        self.num_labels, self.focal_alpha, self.losses = config.num_labels, config.focal_alpha, losses
        self.weight_dict = {"loss_ce": config.cls_loss_coefficient, "loss_bbox": config.bbox_loss_coefficient,
                            "loss_giou": config.giou_loss_coefficient, "loss_mask": config.mask_loss_coefficient,
                            "loss_dice": config.dice_loss_coefficient}

    def loss_labels(self, outputs, targets, matches, num_boxes):
        logits = outputs["logits"]
        onehot = torch.zeros_like(logits)
        for i, (queries, objects) in enumerate(matches):
            onehot[i, queries, targets[i]["class_labels"][objects]] = 1
        loss = sigmoid_focal_loss(logits, onehot, num_boxes, alpha=self.focal_alpha) * logits.shape[1]
        return {"loss_ce": loss}

    def loss_boxes(self, outputs, targets, matches, num_boxes):
        pred = torch.cat([outputs["pred_boxes"][i, q] for i, (q, _) in enumerate(matches)])
        true = torch.cat([t["boxes"][o] for t, (_, o) in zip(targets, matches)]).to(pred.dtype)
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(true)))
        return {"loss_bbox": F.l1_loss(pred, true, reduction="sum") / num_boxes,
                "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_masks(self, outputs, targets, matches, num_boxes):
        """pred_masks (B, Q, h, w) logits; target `masks` (N, H, W) per image, all images padded to the same H, W."""
        pred_masks = outputs["pred_masks"]
        true = torch.cat([t["masks"][o] for t, (_, o) in zip(targets, matches)]).to(pred_masks.dtype)
        pred = torch.cat([pred_masks[i, q] for i, (q, _) in enumerate(matches)])
        if len(pred) == 0:
            return {"loss_mask": pred_masks.sum() * 0, "loss_dice": pred_masks.sum() * 0}
        # Upsample the 1/4-resolution logits to the target size, as DETR does (bilinear, align_corners=False).
        pred = F.interpolate(pred[:, None], size=true.shape[-2:], mode="bilinear", align_corners=False)
        pred, true = pred.flatten(1), true.flatten(1)
        return {"loss_mask": sigmoid_focal_loss(pred, true, num_boxes, alpha=self.focal_alpha),
                "loss_dice": dice_loss(pred, true, num_boxes)}

    def _terms(self, outputs, targets, num_boxes, losses) -> dict[str, torch.Tensor]:
        matches = self.matcher(outputs["logits"], outputs["pred_boxes"], targets)
        terms = {}
        for name in losses:
            terms.update(getattr(self, f"loss_{name}")(outputs, targets, matches, num_boxes))
        return terms

    def forward(self, outputs, targets: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict]:
        """Return (weighted total loss, {term name: unweighted value}).

        outputs: a dict or a model output dataclass with `logits` (B, Q, C), `pred_boxes` (B, Q, 4) normalized
        cxcywh, optional `pred_masks` (B, Q, h, w), optional `auxiliary_outputs` (list of dicts with logits /
        pred_boxes for the intermediate decoder layers).
        targets: per image `class_labels` (N,), `boxes` (N, 4) normalized cxcywh, `masks` (N, H, W) for "masks".
        """
        if not isinstance(outputs, dict):
            outputs = vars(outputs)  # the model's output dataclass: same fields, attribute access
        for target in targets:
            labels = target["class_labels"]
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_labels):
                raise ValueError(f"class_labels must lie in [0, {self.num_labels}), got {labels.tolist()}")
        num_boxes = max(float(sum(len(t["class_labels"]) for t in targets)), 1.0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            count = torch.tensor(num_boxes, device=outputs["logits"].device)
            torch.distributed.all_reduce(count)
            num_boxes = max(count.item() / torch.distributed.get_world_size(), 1.0)

        terms = self._terms(outputs, targets, num_boxes, self.losses)
        total = sum(self.weight_dict[k] * v for k, v in terms.items())
        # Intermediate layers have no masks (as in DETR): only their class and box terms are supervised.
        aux_losses = tuple(name for name in self.losses if name != "masks")
        aux_outputs = (outputs.get("auxiliary_outputs") or []) if aux_losses else []
        for i, aux in enumerate(aux_outputs):
            for k, v in self._terms(aux, targets, num_boxes, aux_losses).items():
                terms[f"{k}_{i}"] = v
                total = total + self.weight_dict[k] * v
        return total, terms
