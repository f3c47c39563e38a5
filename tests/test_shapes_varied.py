"""The varied training scenes: every aspect ratio and object size, exact labels under any look, and a codec path."""
import json

import numpy as np
import pytest
from PIL import Image

from model.coco_format import decode_id_png, rle_to_mask
from model.training import shapes, shapes_varied

SEEDS = range(24)


@pytest.fixture(scope="module")
def scenes():
    return [shapes_varied.render_varied(np.random.default_rng([9, seed]), 96) for seed in SEEDS]


def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` of the mask (4-neighbour dilation), outside it."""
    grown = mask.copy()
    for _ in range(width):
        grown[1:] |= grown[:-1].copy()
        grown[:-1] |= grown[1:].copy()
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
    return grown & ~mask


def test_every_aspect_ratio_occurs_at_the_given_shorter_side(scenes):
    sizes = {image.shape[:2] for image, _ in scenes}
    assert {(96, 170), (96, 128), (170, 96), (96, 96)} <= sizes
    assert all(min(size) == 96 for size in sizes)


def test_labels_agree_with_each_other(scenes):
    for image, truth in scenes:
        panoptic = truth["panoptic"]
        assert panoptic.shape == image.shape[:2]
        segments = {s["id"]: s for s in truth["segments_info"]}
        assert set(np.unique(panoptic).tolist()) - {0} == set(segments)  # 0: a void (unlabelled) background
        for obj in truth["objects"]:
            mask = rle_to_mask(obj["segmentation"])
            rows, cols = np.nonzero(mask)
            assert obj["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
            assert obj["area"] == mask.sum()
            segment_id = int(np.bincount(panoptic[mask]).argmax())
            assert (panoptic == segment_id).sum() == mask.sum() and segments[segment_id]["bbox"] == obj["bbox"]


def test_labelled_objects_stand_out_from_what_surrounds_them(scenes):
    """The label is worth learning only if the pixels show it: an object's interior differs from the background
    just outside it (after JPEG, H.264, blur and the decoder's resize)."""
    contrasts = []
    for image, truth in scenes:
        masks = [rle_to_mask(o["segmentation"]) for o in truth["objects"]]
        things = np.any(masks, axis=0)
        for mask in masks:
            interior = mask & ~_ring(~mask, 2)
            background = _ring(mask, 4) & ~_ring(mask, 1) & ~things
            if interior.sum() < 50 or background.sum() < 20:
                continue
            inside, outside = image[interior].astype(float).mean(0), image[background].astype(float).mean(0)
            contrasts.append(np.linalg.norm(inside - outside))
    assert len(contrasts) >= 15
    assert np.median(contrasts) > 40 and np.mean(np.array(contrasts) > 15) > 0.9


def test_object_sizes_span_small_to_large():
    fractions = []
    for seed in range(60):
        image, truth = shapes_varied.render_varied(np.random.default_rng([4, seed]), 64)
        frame = image.shape[0] * image.shape[1]
        fractions += [o["bbox"][2] * o["bbox"][3] / frame for o in truth["objects"]]
    assert min(fractions) < 0.03 and max(fractions) > 0.25


def test_deterministic_per_seed():
    a, ta = shapes_varied.render_varied(np.random.default_rng([1, 2]), 64)
    b, tb = shapes_varied.render_varied(np.random.default_rng([1, 2]), 64)
    assert np.array_equal(a, b) and ta["objects"] == tb["objects"]


def test_h264_round_trip_is_lossy_but_close():
    image, _ = shapes.render_scene(np.random.default_rng(0), 128, 96)
    decoded = shapes_varied.h264_round_trip(image, crf=30)
    assert decoded.shape == image.shape and not np.array_equal(decoded, image)
    assert np.abs(decoded.astype(float) - image).mean() < 10


def test_swscale_resize_keeps_the_picture():
    image, _ = shapes.render_scene(np.random.default_rng(1), 256, 192)
    small = shapes_varied.swscale_resize(image, 128, 96)
    reference = np.asarray(Image.fromarray(image).resize((128, 96), Image.Resampling.BILINEAR), float)
    assert small.shape == (96, 128, 3) and np.abs(small - reference).mean() < 6


def test_write_dataset_varied_records_each_image_size(tmp_path):
    out = shapes.write_dataset(tmp_path / "ds", n_images=6, size=64, seed=3, varied=True)
    det = json.loads((out / "annotations.json").read_text())
    pan = json.loads((out / "panoptic.json").read_text())
    for info, ann in zip(det["images"], pan["annotations"]):
        image = Image.open(out / "images" / info["file_name"])
        assert image.size == (info["width"], info["height"]) and min(image.size) == 64
        ids = decode_id_png(out / "panoptic" / ann["file_name"])
        assert ids.shape == (info["height"], info["width"])
        assert sorted(set(np.unique(ids).tolist()) - {0}) == sorted(s["id"] for s in ann["segments_info"])
    with pytest.raises(ValueError, match="shorter side"):
        shapes.write_dataset(tmp_path / "bad", n_images=1, size=(64, 48), varied=True)
