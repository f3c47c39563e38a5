"""Bounding-box utilities shared by the processor, the matcher and the losses.

Formats (all torch tensors, last dimension 4):
  cxcywh  (center x, center y, width, height): what the model predicts, normalized to the unpadded image.
  xyxy    (x0, y0, x1, y1): corners; what IoU and the post-processed detections use.
  xywh    (x0, y0, width, height): the COCO annotation format.
"""
import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    x0, y0, w, h = boxes.unbind(-1)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=-1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes, shape (...,)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes (N,4) x (M,4) -> (N,M); also returns the union, which GIoU reuses."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019, eq. 1) of xyxy boxes (N,4) x (M,4) -> (N,M).

    GIoU = IoU - (|C| - |A u B|) / |C| with C the smallest box enclosing A and B. Degenerate boxes (x1 < x0) would
    give meaningless values (and infinities in the loss), so they are rejected, as in DETR.
    """
    if not (boxes1[:, 2:] >= boxes1[:, :2]).all() or not (boxes2[:, 2:] >= boxes2[:, :2]).all():
        raise ValueError("generalized_box_iou needs xyxy boxes with x1 >= x0 and y1 >= y0")
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def masks_to_boxes(masks: Tensor) -> Tensor:
    """xyxy boxes around binary masks (N,H,W) -> (N,4); empty masks give zeros.

    As in DETR (and the HF panoptic annotations), x1/y1 are the last covered pixel index, not one past it, so a
    one-pixel mask has zero width. COCO `bbox` fields (which count pixels) are computed in `model.coco_format`.
    """
    if masks.numel() == 0:
        return torch.zeros((masks.shape[0], 4), dtype=torch.float32, device=masks.device)
    masks = masks.bool()
    height, width = masks.shape[-2:]
    ys = torch.arange(height, dtype=torch.float32, device=masks.device)
    xs = torch.arange(width, dtype=torch.float32, device=masks.device)
    rows = masks.any(dim=2)  # (N,H): which rows each mask touches
    cols = masks.any(dim=1)  # (N,W)
    big = float(max(height, width))
    y0 = torch.where(rows, ys, big).amin(dim=1)
    y1 = torch.where(rows, ys, -1.0).amax(dim=1)
    x0 = torch.where(cols, xs, big).amin(dim=1)
    x1 = torch.where(cols, xs, -1.0).amax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    empty = ~rows.any(dim=1)
    return torch.where(empty[:, None], torch.zeros_like(boxes), boxes)
