import pytest
import torch
import torchvision.ops

from model import box_ops


def random_xyxy(n: int, generator: torch.Generator) -> torch.Tensor:
    corners = torch.rand(n, 2, 2, generator=generator) * 100
    return torch.cat([corners.amin(dim=1), corners.amax(dim=1)], dim=1)


def test_format_round_trips():
    g = torch.Generator().manual_seed(0)
    boxes = random_xyxy(16, g)
    torch.testing.assert_close(box_ops.box_cxcywh_to_xyxy(box_ops.box_xyxy_to_cxcywh(boxes)), boxes)
    torch.testing.assert_close(box_ops.box_xywh_to_xyxy(box_ops.box_xyxy_to_xywh(boxes)), boxes)
    cxcywh = torch.tensor([[0.5, 0.5, 1.0, 0.5]])
    assert box_ops.box_cxcywh_to_xyxy(cxcywh).tolist() == [[0.0, 0.25, 1.0, 0.75]]
    assert box_ops.box_xywh_to_xyxy(torch.tensor([[10.0, 20.0, 5.0, 6.0]])).tolist() == [[10.0, 20.0, 15.0, 26.0]]


def test_area_iou_giou_against_torchvision():
    g = torch.Generator().manual_seed(1)
    a, b = random_xyxy(7, g), random_xyxy(5, g)
    torch.testing.assert_close(box_ops.box_area(a), torchvision.ops.box_area(a))
    iou, _ = box_ops.box_iou(a, b)
    torch.testing.assert_close(iou, torchvision.ops.box_iou(a, b))
    torch.testing.assert_close(box_ops.generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b))


def test_giou_known_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    same = box_ops.generalized_box_iou(a, a)
    assert same.item() == pytest.approx(1.0)
    # Disjoint unit squares 1 apart: IoU 0, enclosing box 3x1, union 2 -> GIoU = -(3-2)/3.
    left, right = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    assert box_ops.generalized_box_iou(left, right).item() == pytest.approx(-1 / 3)


def test_giou_rejects_degenerate_boxes():
    with pytest.raises(ValueError, match="x1 >= x0"):
        box_ops.generalized_box_iou(torch.tensor([[2.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


def test_masks_to_boxes():
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 7, 11] = True
    boxes = box_ops.masks_to_boxes(masks)
    assert boxes.tolist() == [[3.0, 2.0, 8.0, 4.0], [11.0, 7.0, 11.0, 7.0], [0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(boxes[:2], torchvision.ops.masks_to_boxes(masks[:2]))
    assert box_ops.masks_to_boxes(torch.zeros(0, 4, 4)).shape == (0, 4)
