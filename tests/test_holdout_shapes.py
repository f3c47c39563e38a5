"""The independent hold-out shapes renderer: reproducibility, annotations that match the pixels, shape geometry."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from model.training.holdout_shapes import (
    CATEGORIES,
    DEFAULT_SIZES,
    polygon_sdf,
    rasterize,
    unit_vertices,
    write_holdout_dataset,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """12 images (three of each default size), with the images and decoded masks loaded."""
    out = write_holdout_dataset(tmp_path_factory.mktemp("holdout"), n_images=12, seed=3)
    document = json.loads((out / "annotations.json").read_text())
    images = {i["id"]: np.asarray(Image.open(out / "images" / i["file_name"])) for i in document["images"]}
    masks = {a["id"]: mask_utils.decode(a["segmentation"]).astype(bool) for a in document["annotations"]}
    return {"out": out, "doc": document, "images": images, "masks": masks}


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by a (2r+1) x (2r+1) square, done separably along rows then columns."""
    out = mask.copy()
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)])
        length = out.shape[axis]
        out = np.zeros_like(out)
        for shift in range(2 * radius + 1):
            out |= padded[shift:shift + length] if axis == 0 else padded[:, shift:shift + length]
    return out


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Erosion by a square; pixels beyond the frame count as outside the mask."""
    padded = np.pad(~mask, radius, constant_values=True)
    return ~_dilate(padded, radius)[radius:-radius, radius:-radius]


def test_same_seed_gives_identical_files_and_another_seed_different_images(tmp_path):
    first = write_holdout_dataset(tmp_path / "a", n_images=4, seed=5)
    second = write_holdout_dataset(tmp_path / "b", n_images=4, seed=5)
    other = write_holdout_dataset(tmp_path / "c", n_images=4, seed=6)
    assert (first / "annotations.json").read_bytes() == (second / "annotations.json").read_bytes()
    names = sorted(p.name for p in (first / "images").iterdir())
    assert names == [f"{i:06d}.png" for i in range(4)]
    for name in names:
        assert (first / "images" / name).read_bytes() == (second / "images" / name).read_bytes()
        assert (first / "images" / name).read_bytes() != (other / "images" / name).read_bytes()
    assert (first / "annotations.json").read_bytes() != (other / "annotations.json").read_bytes()


def test_image_sizes_cycle_through_the_sizes_and_match_the_json(dataset):
    doc = dataset["doc"]
    assert [i["id"] for i in doc["images"]] == list(range(12))
    for info in doc["images"]:
        assert (info["width"], info["height"]) == DEFAULT_SIZES[info["id"] % len(DEFAULT_SIZES)]
        assert dataset["images"][info["id"]].shape == (info["height"], info["width"], 3)
    assert {(i["width"], i["height"]) for i in doc["images"]} == set(DEFAULT_SIZES)
    assert doc["categories"] == [{"id": i + 1, "name": name, "isthing": 1} for i, name in enumerate(CATEGORIES)]
    assert [c["name"] for c in doc["categories"]] == ["circle", "square", "triangle", "star", "hexagon", "diamond"]


def test_annotations_are_well_formed_and_varied(dataset):
    annotations = dataset["doc"]["annotations"]
    assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
    per_image = np.bincount([a["image_id"] for a in annotations], minlength=12)
    assert per_image.min() >= 1 and per_image.max() <= 5
    for a in annotations:
        assert a["iscrowd"] == 0 and 1 <= a["category_id"] <= 6
        assert isinstance(a["segmentation"]["counts"], str)
        assert a["fill"] in ("flat", "gradient", "outline")
        assert len(a["colour"]) == 3 and all(0 <= c <= 255 for c in a["colour"])
    assert len({a["category_id"] for a in annotations}) >= 4
    assert {a["fill"] for a in annotations} == {"flat", "gradient", "outline"}


def test_boxes_and_areas_are_those_of_the_masks_and_masks_do_not_overlap(dataset):
    doc, masks = dataset["doc"], dataset["masks"]
    sizes = {i["id"]: (i["height"], i["width"]) for i in doc["images"]}
    claimed = {image_id: np.zeros(size, dtype=int) for image_id, size in sizes.items()}
    for a in doc["annotations"]:
        mask = masks[a["id"]]
        assert mask.shape == sizes[a["image_id"]]
        ys, xs = np.nonzero(mask)
        assert a["area"] == len(xs) > 0
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        # Every visible object covers a sizeable part of the frame, and at most 30 % (with rounding slack).
        assert a["bbox"][2] * a["bbox"][3] <= 0.31 * mask.size
        claimed[a["image_id"]] += mask
    assert max(c.max() for c in claimed.values()) == 1


def test_fill_colour_inside_the_mask_and_contrast_around_it(dataset):
    doc, masks, images = dataset["doc"], dataset["masks"], dataset["images"]
    union = {i["id"]: np.zeros((i["height"], i["width"]), dtype=bool) for i in doc["images"]}
    for a in doc["annotations"]:
        union[a["image_id"]] |= masks[a["id"]]
    inside_checked = ring_checked = 0
    for a in doc["annotations"]:
        mask, image = masks[a["id"]], images[a["image_id"]].astype(float)
        colour = np.array(a["colour"], dtype=float)
        if a["fill"] != "gradient":
            # Deep enough inside to skip the anti-aliased edge, a blur and an outline of up to 4 px.
            core = _erode(mask, 3 if a["fill"] == "flat" else 6)
            if core.sum() >= 10:
                assert np.linalg.norm(np.median(image[core], axis=0) - colour) < 30, a
                inside_checked += 1
        ring = _dilate(mask, 6) & ~_dilate(mask, 3) & ~union[a["image_id"]]
        if ring.sum() >= 20:
            assert np.median(np.linalg.norm(image[ring] - colour, axis=1)) > 40, a
            ring_checked += 1
    assert inside_checked >= 10 and ring_checked >= 0.8 * len(doc["annotations"])


def test_an_unoccluded_circle_fills_pi_over_4_of_its_box(dataset):
    doc, masks = dataset["doc"], dataset["masks"]
    ratios = []
    for a in doc["annotations"]:
        if a["category_id"] != 1:
            continue
        others = [masks[b["id"]] for b in doc["annotations"] if b["image_id"] == a["image_id"] and b is not a]
        near = _dilate(masks[a["id"]], 2)
        if any((near & other).any() for other in others):
            continue  # touching another object: possibly occluded
        ratios.append(a["area"] / (a["bbox"][2] * a["bbox"][3]))
    assert ratios, "the fixture should hold at least one unoccluded circle"
    assert np.allclose(ratios, np.pi / 4, atol=0.05), ratios


def test_class_definitions():
    rng = np.random.default_rng(0)

    def sides(v: np.ndarray) -> np.ndarray:
        return np.linalg.norm(np.roll(v, -1, axis=0) - v, axis=1)

    def angles(v: np.ndarray) -> np.ndarray:
        a, b = np.roll(v, 1, axis=0) - v, np.roll(v, -1, axis=0) - v
        return np.degrees(np.arccos((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))

    assert unit_vertices("circle", rng) is None
    for name, count, angle in (("square", 4, 90), ("triangle", 3, 60), ("hexagon", 6, 120)):
        v = unit_vertices(name, rng)
        assert len(v) == count
        assert np.allclose(sides(v), sides(v)[0]) and np.allclose(angles(v), angle)
    for _ in range(5):
        star = unit_vertices("star", rng)
        radii = np.linalg.norm(star, axis=1)
        assert len(star) == 10 and np.allclose(radii[::2], 1) and 0.4 <= radii[1] / radii[0] <= 0.5
        assert np.allclose(radii[1::2], radii[1])
        diamond = unit_vertices("diamond", rng)
        assert len(diamond) == 4 and np.allclose(sides(diamond), sides(diamond)[0])
        diagonals = sorted([np.linalg.norm(diamond[0] - diamond[2]), np.linalg.norm(diamond[1] - diamond[3])])
        assert 0.5 <= diagonals[0] / diagonals[1] <= 0.7
    # The star is not convex: the signed distance must say "outside" between two points, "inside" at the centre.
    star = unit_vertices("star", rng)
    notch = (star[0] + star[2]) / 2
    assert polygon_sdf(np.array([0.0, notch[0]]), np.array([0.0, notch[1]]), star).tolist()[0] < 0
    assert polygon_sdf(np.array([notch[0]]), np.array([notch[1]]), star)[0] > 0


def test_rasterized_coverage_is_anti_aliased_and_has_the_right_area():
    radius = 20.3
    coverage, band, _ = rasterize(lambda x, y: np.hypot(x, y) - radius, 48, 48, 24.2, 23.7, outline=3.0)
    assert coverage.sum() == pytest.approx(np.pi * radius ** 2, rel=0.01)
    assert band.sum() == pytest.approx(np.pi * (radius ** 2 - (radius - 3) ** 2), rel=0.02)
    assert ((coverage > 0) & (coverage < 1)).sum() > 100  # partial coverage along the edge


def test_the_smallest_allowed_frames_still_get_objects(tmp_path):
    out = write_holdout_dataset(tmp_path / "tiny", n_images=6, seed=1, sizes=((32, 32), (64, 32)))
    doc = json.loads((out / "annotations.json").read_text())
    assert {a["image_id"] for a in doc["annotations"]} == set(range(6))
    for a in doc["annotations"]:
        mask = mask_utils.decode(a["segmentation"])
        assert mask.shape == ((32, 32), (32, 64))[a["image_id"] % 2] and a["area"] == mask.sum() > 0


@pytest.mark.parametrize("kwargs", [
    {"n_images": 0},
    {"n_images": -3},
    {"n_images": 2, "sizes": ((30, 64),)},
    {"n_images": 2, "sizes": ((64, 31),)},
    {"n_images": 2, "sizes": ((64, 64), (65, 64))},
    {"n_images": 2, "sizes": ()},
])
def test_bad_arguments_raise_value_error(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_holdout_dataset(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
