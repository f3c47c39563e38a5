"""Evaluation metrics: COCOeval wrapper and panoptic quality on hand-built cases."""
import json
from pathlib import Path

import numpy as np
import pytest

from model.coco_format import decode_id_png
from model.training import shapes
from model.training.evaluate import coco_metrics, matched_boxes, panoptic_quality

CATEGORIES = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 1},
              {"id": 7, "name": "s", "isthing": 0}]


def test_bbox_ap_of_ground_truth_is_one_and_drops_with_shifted_boxes(tmp_path):
    data = shapes.write_dataset(tmp_path / "ds", n_images=3, size=(96, 64), seed=1)
    truth = json.loads((data / "annotations.json").read_text())["annotations"]
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in truth]
    assert coco_metrics(data / "annotations.json", perfect)["AP"] == pytest.approx(1.0)
    shifted = [dict(r, bbox=[r["bbox"][0] + r["bbox"][2] * 0.3, *r["bbox"][1:]]) for r in perfect]
    assert coco_metrics(data / "annotations.json", shifted)["AP"] < 0.9
    assert coco_metrics(data / "annotations.json", [])["AP"] == 0.0
    masks = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
              "score": 0.9} for a in truth]
    assert coco_metrics(data / "annotations.json", masks, "segm")["AP"] == pytest.approx(1.0)


def test_panoptic_quality_of_ground_truth_is_one(tmp_path):
    data = shapes.write_dataset(tmp_path / "ds", n_images=2, size=(64, 64), seed=2)
    pan = json.loads((data / "panoptic.json").read_text())
    pairs = [(decode_id_png(data / "panoptic" / a["file_name"]), a["segments_info"]) for a in pan["annotations"]]
    result = panoptic_quality(pairs, pairs, pan["categories"])
    assert result["PQ"] == result["SQ"] == result["RQ"] == result["PQ_th"] == result["PQ_st"] == 1.0


def test_panoptic_quality_by_hand():
    gt = np.zeros((10, 10), np.int64)
    gt[:, :5] = 1  # thing a, 50 px
    gt[:, 5:] = 2  # stuff s, 50 px
    gt[0, 9] = 3  # a tiny thing b, missed (FN)
    gt_segments = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 7}, {"id": 3, "category_id": 2}]
    pred = np.zeros((10, 10), np.int64)
    pred[:, :4] = 5  # a: 40 px, IoU 40/50 = 0.8
    pred[:, 4:] = 6  # s: 60 px
    pred[9, 9] = 7  # b at a wrong place (FP)
    pred_segments = [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 7}, {"id": 7, "category_id": 2}]
    result = panoptic_quality([(gt, gt_segments)], [(pred, pred_segments)], CATEGORIES)
    per_class = result["per_class"]
    assert per_class[1] == pytest.approx({"PQ": 0.8, "SQ": 0.8, "RQ": 1.0})
    stuff_iou = 48 / (59 + 49 - 48)  # pred s has 59 px (one went to b), gt s has 49 (one went to b), 48 shared
    assert per_class[7]["PQ"] == pytest.approx(stuff_iou)
    assert per_class[2] == pytest.approx({"PQ": 0.0, "SQ": 0.0, "RQ": 0.0})  # 1 FP + 1 FN, no TP
    assert result["PQ"] == pytest.approx((0.8 + stuff_iou + 0.0) / 3)
    assert result["PQ_th"] == pytest.approx(0.4) and result["PQ_st"] == pytest.approx(stuff_iou)


def test_void_pixels_are_ignored():
    gt = np.zeros((4, 4), np.int64)
    gt[:2] = 1  # top half thing a, bottom half void
    pred = np.full((4, 4), 2, np.int64)  # one prediction over everything
    pred[3] = 3  # a second prediction entirely on void: not a false positive
    result = panoptic_quality([(gt, [{"id": 1, "category_id": 1}])],
                              [(pred, [{"id": 2, "category_id": 1}, {"id": 3, "category_id": 2}])], CATEGORIES)
    assert result["per_class"][1]["PQ"] == pytest.approx(1.0)  # void part of the prediction is not counted
    assert 2 not in result["per_class"]


