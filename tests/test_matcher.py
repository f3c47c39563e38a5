"""The Hungarian matcher finds the minimum-cost assignment (checked by brute force over all permutations)."""
import itertools
import math

import pytest
import torch

from model.training.matcher import HungarianMatcher


def _giou(a, b):
    """GIoU of two cxcywh boxes, written out by hand."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _pair_cost(logit, box, label, target_box, weights=(2.0, 5.0, 2.0)):
    p = 1 / (1 + math.exp(-logit[label]))
    focal = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)
    l1 = sum(abs(x - y) for x, y in zip(box, target_box))
    return weights[0] * focal + weights[1] * l1 - weights[2] * _giou(box, target_box)


def _brute_force(logits, boxes, labels, target_boxes):
    costs = [[_pair_cost(logits[q], boxes[q], labels[t], target_boxes[t]) for t in range(len(labels))]
             for q in range(len(logits))]
    return min(sum(costs[q][t] for t, q in enumerate(perm))
               for perm in itertools.permutations(range(len(logits)), len(labels)))


def _random_boxes(generator, n):
    centers = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centers, sizes], dim=1)


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    batch, queries, classes = 2, 5, 4
    logits = torch.randn(batch, queries, classes, generator=generator) * 2
    boxes = _random_boxes(generator, batch * queries).view(batch, queries, 4)
    targets = []
    for n in (3, 1):
        targets.append({"class_labels": torch.randint(0, classes, (n,), generator=generator),
                        "boxes": _random_boxes(generator, n)})
    matches = HungarianMatcher()(logits, boxes, targets)
    for i, (rows, cols) in enumerate(matches):
        assert len(rows) == len(targets[i]["boxes"]) and len(set(rows.tolist())) == len(rows)
        chosen = sum(_pair_cost(logits[i, q].tolist(), boxes[i, q].tolist(), targets[i]["class_labels"][t].item(),
                                targets[i]["boxes"][t].tolist()) for q, t in zip(rows.tolist(), cols.tolist()))
        best = _brute_force(logits[i].tolist(), boxes[i].tolist(), targets[i]["class_labels"].tolist(),
                            targets[i]["boxes"].tolist())
        assert chosen == pytest.approx(best, rel=1e-5, abs=1e-5)


def test_obvious_assignment_and_empty_targets():
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1], [0.5, 0.5, 0.3, 0.3]]])
    logits = torch.zeros(1, 3, 2)
    targets = [{"class_labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.8, 0.8, 0.1, 0.1],
                                                                              [0.21, 0.2, 0.1, 0.1]])}]
    rows, cols = HungarianMatcher()(logits, boxes, targets)[0]
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    empty = [{"class_labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    rows, cols = HungarianMatcher()(logits, boxes, empty)[0]
    assert rows.numel() == 0 and cols.numel() == 0


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="non-zero"):
        HungarianMatcher(0, 0, 0)
    with pytest.raises(ValueError, match="targets for a batch"):
        HungarianMatcher()(torch.zeros(2, 3, 2), torch.rand(2, 3, 4), [])
