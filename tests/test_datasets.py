"""Datasets and augmentations: targets stay consistent with the pixels; batches are padded with a pixel mask."""
import random

import numpy as np
import pytest
import torch

from model import shapes
from model.box_ops import box_cxcywh_to_xyxy
from model.datasets import (AspectGroupedBatches, Collator, CocoDetection, CocoPanoptic, RandomHorizontalFlip, RandomResize,
                            RandomSizeCrop, make_transforms)
from model.train import make_processor


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes.write_dataset(tmp_path_factory.mktemp("shapes"), n_images=3, size=(96, 64), seed=3)


def _mask_box(mask):
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]


def test_detection_targets_match_masks(data):
    image, target = CocoDetection(data, masks=True)[0]
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
    image, target = CocoDetection(data, masks=True)[2]
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
    image, target = CocoDetection(data, masks=True)[0]
    resized_image, resized = RandomResize([32], max_size=100)(image, target)
    assert resized_image.size == (48, 32) and resized["masks"].shape[-2:] == (32, 48)
    assert torch.allclose(resized["boxes"], target["boxes"] / 2)


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
