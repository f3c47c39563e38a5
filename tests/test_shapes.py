"""The shapes generator: ground truth agrees with the rendered pixels, is deterministic, and videos decode."""
import json

import numpy as np
import pytest
from PIL import Image

from model.coco_format import decode_id_png, rle_to_mask
from model.training import shapes


def _scene(seed: int):
    return shapes.render_scene(np.random.default_rng(seed), 96, 64)


@pytest.mark.parametrize("seed", range(8))
def test_ground_truth_matches_pixels(seed):
    image, truth = _scene(seed)
    scene = shapes.random_scene(np.random.default_rng(seed), 96, 64)
    assert image.shape == (64, 96, 3) and image.dtype == np.uint8
    panoptic = truth["panoptic"]
    assert (panoptic > 0).all(), "every pixel belongs to a thing or a stuff segment"
    segments = {s["id"]: s for s in truth["segments_info"]}
    assert sorted(segments) == sorted(np.unique(panoptic).tolist())
    for obj in truth["objects"]:
        mask = rle_to_mask(obj["segmentation"])
        colour = scene.shapes[obj["track"]].colour
        assert (image[mask] == colour).all(), "visible thing pixels carry the thing's flat colour"
        x, y, w, h = obj["bbox"]
        rows, cols = np.nonzero(mask)
        assert [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1] == [x, y, w, h]
        assert obj["area"] == mask.sum()
        # the object's panoptic segment is exactly its visible mask
        segment_id = int(np.bincount(panoptic[mask]).argmax())
        assert (panoptic == segment_id).sum() == mask.sum() == segments[segment_id]["area"]
        assert segments[segment_id]["category_id"] == obj["category_id"] and segments[segment_id]["bbox"] == obj["bbox"]
    for segment in segments.values():
        if segment["category_id"] in shapes.STUFF_IDS:
            assert (scene.stuff_map[panoptic == segment["id"]] == segment["category_id"]).all()


def test_occluded_shapes_are_dropped():
    scene = shapes.random_scene(np.random.default_rng(0), 64, 64)
    big = shapes.Shape(category_id=2, center=(32, 32), radius=80, angle=0.0, colour=(255, 0, 0))
    small = shapes.Shape(category_id=1, center=(30, 30), radius=5, angle=0.0, colour=(0, 255, 0))
    scene.shapes = [small, big]
    image, truth = shapes.render(scene)
    assert [o["track"] for o in truth["objects"]] == [1]
    assert [s["category_id"] for s in truth["segments_info"]] == [2]
    assert (image == (255, 0, 0)).all()


def test_deterministic_per_seed():
    a, ta = _scene(3)
    b, tb = _scene(3)
    c, _ = _scene(4)
    assert np.array_equal(a, b) and np.array_equal(ta["panoptic"], tb["panoptic"])
    assert ta["objects"] == tb["objects"]
    assert not np.array_equal(a, c)


def test_write_dataset(tmp_path):
    out = shapes.write_dataset(tmp_path / "ds", n_images=3, size=(64, 48), seed=5)
    det = json.loads((out / "annotations.json").read_text())
    pan = json.loads((out / "panoptic.json").read_text())
    assert [i["file_name"] for i in det["images"]] == ["000000.png", "000001.png", "000002.png"]
    assert {c["id"] for c in det["categories"]} == set(shapes.THING_IDS)
    assert len({a["id"] for a in det["annotations"]}) == len(det["annotations"]) > 0
    for ann in pan["annotations"]:
        image = np.asarray(Image.open(out / "images" / ann["file_name"]))
        ids = decode_id_png(out / "panoptic" / ann["file_name"])
        assert image.shape == (48, 64, 3)
        assert sorted(np.unique(ids).tolist()) == sorted(s["id"] for s in ann["segments_info"])
        for s in ann["segments_info"]:
            assert (ids == s["id"]).sum() == s["area"]
    # same seed, same images
    again = shapes.write_dataset(tmp_path / "again", n_images=1, size=(64, 48), seed=5)
    assert (again / "images" / "000000.png").read_bytes() == (out / "images" / "000000.png").read_bytes()


def test_write_dataset_in_parallel_writes_the_same_files(tmp_path):
    one = shapes.write_dataset(tmp_path / "one", n_images=5, size=(64, 48), seed=7)
    two = shapes.write_dataset(tmp_path / "two", n_images=5, size=(64, 48), seed=7, workers=2)
    for name in ["annotations.json", "panoptic.json", "images/000004.png", "panoptic/000003.png"]:
        assert (one / name).read_bytes() == (two / name).read_bytes()


def test_bad_sizes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="even"):
        shapes.write_dataset(tmp_path, 1, size=(63, 48))
    with pytest.raises(ValueError, match="16x16"):
        shapes.render_scene(np.random.default_rng(0), 8, 8)


def test_motion_is_smooth_and_bounces():
    scene = shapes.random_scene(np.random.default_rng(1), 200, 100, max_speed=6.0)
    width, height = scene.size
    previous = scene
    for _ in range(200):
        scene = shapes.advance(scene)
        for before, after in zip(previous.shapes, scene.shapes):
            step = np.hypot(after.center[0] - before.center[0], after.center[1] - before.center[1])
            assert step <= np.hypot(*before.velocity) + 1e-9
            assert after.radius <= after.center[0] <= width - after.radius
            assert after.radius <= after.center[1] <= height - after.radius
        previous = scene


def test_sample_video_decodes(tmp_path):
    import av

    path = shapes.write_sample_video(tmp_path / "clip.mp4", seconds=1.0, size=(128, 96), seed=2, fps=10)
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    gt = json.loads(path.with_name("clip.mp4.gt.json").read_text())
    assert len(frames) == len(gt["frames"]) == 10
    assert frames[0].shape == (96, 128, 3)
    assert (gt["width"], gt["height"], gt["fps"]) == (128, 96, 10)
    # frame 0 decodes close to its rendering (lossy H.264, so compare means); the speed does not move frame 0
    image, _ = shapes.render(shapes.random_scene(np.random.default_rng(2), 128, 96, max_speed=1.0))
    assert np.abs(frames[0].astype(float) - image).mean() < 8
    # faststart: the moov atom precedes the media data
    data = path.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    tracks = {o["track"] for f in gt["frames"] for o in f["objects"]}
    assert tracks and all(isinstance(t, int) for t in tracks)
