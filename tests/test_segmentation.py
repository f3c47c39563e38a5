"""ConditionalDetrForSegmentation against `transformers` (random weights it created), pruned vs full inference,
checkpoint round trips and mask-head training."""
from __future__ import annotations

import pytest
import torch
from hf_reference import SMALL, padded_batch, randomize_, save_hf_v4, save_hf_v5
from transformers import ConditionalDetrConfig as HFConfig
from transformers import ConditionalDetrForObjectDetection as HFDetection
from transformers import ConditionalDetrForSegmentation as HFSegmentation

from model.conditional_detr import ConditionalDetrForObjectDetection
from model.config import ConditionalDetrConfig
from model.post_processing import post_process_panoptic_segmentation
from model.segmentation import ConditionalDetrForSegmentation

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hf_model() -> HFSegmentation:
    torch.manual_seed(0)
    model = HFSegmentation(HFConfig(**SMALL)).eval()
    randomize_(model, seed=0)  # also GroupNorm affine and the mask head biases
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    return save_hf_v4(hf_model, tmp_path_factory.mktemp("hf-seg-v4"))


@pytest.fixture(scope="module")
def model(hf_dir) -> ConditionalDetrForSegmentation:
    return ConditionalDetrForSegmentation.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def batch():
    return padded_batch()  # 96x128 and 128x96 images padded to 128x128


@pytest.fixture(scope="module")
def full_output(model, batch):
    with torch.no_grad():
        return model(*batch)


