"""Datasets and augmentations: targets stay consistent with the pixels; batches are padded with a pixel mask."""
import json
import random

import numpy as np
import pytest
import torch

from model.box_ops import box_cxcywh_to_xyxy
from model.coco_format import rle_to_mask
from model.training import shapes
from model.training.datasets import AspectGroupedBatches, CocoDetection, CocoPanoptic, Collator, label_map
from model.training.train import make_processor
from model.training.transforms import RandomHorizontalFlip, RandomResize, RandomSizeCrop, make_transforms


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes.write_dataset(tmp_path_factory.mktemp("shapes"), n_images=3, size=(96, 64), seed=3)


def _with_masks(data, index):
    """A CocoDetection sample, its target given its objects' masks (annotations.json's RLE segmentations)."""
    image, target = CocoDetection(data)[index]
    coco = json.loads((data / "annotations.json").read_text())
    masks = [rle_to_mask(a["segmentation"]) for a in coco["annotations"] if a["image_id"] == target["image_id"]]
    return image, {**target, "masks": torch.from_numpy(np.stack(masks))}


def _mask_box(mask):
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]


def test_detection_targets_match_masks(data):
    image, target = _with_masks(data, 0)
    assert image.size == (96, 64)
    for box, mask in zip(target["boxes"], target["masks"]):
        assert box.tolist() == _mask_box(mask)  # absolute xyxy, pixel edges


def test_panoptic_targets_cover_the_image(data):
    image, target = CocoPanoptic(data)[1]
    assert target["masks"].sum(0).eq(1).all()  # every pixel in exactly one segment, things and stuff
    assert set(target["class_labels"].tolist()) & set(shapes.STUFF_IDS)
    for box, mask in zip(target["boxes"], target["masks"]):
        assert box.tolist() == _mask_box(mask)


def test_flip_and_crop_keep_boxes_on_their_masks(data):
    random.seed(0)
    image, target = _with_masks(data, 2)
    flipped_image, flipped = RandomHorizontalFlip(p=1.0)(image, target)
    assert np.array_equal(np.asarray(flipped_image)[:, ::-1], np.asarray(image))
    for box, mask in zip(flipped["boxes"], flipped["masks"]):
        assert box.tolist() == _mask_box(mask)
    for _ in range(10):
        cropped_image, cropped = RandomSizeCrop(20, 50)(image, target)
        assert cropped["masks"].shape[-2:] == (cropped_image.height, cropped_image.width)
        assert len(cropped["boxes"]) == len(cropped["class_labels"]) == len(cropped["masks"])
        for box, mask in zip(cropped["boxes"], cropped["masks"]):
            x0, y0, x1, y1 = _mask_box(mask)
            # clipped boxes contain the visible part of the mask (DETR clips instead of recomputing)
            assert box[0] <= x0 and box[1] <= y0 and box[2] >= x1 and box[3] >= y1


def test_resize_scales_boxes_and_masks(data):
    image, target = _with_masks(data, 0)
    resized_image, resized = RandomResize([32], max_size=100)(image, target)
    assert resized_image.size == (48, 32) and resized["masks"].shape[-2:] == (32, 48)
    assert torch.allclose(resized["boxes"], target["boxes"] / 2)


def test_min_scale_bounds_the_training_sizes(data):
    """Training sizes span min_scale..1 of the base size (both paths: plain resize and resize-crop-resize)."""
    random.seed(2)
    for min_scale, low in ((0.6, 32), (1.0, 64)):  # DETR's 0.6 x 64 = 38 -> 32 (multiples of 16); 1.0: 64 only
        transforms = make_transforms(train=True, size=64, min_scale=min_scale)
        shorter = {min(transforms(*CocoDetection(data)[i % 3])[0].shape[:2]) for i in range(40)}
        assert min(shorter) >= low - 1 and max(shorter) <= 64
        assert len(shorter) > 1 if min_scale < 1 else shorter <= {63, 64}