def test_bad_predictions_are_rejected():
    gt = np.ones((2, 2), np.int64)
    with pytest.raises(ValueError, match="missing from its segments_info"):
        panoptic_quality([(gt, [{"id": 1, "category_id": 1}])], [(gt * 4, [])], CATEGORIES)
    with pytest.raises(ValueError, match="shape"):
        panoptic_quality([(gt, [])], [(np.ones((3, 2), np.int64), [])], CATEGORIES)


def test_instance_results_use_each_querys_own_mask_inside_the_unpadded_image():
    from types import SimpleNamespace

    import torch

    from model.coco_format import rle_to_mask
    from model.training.evaluate import _instance_results

    logits = torch.full((1, 2, 3), -10.0)
    logits[0, 0, 1], logits[0, 1, 2] = 5.0, 4.0  # query 0: class 1, query 1: class 2
    pred_masks = torch.full((1, 2, 16, 16), -10.0)
    pred_masks[0, 0, 4:12, 4:8] = 10.0  # query 0: a 32x16 box in input pixels
    pred_masks[0, 1, 4:12, 2:10] = 10.0  # query 1 overlaps query 0: both keep their masks
    pixel_mask = torch.zeros(1, 64, 64, dtype=torch.int64)
    pixel_mask[0, :, :48] = 1  # the image is 64 x 48, padded to 64 x 64
    outputs = SimpleNamespace(logits=logits, pred_masks=pred_masks)
    results = _instance_results(outputs, pixel_mask, [{"id": 7, "height": 128, "width": 96}], top_k=2)
    assert [(r["image_id"], r["category_id"]) for r in results] == [(7, 1), (7, 2)]
    first, second = (rle_to_mask(r["segmentation"]) for r in results)
    assert first.shape == (128, 96)  # resized from the unpadded 64 x 48 input to the image size
    expected = np.zeros((128, 96), bool)
    expected[32:96, 32:64] = True
    assert (first & expected).sum() / (first | expected).sum() > 0.9
    assert (first & second).any()


def test_matched_boxes_by_hand():
    truth = [{"image_id": 0, "category_id": 1, "bbox": [0, 0, 10, 10]},
             {"image_id": 0, "category_id": 1, "bbox": [50, 50, 10, 10]},
             {"image_id": 1, "category_id": 2, "bbox": [0, 0, 20, 10]}]
    detections = [{"image_id": 0, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},  # IoU 1
                  {"image_id": 0, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8},  # duplicate: no match
                  {"image_id": 0, "category_id": 1, "bbox": [50, 50, 10, 8], "score": 0.7},  # IoU 0.8
                  {"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 10], "score": 0.9},  # wrong class
                  {"image_id": 1, "category_id": 2, "bbox": [0, 0, 20, 10], "score": 0.1}]  # below threshold
    result = matched_boxes(truth, detections, threshold=0.5)
    assert result["median_IoU"] == pytest.approx(0.9)
    assert result["precision"] == pytest.approx(2 / 4) and result["recall"] == pytest.approx(2 / 3)
    assert matched_boxes(truth, [], 0.5) == {"median_IoU": 0.0, "precision": 0.0, "recall": 0.0}


def test_video_to_dataset_keeps_every_frame_and_its_boxes(tmp_path):
    videos = [shapes.write_sample_video(tmp_path / f"v{seed}.mp4", seconds=1.0, size=(96, 64), seed=seed, fps=4)
              for seed in (1, 2)]
    data = shapes.video_to_dataset(videos, tmp_path / "frames")
    coco = json.loads((data / "annotations.json").read_text())
    truth = [o for v in videos for f in json.loads(Path(f"{v}.gt.json").read_text())["frames"] for o in f["objects"]]
    assert len(coco["images"]) == 8 and len({i["id"] for i in coco["images"]}) == 8
    assert [a["bbox"] for a in coco["annotations"]] == [o["bbox"] for o in truth]
    assert all((data / "images" / i["file_name"]).is_file() for i in coco["images"])
    assert coco_metrics(data / "annotations.json", [dict(a, score=1.0) for a in coco["annotations"]])["AP"] == 1.0
    with pytest.raises(FileNotFoundError, match="gt.json"):
        shapes.video_to_dataset([tmp_path / "missing.mp4"], tmp_path / "x")
