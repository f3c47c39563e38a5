"""Post-processing: object detection identical to `transformers`; segmentation on hand-built outputs whose right
answer is known; COCO panoptic PNG and RLE round trips."""
import io
import json
import os
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers.models.conditional_detr.image_processing_pil_conditional_detr import (  # noqa: E402
    ConditionalDetrImageProcessorPil as HFPilProcessor,
)

from model import ConditionalDetrImageProcessor  # noqa: E402
from model.coco_format import (  # noqa: E402
    decode_id_png,
    mask_to_rle,
    panoptic_from_coco,
    panoptic_to_coco,
    rle_to_mask,
)

processor = ConditionalDetrImageProcessor()


# ------------------------------------------------------------------ object detection
@pytest.mark.parametrize("target_sizes", [None, [(480, 640), (720, 1280)], torch.tensor([[480, 640], [720, 1280]])])
def test_object_detection_identical_to_transformers(target_sizes):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 300, 91, generator=g) * 3 - 4
    boxes = torch.rand(2, 300, 4, generator=g)
    ours = processor.post_process_object_detection({"logits": logits, "pred_boxes": boxes}, threshold=0.3,
                                                   target_sizes=target_sizes)
    reference = HFPilProcessor().post_process_object_detection(SimpleNamespace(logits=logits, pred_boxes=boxes),
                                                               threshold=0.3, target_sizes=target_sizes)
    assert len(ours) == 2 and sum(len(r["scores"]) for r in ours) > 20
    for mine, theirs in zip(ours, reference):
        assert mine.keys() - {"query_indices"} == theirs.keys()  # query_indices is our one added key
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], atol=0, rtol=0)