def test_collate_pads_images_and_masks(data):
    random.seed(1)
    dataset = CocoPanoptic(data, make_transforms(train=True, size=64))
    batch = Collator(make_processor(64))([dataset[i] for i in range(3)])
    pixels, pixel_mask = batch["pixel_values"], batch["pixel_mask"]
    assert pixels.shape[0] == 3 and pixel_mask.shape == (3, *pixels.shape[-2:])
    for i, target in enumerate(batch["labels"]):
        height, width = target["size"].tolist()
        assert pixel_mask[i, :height, :width].all() and pixel_mask[i].sum() == height * width
        assert target["masks"].shape[-2:] == pixels.shape[-2:]
        assert not target["masks"][:, height:].any() and not target["masks"][:, :, width:].any()
        boxes = box_cxcywh_to_xyxy(target["boxes"])
        assert (boxes >= -1e-6).all() and (boxes <= 1 + 1e-6).all()  # normalized to the unpadded image


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations.json not found"):
        CocoDetection(tmp_path)


def test_aspect_grouped_batches_never_mix_orientations():
    landscape = [i % 3 != 0 for i in range(50)]
    torch.manual_seed(0)
    batches = list(AspectGroupedBatches(landscape, batch_size=4))
    assert sorted(i for batch in batches for i in batch) == list(range(50))  # every sample once
    assert all(len({landscape[i] for i in batch}) == 1 for batch in batches)
    assert len(batches) == len(AspectGroupedBatches(landscape, 4)) == 5 + 9  # 17 portrait, 33 landscape
    assert batches != list(AspectGroupedBatches(landscape, 4))  # a new order every epoch


def test_resize_keeps_a_target_with_no_segment():
    """A crop of a void background can leave no segment at all."""
    from PIL import Image

    target = {"boxes": torch.zeros((0, 4)), "class_labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros((0, 40, 60), dtype=torch.bool)}
    image, out = RandomResize([20])(Image.new("RGB", (60, 40)), target)
    assert image.size == (30, 20) and out["masks"].shape == (0, 20, 30)


def test_label_map_is_every_category_of_the_dataset(data, tmp_path):
    assert label_map(data) == shapes.ID2LABEL  # panoptic.json: things and stuff
    (tmp_path / "annotations.json").write_text(json.dumps(
        {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "c"}]}))
    assert label_map(tmp_path) == {0: "N/A", 1: "a", 2: "N/A", 3: "c"}


def test_datasets_follow_the_processor_rule_for_crowds_and_clipping(tmp_path):
    """Detection: crowd objects and boxes empty after clipping are dropped, boxes clipped to the image. Panoptic:
    every segment is a target, crowd ones included (model.coco_targets)."""
    from PIL import Image

    from model.coco_format import encode_id_png

    (tmp_path / "images").mkdir()
    (tmp_path / "panoptic").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "0.png")
    image = {"id": 0, "file_name": "0.png", "width": 40, "height": 30}
    objects = [{"bbox": [2, 3, 10, 5], "category_id": 1}, {"bbox": [35, 20, 10, 20], "category_id": 2},
               {"bbox": [5, 5, 0, 4], "category_id": 1}, {"bbox": [1, 1, 4, 4], "category_id": 2, "iscrowd": 1}]
    (tmp_path / "annotations.json").write_text(json.dumps({"images": [image], "categories": [], "annotations": [
        {"id": i + 1, "image_id": 0, **obj} for i, obj in enumerate(objects)]}))
    _, target = CocoDetection(tmp_path)[0]
    assert target["class_labels"].tolist() == [1, 2]
    assert target["boxes"].tolist() == [[2, 3, 12, 8], [35, 20, 40, 30]]

    ids = np.full((30, 40), 6, dtype=np.int64)
    ids[:10] = 5
    (tmp_path / "panoptic" / "0.png").write_bytes(encode_id_png(ids))
    segments = [{"id": 5, "category_id": 7, "bbox": [0, 0, 40, 10], "iscrowd": 1},
                {"id": 6, "category_id": 8, "bbox": [0, 10, 40, 20], "iscrowd": 0}]
    (tmp_path / "panoptic.json").write_text(json.dumps({"images": [image], "annotations": [
        {"image_id": 0, "file_name": "0.png", "segments_info": segments}], "categories": [
        {"id": 7, "name": "crowd", "isthing": 1}, {"id": 8, "name": "rest", "isthing": 0}]}))
    _, target = CocoPanoptic(tmp_path)[0]
    assert target["class_labels"].tolist() == [7, 8]
    assert target["masks"].sum((1, 2)).tolist() == [400, 800]
