"""A second, independent "shapes" renderer, used only to evaluate detectors trained on shapes.py's images.

A model scored on images from the renderer it was trained on can learn that renderer's quirks (its colours,
its rasteriser's jagged edges, its size and placement rules) and look better than it is. This module draws the
same label space (circle, square, triangle, star, hexagon, diamond) with code written from scratch, sharing
nothing with model/training/shapes.py, model/coco_format.py or model/training/datasets.py (it imports none of
them, and was written without reading them), so its images are a held-out domain: agreement between the two
renderers is only the class definitions below.

How the images are made:
  * every shape is a signed distance function (negative inside): exact for the disc, and for the polygons the
    distance to the nearest edge with the sign of a crossing-number test;
  * a pixel whose centre is farther than half a diagonal from every edge is wholly inside or outside; only the
    pixels near an edge are supersampled (4 x 4), so the coverage is exact to 1/16 at little cost;
  * coverage >= 0.5 defines the label mask, and the colour is blended by coverage (smooth, anti-aliased edges);
  * backgrounds: two-colour split, checkerboard, stripes, radial gradient, low-frequency blobs, flat pastel;
  * fills: flat, linear two-colour gradient, or flat with a dark or light outline (part of the object's mask);
  * each fill colour is resampled until it stands out from the pixels around the object;
  * later objects may cover earlier ones, but an object is only placed where every earlier one keeps at least
    60 % of its pixels, so no annotation is a sliver;
  * some images get a mild 3 x 3 box blur or additive pixel noise.

Annotations are COCO detection format, with the visible-pixel mask as RLE and two extra fields per object:
"colour" (the fill colour; for a gradient the colour at the shape's centre) and "fill" ("flat", "gradient" or
"outline").
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
DEFAULT_SIZES = ((640, 360), (480, 360), (360, 640), (400, 400))
MIN_SIDE = 32

# Object bounding box as a fraction of the frame area, sampled log-uniformly.
AREA_FRACTION = (0.02, 0.30)
MAX_OBJECTS = 5
MIN_VISIBLE = 0.6  # an earlier object keeps at least this fraction of its pixels when a later one is placed
PLACEMENT_TRIES = 50
FILL_STYLES = ("flat", "gradient", "outline")
FILL_PROBABILITIES = (0.4, 0.3, 0.3)
# Contrast of a fill colour with the pixels around the object (Euclidean RGB distance).
MIN_MEAN_DISTANCE = 80.0  # to the mean colour of the surroundings
MIN_LOW_DISTANCE = 50.0  # to all but the nearest 2 % of the surrounding pixels
CONTRAST_MARGIN = 8  # px around the object's box that count as its surroundings
COLOUR_CANDIDATES = 128

# Sub-sample offsets from a pixel centre on the 4 x 4 supersampling grid.
_SUB = (np.arange(4) + 0.5) / 4 - 0.5
_SUB_X = np.tile(_SUB, 4)
_SUB_Y = np.repeat(_SUB, 4)
# A pixel whose centre is at least this far from the boundary lies wholly on one side of it.
_HALF_DIAGONAL = math.sqrt(0.5) + 1e-6

Sdf = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------------------------------------------
# Shapes


def unit_vertices(name: str, rng: np.random.Generator) -> np.ndarray | None:
    """Vertices (K, 2) of an unrotated shape with circumradius 1, centred on the origin; None for the circle.

    The star's inner radius and the diamond's short diagonal are drawn per object within the class definition.
    """
    def regular(n: int, start: float, radius: float = 1.0) -> np.ndarray:
        angles = start + 2 * np.pi * np.arange(n) / n
        return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)

    if name == "circle":
        return None
    if name == "square":
        return regular(4, np.pi / 4)
    if name == "triangle":
        return regular(3, np.pi / 2)
    if name == "hexagon":
        return regular(6, 0.0)
    if name == "star":
        inner = rng.uniform(0.4, 0.5)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        angles = np.pi / 2 + np.pi * np.arange(10) / 5
        return radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if name == "diamond":
        short = rng.uniform(0.5, 0.7)  # short diagonal / long diagonal
        return np.array([[1.0, 0.0], [0.0, short], [-1.0, 0.0], [0.0, -short]])
    raise ValueError(f"unknown shape {name!r}; expected one of {CATEGORIES}")


def polygon_sdf(px: np.ndarray, py: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Signed Euclidean distance (negative inside) from the points (px, py) to a closed simple polygon.

    The magnitude is the distance to the nearest edge segment; the sign comes from counting the edges that cross
    the horizontal ray to the right of the point (odd = inside), so non-convex polygons (the star) work too.
    """
    dist2 = np.full(px.shape, np.inf)
    inside = np.zeros(px.shape, dtype=bool)
    count = len(vertices)
    for i in range(count):
        ax, ay = vertices[i - 1]
        bx, by = vertices[i]
        ex, ey = bx - ax, by - ay
        wx, wy = px - ax, py - ay
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dx, dy = wx - ex * t, wy - ey * t
        dist2 = np.minimum(dist2, dx * dx + dy * dy)
        # The edge spans the point's y (half-open, so a vertex is counted once) and passes right of the point.
        if ay != by:
            spans = (ay <= py) != (by <= py)
            x_cross = ax + (py - ay) * ex / ey
            inside ^= spans & (px < x_cross)
    return np.where(inside, -1.0, 1.0) * np.sqrt(dist2)