def test_object_detection_top_k_and_strict_threshold():
    logits = torch.full((1, 2, 3), -10.0)
    logits[0, 1, 2] = 0.0  # probability exactly 0.5: not kept with threshold 0.5 (strict >)
    logits[0, 0, 1] = 2.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.4, 0.4]]])
    (result,) = processor.post_process_object_detection({"logits": logits, "pred_boxes": boxes}, top_k=1000,
                                                        target_sizes=[(100, 200)])
    assert result["labels"].tolist() == [1]
    # not clipped: the second query's box would start at negative coordinates
    torch.testing.assert_close(result["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0]]))
    assert len(processor.post_process_object_detection({"logits": logits, "pred_boxes": boxes}, 0.4)[0]["labels"]) == 2


def test_object_detection_target_sizes_must_match_batch():
    outputs = {"logits": torch.zeros(2, 3, 4), "pred_boxes": torch.rand(2, 3, 4)}
    with pytest.raises(ValueError, match="target_sizes has 1 entries"):
        processor.post_process_object_detection(outputs, target_sizes=[(10, 10)])


# ------------------------------------------------------------------ segmentation on known outputs
H, W, C = 20, 30, 4
A = (slice(2, 8), slice(3, 12))      # query 0, class 1
# query 1, class 3 = the last class (dropped by transformers: docs/reference-compatibility.md, Q8)
B = (slice(10, 18), slice(15, 28))


def region(*slices) -> torch.Tensor:
    inside = torch.zeros(H, W, dtype=torch.bool)
    for rows, cols in slices:
        inside[rows, cols] = True
    return inside


def mask_logits(inside: torch.Tensor) -> torch.Tensor:
    return torch.where(inside, 10.0, -10.0)


def class_logits(label: int | None, logit: float) -> torch.Tensor:
    row = torch.full((C,), -8.0)
    if label is not None:
        row[label] = logit
    return row


def known_outputs(split_stuff: bool = False) -> dict:
    """Queries: 0 = thing in A, 1 = thing (last class) in B, 2 = stuff (class 0) everywhere else (or its left half,
    with 5 the right half), 3 = low score covering everything, 4 = same mask as 0 but a lower score (wins nothing)."""
    rest = ~region(A, B)
    left = rest & (torch.arange(W) < 20)
    queries = [(1, 6.0, region(A)), (3, 5.0, region(B)), (0, 4.0, left if split_stuff else rest),
               (None, 0.0, torch.ones(H, W, dtype=torch.bool)), (2, 3.0, region(A))]
    if split_stuff:
        queries.append((0, 3.5, rest & ~left))
    logits = torch.stack([class_logits(label, logit) for label, logit, _ in queries])[None]
    masks = torch.stack([mask_logits(inside) for _, _, inside in queries])[None]
    return {"logits": logits, "pred_boxes": torch.rand(1, len(queries), 4), "pred_masks": masks}


def expected_map() -> torch.Tensor:
    segmentation = torch.full((H, W), 3, dtype=torch.int32)
    segmentation[A] = 1
    segmentation[B] = 2
    return segmentation


def test_panoptic_segments_of_known_rectangles():
    (result,) = processor.post_process_panoptic_segmentation(known_outputs())
    assert torch.equal(result["segmentation"], expected_map())
    sigmoid = lambda x: round(torch.sigmoid(torch.tensor(x)).item(), 6)  # noqa: E731
    assert result["segments_info"] == [
        {"id": 1, "label_id": 1, "was_fused": False, "score": sigmoid(6.0)},
        {"id": 2, "label_id": 3, "was_fused": False, "score": sigmoid(5.0)},
        {"id": 3, "label_id": 0, "was_fused": False, "score": sigmoid(4.0)},
    ]


def test_panoptic_target_size_upsamples_the_map():
    (result,) = processor.post_process_panoptic_segmentation(known_outputs(), target_sizes=[(2 * H, 2 * W)])
    expected = expected_map().repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(result["segmentation"], expected)


def test_panoptic_fuses_stuff_classes():
    (split,) = processor.post_process_panoptic_segmentation(known_outputs(split_stuff=True))
    assert [s["label_id"] for s in split["segments_info"]] == [1, 3, 0, 0]
    (fused,) = processor.post_process_panoptic_segmentation(known_outputs(split_stuff=True), label_ids_to_fuse={0})
    assert torch.equal(fused["segmentation"], expected_map())
    stuff = fused["segments_info"][2]
    assert len(fused["segments_info"]) == 3 and stuff["was_fused"] and stuff["id"] == 3
    assert stuff["score"] == round(torch.sigmoid(torch.tensor(4.0)).item(), 6)  # the best of the fused queries


def pruned_outputs(full: dict) -> dict:
    """Query 3 cannot pass the threshold, so the pruned model computes no mask for it; one row of padding."""
    kept = [0, 1, 2, 4]
    padding = torch.full((1, H, W), -100.0)
    return {**full, "pred_masks": torch.cat([full["pred_masks"][0, kept], padding])[None],
            "mask_query_indices": [torch.tensor(kept)]}


def test_pruned_masks_give_the_same_segments():
    full = known_outputs()
    pruned = pruned_outputs(full)
    (expected,) = processor.post_process_panoptic_segmentation(full)
    (result,) = processor.post_process_panoptic_segmentation(pruned)
    assert torch.equal(result["segmentation"], expected["segmentation"])
    assert result["segments_info"] == expected["segments_info"]
    torch.testing.assert_close(processor.post_process_semantic_segmentation(pruned)[0],
                               processor.post_process_semantic_segmentation(full)[0])
    with pytest.raises(ValueError, match="mask_query_indices must be in"):
        processor.post_process_panoptic_segmentation({**pruned, "mask_query_indices": [torch.tensor([0, 9])]})


def test_processed_sizes_crop_the_padding():
    """Image 1 was padded: only the top half of its canvas is image. Its masks must be cropped before resizing."""
    top_left = torch.zeros(H, W, dtype=torch.bool)
    top_left[:11, :15] = True  # one row into the padding, so the crop's last row is not a boundary
    masks = torch.stack([mask_logits(top_left), mask_logits(~top_left)])
    outputs = {"logits": torch.stack([class_logits(1, 6.0), class_logits(0, 4.0)])[None].repeat(2, 1, 1),
               "pred_masks": masks[None].repeat(2, 1, 1, 1), "pred_boxes": torch.rand(2, 2, 4)}
    results = processor.post_process_panoptic_segmentation(outputs, processed_sizes=[(80, 120), (40, 120)],
                                                           target_sizes=[(80, 120), (40, 120)])
    expected = torch.full((40, 120), 2, dtype=torch.int32)
    expected[:, :60] = 1
    assert torch.equal(results[1]["segmentation"], expected)
    (uncropped,) = processor.post_process_panoptic_segmentation({k: v[1:] for k, v in outputs.items()},
                                                                target_sizes=[(40, 120)])
    # Without the crop the mask's padding rows are squashed into the image: query 0 covers about half as much.
    assert (uncropped["segmentation"] == 1).sum() < 0.6 * (expected == 1).sum()
    with pytest.raises(ValueError, match="processed_sizes has 1 entries"):
        processor.post_process_panoptic_segmentation(outputs, processed_sizes=[(80, 120)])


def test_instance_segmentation_with_coco_rle():
    (result,) = processor.post_process_instance_segmentation(known_outputs(), return_coco_annotation=True)
    assert [s["label_id"] for s in result["segments_info"]] == [1, 3, 0]
    assert len(result["segmentation"]) == 3
    json.dumps(result["segmentation"])  # counts are ASCII strings
    for rle, label in zip(result["segmentation"], [1, 2, 3]):
        assert np.array_equal(rle_to_mask(rle), (expected_map() == label).numpy())


def test_semantic_segmentation_uses_all_classes():
    (semantic,) = processor.post_process_semantic_segmentation(known_outputs())
    expected = torch.zeros(H, W, dtype=torch.int64)
    expected[A] = 1
    expected[B] = 3  # the last class survives (docs/reference-compatibility.md, Q8)
    assert torch.equal(semantic, expected)
    (resized,) = processor.post_process_semantic_segmentation(known_outputs(), target_sizes=[(2 * H, 2 * W)])
    assert torch.equal(resized, expected.repeat_interleave(2, 0).repeat_interleave(2, 1))
    # 4 pruned masks <= 4 classes: the masks are resized before mixing instead of the class maps; same answer.
    (pruned,) = processor.post_process_semantic_segmentation(pruned_outputs(known_outputs()),
                                                             target_sizes=[(2 * H, 2 * W)])
    assert torch.equal(pruned, resized)


def test_no_segment_gives_an_empty_int32_map():
    outputs = known_outputs()
    (result,) = processor.post_process_panoptic_segmentation(outputs, threshold=0.999)
    assert result["segments_info"] == [] and result["segmentation"].dtype == torch.int32
    assert result["segmentation"].shape == (H, W) and not result["segmentation"].any()
    (resized,) = processor.post_process_panoptic_segmentation(outputs, threshold=0.999, target_sizes=[(7, 9)])
    assert resized["segmentation"].shape == (7, 9)


def test_segmentation_errors():
    outputs = known_outputs()
    with pytest.raises(ValueError, match="pred_masks"):
        processor.post_process_panoptic_segmentation({"logits": outputs["logits"]})
    with pytest.raises(ValueError, match="target_sizes has 2 entries"):
        processor.post_process_semantic_segmentation(outputs, target_sizes=[(1, 1), (2, 2)])
    with pytest.raises(ValueError, match="mask_query_indices"):
        processor.post_process_instance_segmentation({**outputs, "pred_masks": outputs["pred_masks"][:, :3]})


# ------------------------------------------------------------------ COCO formats
def test_panoptic_png_round_trip():
    (result,) = processor.post_process_panoptic_segmentation(known_outputs())
    result["segmentation"][0, 0] = 70000  # an id that needs all three colour channels
    result["segments_info"].append({"id": 70000, "label_id": 2, "was_fused": False, "score": 0.9})
    png, segments = panoptic_to_coco(result["segmentation"], result["segments_info"])
    rgb = np.asarray(PIL.Image.open(io.BytesIO(png)))
    assert rgb[0, 0].tolist() == [112, 17, 1]  # 70000 = 112 + 256 * 17 + 256**2 * 1
    assert segments[0] == {"id": 1, "category_id": 1, "area": 6 * 9, "bbox": [3, 2, 9, 6], "iscrowd": 0,
                           "score": result["segments_info"][0]["score"]}
    assert segments[3]["area"] == 1 and segments[3]["bbox"] == [0, 0, 1, 1]
    back = panoptic_from_coco(png, segments)
    assert torch.equal(back["segmentation"], result["segmentation"])
    assert [(s["id"], s["label_id"]) for s in back["segments_info"]] == [(1, 1), (2, 3), (3, 0), (70000, 2)]
    assert np.array_equal(decode_id_png(png), result["segmentation"].numpy())
    with pytest.raises(ValueError, match="missing from segments_info"):
        panoptic_from_coco(png, segments[:2])


def test_rle_round_trip():
    mask = np.random.default_rng(0).random((37, 53)) > 0.6
    rle = mask_to_rle(torch.from_numpy(mask))
    assert isinstance(rle["counts"], str) and rle["size"] == [37, 53]
    assert np.array_equal(rle_to_mask(json.loads(json.dumps(rle))), mask)