def test_logits_and_masks_match_transformers(hf_model, full_output, batch):
    with torch.no_grad():
        reference = hf_model(pixel_values=batch[0], pixel_mask=batch[1])
    assert full_output.pred_masks.shape == reference.pred_masks.shape == (2, SMALL["num_queries"], 32, 32)
    assert full_output.mask_query_indices is None
    torch.testing.assert_close(full_output.logits, reference.logits, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(full_output.pred_masks, reference.pred_masks, atol=TOLERANCE, rtol=0)
    # docs/reference-compatibility.md, Q3: transformers' segmentation boxes lack the reference-point offset, ours
    # keep it ...
    assert (full_output.pred_boxes - reference.pred_boxes).abs().max() > 1e-2
    # ... so they are those of transformers' detection model with the same detector weights.
    hf_detector = HFDetection(hf_model.config).eval()
    hf_detector.load_state_dict(hf_model.conditional_detr.state_dict())
    with torch.no_grad():
        detection = hf_detector(pixel_values=batch[0], pixel_mask=batch[1])
    torch.testing.assert_close(full_output.pred_boxes, detection.pred_boxes, atol=TOLERANCE, rtol=0)


def test_narrow_resnet18_model_matches_transformers(batch, tmp_path):
    # The shape of the project's small models: other FPN widths (64/128/256) and a narrower head (136 -> 8).
    torch.manual_seed(1)
    reference = HFSegmentation(HFConfig(**{**SMALL, "backbone": "resnet18", "d_model": 128})).eval()
    randomize_(reference, seed=1)
    ours = ConditionalDetrForSegmentation.from_pretrained(save_hf_v4(reference, tmp_path))
    with torch.no_grad():
        expected, output = reference(pixel_values=batch[0], pixel_mask=batch[1]), ours(*batch)
    torch.testing.assert_close(output.logits, expected.logits, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(output.pred_masks, expected.pred_masks, atol=TOLERANCE, rtol=0)


def test_detection_outputs_equal_the_detection_model(model, full_output, batch):
    detector = ConditionalDetrForObjectDetection(model.config).eval()
    detector.load_state_dict(model.conditional_detr.state_dict())
    with torch.no_grad():
        detection = detector(*batch)
    assert torch.equal(full_output.logits, detection.logits)
    assert torch.equal(full_output.pred_boxes, detection.pred_boxes)
    assert torch.equal(full_output.last_hidden_state, detection.last_hidden_state)
    segmenter = ConditionalDetrForSegmentation.from_detector(detector).eval()
    with torch.no_grad():
        assert torch.equal(segmenter(*batch, top_k=1).pred_boxes, detection.pred_boxes)


def test_pruned_masks_are_the_full_masks_of_surviving_queries(model, full_output, batch):
    scores = full_output.logits.sigmoid().amax(-1)
    # The threshold splits image 0's queries; image 1's all fall on one side, which exercises an empty image too.
    threshold = scores[0].median().item()
    with torch.no_grad():
        pruned = model(*batch, score_threshold=threshold, mask_chunk_size=3)
    assert torch.equal(pruned.logits, full_output.logits)
    for b, queries in enumerate(pruned.mask_query_indices):
        expected = torch.nonzero(scores[b] > threshold)[:, 0]
        assert torch.equal(queries, expected)
        torch.testing.assert_close(pruned.pred_masks[b, : len(queries)], full_output.pred_masks[b, queries],
                                   atol=1e-5, rtol=0)
        assert (pruned.pred_masks[b, len(queries):].sigmoid() == 0).all()  # padding rows: probability 0
    assert 0 < len(pruned.mask_query_indices[0]) < SMALL["num_queries"]

    sizes = [(96, 128), (128, 96)]  # the images' sizes inside the padded batch
    full_result = post_process_panoptic_segmentation(full_output, threshold=threshold, target_sizes=sizes,
                                                     processed_sizes=sizes)
    pruned_result = post_process_panoptic_segmentation(pruned, threshold=threshold, target_sizes=sizes,
                                                       processed_sizes=sizes)
    assert any(result["segments_info"] for result in full_result)
    for full, pruned_image in zip(full_result, pruned_result):
        assert torch.equal(full["segmentation"], pruned_image["segmentation"])
        assert full["segments_info"] == pruned_image["segments_info"]


def test_top_k_keeps_the_best_queries(model, full_output, batch):
    with torch.no_grad():
        pruned = model(*batch, top_k=3)
    for b, queries in enumerate(pruned.mask_query_indices):
        best = full_output.logits[b].sigmoid().amax(-1).topk(3).indices.sort().values
        assert torch.equal(queries, best)
        torch.testing.assert_close(pruned.pred_masks[b], full_output.pred_masks[b, queries], atol=1e-5, rtol=0)


def test_save_pretrained_round_trip_and_transformers_loads_it(model, full_output, batch, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = ConditionalDetrForSegmentation.from_pretrained(tmp_path)
    with torch.no_grad():
        again = reloaded(*batch)
        reference = HFSegmentation.from_pretrained(tmp_path).eval()(pixel_values=batch[0], pixel_mask=batch[1])
    assert torch.equal(again.pred_masks, full_output.pred_masks)
    torch.testing.assert_close(reference.logits, full_output.logits, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(reference.pred_masks, full_output.pred_masks, atol=TOLERANCE, rtol=0)


def test_loads_the_transformers_v5_key_layout(hf_model, full_output, batch, tmp_path):
    names = list(hf_model.state_dict())
    assert "mask_head.fpn_stages.2.refine.conv.weight" in names and "bbox_attention.q_proj.weight" in names
    loaded = ConditionalDetrForSegmentation.from_pretrained(save_hf_v5(hf_model, tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(*batch).pred_masks, full_output.pred_masks)


def _tiny_config(**overrides) -> ConditionalDetrConfig:
    small = dict(backbone="resnet18", d_model=128, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64,
                 decoder_ffn_dim=64, num_queries=6, num_labels=3)
    return ConditionalDetrConfig(**{**small, **overrides})


def _rectangles_labels(height: int, width: int) -> list[dict[str, torch.Tensor]]:
    """One image with two rectangles: masks at the input size, boxes normalized cxcywh."""
    masks = torch.zeros(2, height, width)
    masks[0, 8:40, 8:56] = 1
    masks[1, 30:60, 40:60] = 1
    boxes = torch.tensor([[32 / width, 24 / height, 48 / width, 32 / height],
                          [50 / width, 45 / height, 20 / width, 30 / height]])
    return [{"class_labels": torch.tensor([1, 2]), "boxes": boxes, "masks": masks}]


def test_frozen_detector_trains_only_the_mask_head():
    torch.manual_seed(0)
    detector = ConditionalDetrForObjectDetection(_tiny_config())
    model = ConditionalDetrForSegmentation.from_detector(detector)
    model.freeze_detector()
    model.eval()  # no dropout: the frozen detector's outputs, hence the matched queries, stay the same each step
    pixel_values, labels = torch.randn(1, 3, 64, 64), _rectangles_labels(64, 64)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(not p.requires_grad for p in model.conditional_detr.parameters())
    optimizer = torch.optim.Adam(trainable, lr=3e-3)
    losses = []
    for _ in range(8):
        output = model(pixel_values, labels=labels)
        assert set(output.loss_dict) == {"loss_mask", "loss_dice"}
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert losses[-1] < 0.85 * losses[0]
    assert all(p.grad is None for p in model.conditional_detr.parameters())
    assert model.mask_head.out_lay.weight.grad.abs().sum() > 0
    # Masks are computed only for the two matched queries.
    assert [len(q) for q in output.mask_query_indices] == [2] and output.pred_masks.shape == (1, 2, 16, 16)
    # The detector is unchanged: detection outputs still equal the original detector's.
    with torch.no_grad():
        assert torch.equal(model(pixel_values, top_k=1).logits, detector.eval()(pixel_values).logits)


def test_joint_training_includes_detection_losses():
    torch.manual_seed(0)
    model = ConditionalDetrForSegmentation(_tiny_config())
    output = model(torch.randn(1, 3, 64, 64), labels=_rectangles_labels(64, 64))
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"} <= set(output.loss_dict)
    output.loss.backward()
    assert model.conditional_detr.class_labels_classifier.weight.grad.abs().sum() > 0


def test_bad_inputs_are_named():
    model = ConditionalDetrForSegmentation(_tiny_config())
    pixel_values = torch.randn(1, 3, 64, 64)
    labels = [{k: v for k, v in _rectangles_labels(64, 64)[0].items() if k != "masks"}]
    with pytest.raises(ValueError, match="masks"):
        model(pixel_values, labels=labels)
    with pytest.raises(ValueError, match="mask_chunk_size"):
        model(pixel_values, mask_chunk_size=0)
    with pytest.raises(ValueError, match="top_k"):
        model(pixel_values, top_k=0)
    with pytest.raises(ValueError, match="d_model"):
        ConditionalDetrForSegmentation(_tiny_config(d_model=64, encoder_attention_heads=8))