def make_sdf(vertices: np.ndarray | None, radius: float) -> Sdf:
    """Signed distance function of a disc of `radius` (vertices None) or of a polygon, centred on the origin."""
    if vertices is None:
        return lambda px, py: np.hypot(px, py) - radius
    return lambda px, py: polygon_sdf(px, py, vertices)


def rasterize(sdf: Sdf, width: int, height: int, cx: float, cy: float, outline: float = 0.0,
              gradient: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coverage maps of a shape centred at (cx, cy) on a width x height patch (pixel (x, y) spans [x, x+1)).

    Returns (coverage, outline_coverage, gradient_weight), each (height, width) in [0, 1]: the fraction of the
    pixel inside the shape, the fraction inside and within `outline` px of the boundary, and the mean over the
    pixel of t * [inside], t in [0, 1] running along `gradient` = (ux, uy, half_extent) across the shape. Only the
    pixels near the boundary (or near the outline's inner edge) are supersampled.
    """
    ys, xs = np.mgrid[0:height, 0:width]
    px, py = xs + 0.5 - cx, ys + 0.5 - cy
    dist = sdf(px, py)
    inside = dist < 0
    coverage = inside.astype(np.float64)
    band = (inside & (dist > -outline)).astype(np.float64)
    weight = np.zeros_like(coverage)
    if gradient is not None:
        ux, uy, half = gradient
        weight = np.where(inside, 0.5 + (px * ux + py * uy) / (2 * half), 0.0)

    mixed = np.abs(dist) < _HALF_DIAGONAL
    if outline > 0:
        mixed |= np.abs(dist + outline) < _HALF_DIAGONAL
    if mixed.any():
        sx = px[mixed][:, None] + _SUB_X[None, :]
        sy = py[mixed][:, None] + _SUB_Y[None, :]
        sub_dist = sdf(sx, sy)
        sub_inside = sub_dist < 0
        coverage[mixed] = sub_inside.mean(axis=1)
        band[mixed] = (sub_inside & (sub_dist > -outline)).mean(axis=1)
        if gradient is not None:
            t = 0.5 + (sx * ux + sy * uy) / (2 * half)
            weight[mixed] = (t * sub_inside).mean(axis=1)
    return coverage, band, weight


# ---------------------------------------------------------------------------------------------------------------
# Backgrounds


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float64)


def _colour_pair(rng: np.random.Generator, min_distance: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """Two colours far enough apart for the pattern between them to be visible."""
    first = _random_colour(rng)
    for _ in range(100):
        second = _random_colour(rng)
        if np.linalg.norm(first - second) >= min_distance:
            break
    return first, second


def _mix(first: np.ndarray, second: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Per-pixel blend: first where alpha = 0, second where alpha = 1."""
    alpha = alpha[..., None]
    return first * (1 - alpha) + second * alpha


def _background_split(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Two colours either side of a straight line: axis-aligned or at a random (diagonal) angle."""
    first, second = _colour_pair(rng)
    angle = rng.integers(0, 4) * np.pi / 2 if rng.random() < 0.5 else rng.uniform(0, 2 * np.pi)
    px, py = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    signed = (xs - px) * np.cos(angle) + (ys - py) * np.sin(angle)
    return _mix(first, second, np.clip(signed + 0.5, 0, 1))  # a one-pixel ramp keeps the boundary smooth


def _background_checker(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    first, second = _colour_pair(rng)
    cell = int(rng.integers(8, 65))
    ox, oy = rng.integers(0, cell, size=2)
    ys, xs = np.mgrid[0:height, 0:width]
    parity = ((xs + ox) // cell + (ys + oy) // cell) % 2
    return _mix(first, second, parity.astype(np.float64))


def _background_stripes(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    first, second = _colour_pair(rng)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(10, 60)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    phase = ((xs * np.cos(angle) + ys * np.sin(angle)) / period + rng.random()) % 1.0
    return _mix(first, second, (phase < 0.5).astype(np.float64))


def _background_radial(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth radial gradient from a (possibly off-frame) centre to the farthest corner."""
    inner, outer = _colour_pair(rng)
    cx, cy = rng.uniform(-0.2, 1.2) * width, rng.uniform(-0.2, 1.2) * height
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    radius = np.hypot(xs - cx, ys - cy)
    return _mix(inner, outer, radius / radius.max())


def _background_blobs(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Low-frequency colour noise: a coarse random grid upsampled with smoothstep interpolation."""
    cells_x, cells_y = rng.integers(2, 7, size=2)
    base = _random_colour(rng)
    grid = np.clip(base + rng.uniform(-1, 1, size=(cells_y + 1, cells_x + 1, 3)) * rng.uniform(40, 110), 0, 255)

    def axis(n_pixels: int, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
        pos = (np.arange(n_pixels) + 0.5) / n_pixels * n_cells
        index = np.minimum(pos.astype(int), n_cells - 1)
        frac = pos - index
        return index, frac * frac * (3 - 2 * frac)

    iy, wy = axis(height, int(cells_y))
    ix, wx = axis(width, int(cells_x))
    wy, wx = wy[:, None, None], wx[None, :, None]
    top = grid[iy][:, ix] * (1 - wx) + grid[iy][:, ix + 1] * wx
    bottom = grid[iy + 1][:, ix] * (1 - wx) + grid[iy + 1][:, ix + 1] * wx
    return top * (1 - wy) + bottom * wy


def _background_pastel(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    colour = 0.35 * _random_colour(rng) + 0.65 * 255
    return np.broadcast_to(colour, (height, width, 3)).copy()


BACKGROUNDS = {
    "split": _background_split,
    "checker": _background_checker,
    "stripes": _background_stripes,
    "radial": _background_radial,
    "blobs": _background_blobs,
    "pastel": _background_pastel,
}


# ---------------------------------------------------------------------------------------------------------------
# Colours


def _contrast_score(colours: np.ndarray, surroundings: np.ndarray) -> np.ndarray:
    """How well each colour (K, C, 3: C colours that must all stand out) contrasts with the pixels (M, 3).

    >= 1 means every one of the C colours is MIN_MEAN_DISTANCE from their mean and MIN_LOW_DISTANCE from 98 % of
    them; the score is the worst of those ratios.
    """
    mean = surroundings.mean(axis=0)
    to_mean = np.linalg.norm(colours - mean, axis=-1) / MIN_MEAN_DISTANCE
    dist = np.linalg.norm(colours[:, :, None, :] - surroundings[None, None], axis=-1)
    low = np.percentile(dist, 2, axis=-1) / MIN_LOW_DISTANCE
    return np.minimum(to_mean, low).min(axis=1)


def _choose_fill(rng: np.random.Generator, style: str, surroundings: np.ndarray) -> dict:
    """Fill colours for `style` that contrast with the surroundings (the best of a batch of random candidates)."""
    centre = rng.integers(0, 256, size=(COLOUR_CANDIDATES, 3)).astype(np.float64)
    if style == "gradient":
        offset = rng.uniform(-80, 80, size=(COLOUR_CANDIDATES, 3))
        start, end = np.clip(centre - offset, 0, 255), np.clip(centre + offset, 0, 255)
        centre = (start + end) / 2
        candidates = np.stack([start, end, centre], axis=1)
    else:
        candidates = centre[:, None, :]
    scores = _contrast_score(candidates, surroundings)
    passing = np.flatnonzero(scores >= 1.0)
    best = int(passing[0]) if passing.size else int(np.argmax(scores))
    fill = {"colour": centre[best]}
    if style == "gradient":
        fill["start"], fill["end"] = candidates[best, 0], candidates[best, 1]
    if style == "outline":
        colour = centre[best]
        dark = colour * rng.uniform(0.15, 0.35)
        light = colour + (255 - colour) * rng.uniform(0.7, 0.9)
        first, second = (dark, light) if rng.random() < 0.5 else (light, dark)
        # An outline that merges with the fill or with the background would not read as an outline.
        mean = surroundings.mean(axis=0)
        if min(np.linalg.norm(first - colour), np.linalg.norm(first - mean)) < 60:
            first = second
        fill["outline"] = first
    return fill


# ---------------------------------------------------------------------------------------------------------------
# Images


def _box_blur(image: np.ndarray) -> np.ndarray:
    """3 x 3 mean filter, edges replicated."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)) / 9.0


def _place(rng: np.random.Generator, owner: np.ndarray, full_areas: list[int], mask: np.ndarray) -> tuple | None:
    """A random integer offset (x, y) of the patch `mask` inside the frame that leaves every earlier object at
    least MIN_VISIBLE of its pixels, or None when PLACEMENT_TRIES random offsets all fail."""
    height, width = owner.shape
    patch_h, patch_w = mask.shape
    visible = np.bincount(owner.ravel(), minlength=len(full_areas) + 1)
    for _ in range(PLACEMENT_TRIES):
        ox, oy = int(rng.integers(0, width - patch_w + 1)), int(rng.integers(0, height - patch_h + 1))
        covered = np.bincount(owner[oy:oy + patch_h, ox:ox + patch_w][mask], minlength=len(full_areas) + 1)
        left = visible[1:] - covered[1:]
        if all(left[k] >= MIN_VISIBLE * full_areas[k] for k in range(len(full_areas))):
            return ox, oy
    return None


def render_image(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[dict]]:
    """One image (height, width, 3) uint8 and its objects: dicts with "category_id", "mask" (the visible pixels,
    a full-frame bool array), "colour" and "fill"."""
    background = list(BACKGROUNDS)[rng.integers(0, len(BACKGROUNDS))]
    canvas = BACKGROUNDS[background](rng, width, height).astype(np.float64)
    owner = np.zeros((height, width), dtype=np.int32)  # 1 + index of the object that owns each pixel, 0 = none
    objects: list[dict] = []
    full_areas: list[int] = []

    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        category = int(rng.integers(0, len(CATEGORIES)))
        unit = unit_vertices(CATEGORIES[category], rng)
        angle = rng.uniform(0, 2 * np.pi)
        if unit is not None:
            rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            unit = unit @ rotation.T
            low, high = unit.min(axis=0), unit.max(axis=0)
        else:
            low, high = np.array([-1.0, -1.0]), np.array([1.0, 1.0])
        # Scale so the box covers a log-uniform fraction of the frame, then shrink if it would not fit.
        fraction = math.exp(rng.uniform(math.log(AREA_FRACTION[0]), math.log(AREA_FRACTION[1])))
        box_w, box_h = high - low
        scale = math.sqrt(fraction * width * height / (box_w * box_h))
        scale = min(scale, (width - 4) / box_w, (height - 4) / box_h)
        vertices = None if unit is None else unit * scale
        sdf = make_sdf(vertices, scale)

        # Rasterise once at a random sub-pixel phase; placements are then whole-pixel shifts of the same patch.
        fx, fy = rng.random(2)
        left, top = math.floor(fx + low[0] * scale) - 1, math.floor(fy + low[1] * scale) - 1
        patch_w = math.ceil(fx + high[0] * scale) + 1 - left
        patch_h = math.ceil(fy + high[1] * scale) + 1 - top
        cx, cy = fx - left, fy - top
        style = FILL_STYLES[rng.choice(len(FILL_STYLES), p=FILL_PROBABILITIES)]
        outline = float(rng.integers(2, 5)) if style == "outline" else 0.0
        inradius = -float(sdf(np.zeros(1), np.zeros(1))[0])
        if style == "outline" and inradius < 3 * outline:
            style, outline = "flat", 0.0  # too small for an outline to leave any fill
        gradient = None
        if style == "gradient":
            direction = rng.uniform(0, 2 * np.pi)
            ux, uy = math.cos(direction), math.sin(direction)
            half = scale if vertices is None else float(np.abs(vertices @ np.array([ux, uy])).max())
            gradient = (ux, uy, half)
        coverage, band, weight = rasterize(sdf, patch_w, patch_h, cx, cy, outline, gradient)
        mask = coverage >= 0.5
        if mask.sum() < 4:
            continue

        offset = _place(rng, owner, full_areas, mask)
        if offset is None:
            continue  # nowhere to put it without hiding too much of an earlier object: leave it out
        ox, oy = offset
        box = (slice(max(oy - CONTRAST_MARGIN, 0), oy + patch_h + CONTRAST_MARGIN),
               slice(max(ox - CONTRAST_MARGIN, 0), ox + patch_w + CONTRAST_MARGIN))
        surroundings = canvas[box].reshape(-1, 3)
        stride = max(1, len(surroundings) // 2000)  # a subsample is enough to judge the contrast
        fill = _choose_fill(rng, style, surroundings[::stride])

        if style == "gradient":
            paint = fill["start"] * coverage[..., None] + (fill["end"] - fill["start"]) * weight[..., None]
        elif style == "outline":
            paint = fill["colour"] * (coverage - band)[..., None] + fill["outline"] * band[..., None]
        else:
            paint = fill["colour"] * coverage[..., None]
        region = (slice(oy, oy + patch_h), slice(ox, ox + patch_w))
        canvas[region] = canvas[region] * (1 - coverage[..., None]) + paint
        owner[region][mask] = len(objects) + 1
        full_areas.append(int(mask.sum()))
        objects.append({"category_id": category + 1, "colour": [int(round(c)) for c in fill["colour"]],
                        "fill": style})

    effect = rng.random()
    if effect < 0.25:
        canvas = _box_blur(canvas)
    elif effect < 0.5:
        canvas = canvas + rng.normal(0, rng.uniform(3, 8), size=canvas.shape)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    for index, obj in enumerate(objects):
        obj["mask"] = owner == index + 1
    return image, objects


def _check_arguments(n_images: int, sizes) -> None:
    if int(n_images) != n_images or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}")
    if len(sizes) == 0:
        raise ValueError("sizes must list at least one (width, height)")
    for size in sizes:
        width, height = size
        if min(width, height) < MIN_SIDE:
            raise ValueError(f"image size {size} is too small: width and height must be at least {MIN_SIDE} px")
        if width % 2 or height % 2:
            raise ValueError(f"image size {size} has an odd width or height; both must be even")


def write_holdout_dataset(out_dir: str | Path, n_images: int, seed: int = 0, sizes=DEFAULT_SIZES) -> Path:
    """Render `n_images` images into out_dir/images/NNNNNN.png with COCO annotations in out_dir/annotations.json.

    Image i has size sizes[i % len(sizes)] (width, height) and is drawn from np.random.default_rng([seed, i]), so
    any one image can be regenerated alone. Returns out_dir.
    """
    _check_arguments(n_images, sizes)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(int(n_images)):
        width, height = (int(v) for v in sizes[image_id % len(sizes)])
        image, objects = render_image(np.random.default_rng([seed, image_id]), width, height)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(image).save(out_dir / "images" / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            mask = obj["mask"]
            ys, xs = np.nonzero(mask)
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": obj["category_id"],
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
                         float(ys.max() + 1 - ys.min())],
                "area": int(mask.sum()),
                "iscrowd": 0,
                "segmentation": rle,
                "colour": obj["colour"],
                "fill": obj["fill"],
            })
    categories = [{"id": i + 1, "name": name, "isthing": 1} for i, name in enumerate(CATEGORIES)]
    document = {"images": images, "annotations": annotations, "categories": categories}
    (out_dir / "annotations.json").write_text(json.dumps(document))
    return out_dir
