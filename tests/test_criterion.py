"""SetCriterion losses on hand-computed cases."""
import math

import pytest
import torch

from model.config import ConditionalDetrConfig
from model.training.criterion import SetCriterion, dice_loss, sigmoid_focal_loss

# The original recipe's weights, which ConditionalDetrConfig's defaults describe.
WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_mask": 1.0, "loss_dice": 1.0}


def _criterion(num_labels, **kwargs):
    return SetCriterion(ConditionalDetrConfig(num_labels=num_labels), **kwargs)


def _focal(logit, target, alpha=0.25):
    p = 1 / (1 + math.exp(-logit))
    p_t = p if target else 1 - p
    return (alpha if target else 1 - alpha) * (1 - p_t) ** 2 * -math.log(p_t)


def test_focal_loss_by_hand():
    logits = torch.tensor([[[2.0, -1.0], [0.5, 0.0]]])  # (1, 2 queries, 2 classes)
    targets = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    expected = sum(_focal(x, t) for x, t in zip([2.0, -1.0, 0.5, 0.0], [1, 0, 0, 0])) / 2  # mean over queries
    assert sigmoid_focal_loss(logits, targets, num_boxes=1).item() == pytest.approx(expected, rel=1e-6)


def test_dice_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0]])  # p = 0.5 everywhere
    targets = torch.tensor([[1.0, 0.0]])
    assert dice_loss(logits, targets, 1).item() == pytest.approx(1 - (2 * 0.5 + 1) / (1.0 + 1 + 1))
    perfect = torch.tensor([[50.0, -50.0]])
    assert dice_loss(perfect, targets, 1).item() == pytest.approx(0.0, abs=1e-6)


def test_detection_losses_by_hand():
    criterion = _criterion(3)
    logits = torch.tensor([[[3.0, -2.0, 0.0], [-1.0, 1.0, -3.0]]], requires_grad=True)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]], requires_grad=True)
    targets = [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    total, terms = criterion({"logits": logits, "pred_boxes": boxes}, targets)
    # query 0 matches the object (same class, overlapping box)
    ce = sum(_focal(x, t) for x, t in zip([3.0, -2.0, 0.0, -1.0, 1.0, -3.0], [1, 0, 0, 0, 0, 0])) / 2 * 2
    assert terms["loss_ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["loss_bbox"].item() == pytest.approx(0.4, rel=1e-6)
    assert terms["loss_giou"].item() == pytest.approx(1 - 0.04 / 0.16, rel=1e-6)  # hull = target box
    assert total.item() == pytest.approx(2 * ce + 5 * 0.4 + 2 * 0.75, rel=1e-6)
    total.backward()
    assert logits.grad.abs().sum() > 0 and boxes.grad[0, 0].abs().sum() > 0
    assert boxes.grad[0, 1].abs().sum() == 0  # the unmatched query's box gets no gradient


def test_auxiliary_outputs_are_matched_independently():
    criterion = _criterion(2)
    target = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]])}]
    good = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]])
    swapped = good.flip(1)  # in the aux layer the matching query is the other one
    logits = torch.zeros(1, 2, 2)
    outputs = {"logits": logits, "pred_boxes": good,
               "auxiliary_outputs": [{"logits": logits, "pred_boxes": swapped}]}
    total, terms = criterion(outputs, target)
    assert terms["loss_bbox_0"].item() == pytest.approx(0.0, abs=1e-7)
    assert terms["loss_giou_0"].item() == pytest.approx(0.0, abs=1e-6)
    assert set(terms) == {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    assert total.item() == pytest.approx(sum(WEIGHTS[k.removesuffix("_0")] * v.item() for k, v in terms.items()))


def test_mask_losses_upsample_to_target_size():
    criterion = _criterion(2, losses=("labels", "boxes", "masks"))
    target_mask = torch.zeros(1, 8, 8)
    target_mask[0, :4] = 1  # top half
    pred = torch.full((1, 2, 2, 2), -20.0)
    pred[0, 0, 0] = 20.0  # query 0 predicts the top half at 1/4 resolution
    outputs = {"logits": torch.tensor([[[0.0, 4.0], [0.0, -4.0]]]),
               "pred_boxes": torch.tensor([[[0.5, 0.25, 1.0, 0.5], [0.5, 0.75, 1.0, 0.5]]]), "pred_masks": pred}
    targets = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.25, 1.0, 0.5]]),
                "masks": target_mask}]
    _, terms = criterion(outputs, targets)
    assert terms["loss_dice"].item() < 1e-2 and terms["loss_mask"].item() < 1e-2  # boundary rows are blurred
    pred[0, 0] = -pred[0, 0]  # now the mask is exactly wrong
    _, terms = criterion(outputs, targets)
    assert terms["loss_dice"].item() > 0.95 and terms["loss_mask"].item() > 1.0


def test_original_weights_and_bad_input():
    criterion = _criterion(4)
    # loss_ce weight 2 as in the original, not 1 as in transformers (docs/reference-compatibility.md, Q4)
    assert criterion.weight_dict == WEIGHTS
    with pytest.raises(ValueError, match="class_labels must lie in"):
        criterion({"logits": torch.zeros(1, 2, 4), "pred_boxes": torch.rand(1, 2, 4)},
                  [{"class_labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}])
    with pytest.raises(ValueError, match="unknown loss terms"):
        _criterion(4, losses=("labels", "cardinality"))


def test_detection_model_loss_goes_through_the_criterion():
    from model.conditional_detr import ConditionalDetrForObjectDetection

    torch.manual_seed(0)
    config = ConditionalDetrConfig(backbone="resnet18", frozen_batch_norm=False, d_model=32, encoder_layers=1,
                                   decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5,
                                   encoder_attention_heads=2, decoder_attention_heads=2, num_labels=3,
                                   auxiliary_loss=True)
    model = ConditionalDetrForObjectDetection(config)
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}]
    output = model(torch.randn(1, 3, 64, 64), labels=labels)
    loss, terms = SetCriterion(config)(output, labels)
    assert set(output.loss_dict) == set(terms) == {"loss_ce", "loss_bbox", "loss_giou",
                                                   "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    assert output.loss.item() == pytest.approx(loss.item(), rel=1e-6)
