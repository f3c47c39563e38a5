"""Procedural "shapes" data: images and videos with exact COCO detection and panoptic ground truth.

The project ships no downloaded data, so this generator is what the bundled model is trained and evaluated on.
A scene is a background split into textured "stuff" bands (sky / grass / water / sand) by wavy boundaries, with
flat-coloured "thing" polygons (circle, square, triangle, star, hexagon, diamond) drawn on top; later shapes occlude
earlier ones. Rendering goes through an integer label map drawn without anti-aliasing, so the image, the boxes and
the panoptic map agree pixel for pixel: every pixel of a thing segment has exactly that thing's colour.
"""
from __future__ import annotations

import colorsys
import json
import math
import multiprocessing
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from model.coco_format import id_to_rgb, mask_to_rle, segment_bbox

# Category ids start at 1 so that `num_labels = max id + 1` covers them with a sigmoid classifier; label 0 is an
# unused "N/A" slot, the same convention as the COCO checkpoints (which have no "no-object" logit either).
CATEGORIES = [
    {"id": 1, "name": "circle", "isthing": 1},
    {"id": 2, "name": "square", "isthing": 1},
    {"id": 3, "name": "triangle", "isthing": 1},
    {"id": 4, "name": "star", "isthing": 1},
    {"id": 5, "name": "hexagon", "isthing": 1},
    {"id": 6, "name": "diamond", "isthing": 1},
    {"id": 7, "name": "sky", "isthing": 0},
    {"id": 8, "name": "grass", "isthing": 0},
    {"id": 9, "name": "water", "isthing": 0},
    {"id": 10, "name": "sand", "isthing": 0},
]
NUM_LABELS = max(c["id"] for c in CATEGORIES) + 1
ID2LABEL = {0: "N/A", **{c["id"]: c["name"] for c in CATEGORIES}}
THING_IDS = [c["id"] for c in CATEGORIES if c["isthing"]]
STUFF_IDS = [c["id"] for c in CATEGORIES if not c["isthing"]]

# Mean colour and texture of each stuff class; things are drawn with saturated colours so they stand out.
STUFF_COLOURS = {7: (150, 190, 235), 8: (70, 125, 55), 9: (35, 75, 125), 10: (200, 180, 120)}
_CIRCLE_VERTICES = 64


@dataclass(frozen=True)
class Shape:
    """One thing instance: its geometry in pixels and, for videos, its constant velocity and spin."""

    category_id: int
    center: tuple[float, float]
    radius: float
    angle: float
    colour: tuple[int, int, int]
    velocity: tuple[float, float] = (0.0, 0.0)
    spin: float = 0.0

    def scaled(self, factor: float) -> "Shape":
        """The same shape on a canvas `factor` times larger."""
        return replace(self, center=(self.center[0] * factor, self.center[1] * factor), radius=self.radius * factor)


@dataclass
class Scene:
    """A static textured background with its stuff label map, and the shapes drawn over it (back to front)."""

    background: np.ndarray  # (H, W, 3) uint8
    stuff_map: np.ndarray  # (H, W) int32 stuff category id of every pixel
    shapes: list[Shape]

    @property
    def size(self) -> tuple[int, int]:
        height, width = self.stuff_map.shape
        return width, height


def shape_polygon(shape: Shape) -> list[tuple[float, float]]:
    """Vertices of a shape's outline, rotated by its angle around its centre."""
    corners = {1: _CIRCLE_VERTICES, 2: 4, 3: 3, 4: 10, 5: 6, 6: 4}[shape.category_id]
    radii = np.full(corners, shape.radius)
    if shape.category_id == 4:  # star: alternate outer and inner radius
        radii[1::2] *= 0.45
    if shape.category_id == 6:  # diamond: a rhombus, longer along one axis
        radii[1::2] *= 0.6
    theta = shape.angle + 2 * math.pi * np.arange(corners) / corners
    if shape.category_id == 2:  # square: corners at 45 degrees so angle 0 is axis-aligned
        theta = theta + math.pi / 4
    cx, cy = shape.center
    return list(zip((cx + radii * np.cos(theta)).tolist(), (cy + radii * np.sin(theta)).tolist()))


def stuff_bands(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Split the frame into 2 or 3 horizontal bands of different stuff classes with wavy boundaries."""
    n_bands = int(rng.integers(2, 4))
    classes = rng.choice(STUFF_IDS, size=n_bands, replace=False)
    levels = np.sort(rng.uniform(0.2, 0.8, size=n_bands - 1)) * height
    x = np.arange(width)
    ys = np.arange(height)[:, None]
    band = np.zeros((height, width), dtype=np.int32)
    for level in levels:
        amplitude = rng.uniform(0.01, 0.06) * height
        wavelength = rng.uniform(0.3, 1.2) * width
        boundary = level + amplitude * np.sin(2 * math.pi * x / wavelength + rng.uniform(0, 2 * math.pi))
        band += ys >= boundary[None, :]
    return classes[band].astype(np.int32)


def stuff_texture(rng: np.random.Generator, stuff_map: np.ndarray,
                  colours: dict[int, tuple[float, float, float]] = STUFF_COLOURS) -> np.ndarray:
    """Paint each stuff class with its colour (`colours`: mean RGB per class), a class-specific pattern and noise."""
    height, width = stuff_map.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    patterns = {
        7: (yy / height - 0.5) * -40,  # sky: lighter towards the top
        8: 12 * np.sin(xx / 3.0 + rng.uniform(0, 6)) * np.sin(yy / 7.0),  # grass: blades
        9: 18 * np.sin(yy / 5.0 + 2 * np.sin(xx / 40.0)),  # water: ripples
        10: 10 * np.sin((xx + yy) / 9.0),  # sand: diagonal dunes
    }
    image = np.zeros((height, width, 3), dtype=np.float32)
    for category_id in np.unique(stuff_map):
        region = stuff_map == category_id
        colour = np.array(colours[int(category_id)], dtype=np.float32)
        image[region] = colour + patterns[int(category_id)][region][:, None]
    image += rng.normal(0, 6, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated, bright colour (HSV with s, v in [0.65, 1]) so things differ from the muted stuff textures."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.65, 1), rng.uniform(0.65, 1))
    return tuple(int(round(255 * c)) for c in rgb)


def random_scene(rng: np.random.Generator, width: int, height: int, max_objects: int = 6,
                 max_speed: float = 0.0) -> Scene:
    """Sample a background and 1..max_objects shapes; `max_speed` (pixels per frame) > 0 gives them motion."""
    if width < 16 or height < 16:
        raise ValueError(f"shapes scenes need at least 16x16 pixels, got {width}x{height}")
    stuff_map = stuff_bands(rng, width, height)
    short = min(width, height)
    shapes = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        radius = rng.uniform(0.06, 0.16) * short
        speed, heading = rng.uniform(0.3, 1.0) * max_speed, rng.uniform(0, 2 * math.pi)
        shapes.append(Shape(
            category_id=int(rng.choice(THING_IDS)),
            center=(rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)),
            radius=radius,
            angle=rng.uniform(0, 2 * math.pi),
            colour=_random_colour(rng),
            velocity=(speed * math.cos(heading), speed * math.sin(heading)),
            spin=rng.uniform(-0.03, 0.03) if max_speed > 0 else 0.0,
        ))
    return Scene(stuff_texture(rng, stuff_map), stuff_map, shapes)


def advance(scene: Scene, margin: float = 0.0) -> Scene:
    """Move every shape by one frame: constant velocity and spin, bouncing off walls `margin` pixels outside the
    frame edges (0: the edges; beyond a shape's diameter, shapes leave the view and come back)."""
    width, height = scene.size
    moved = []
    for shape in scene.shapes:
        (x, y), (vx, vy), r = shape.center, shape.velocity, shape.radius
        x, y = x + vx, y + vy
        low, right, bottom = r - margin, width - r + margin, height - r + margin
        # Reflect the position and the velocity at a wall so the motion stays smooth.
        if x < low or x > right:
            vx, x = -vx, (2 * low - x if x < low else 2 * right - x)
        if y < low or y > bottom:
            vy, y = -vy, (2 * low - y if y < low else 2 * bottom - y)
        moved.append(replace(shape, center=(x, y), velocity=(vx, vy), angle=shape.angle + shape.spin))
    return Scene(scene.background, scene.stuff_map, moved)


def draw_labels(scene: Scene, scale: float = 1.0) -> np.ndarray:
    """(H, W) int32 map of the shape drawn at each pixel: 1 + its index in `scene.shapes`, 0 where none is.

    Drawn without anti-aliasing, later shapes over earlier ones (occlusion). `scale` draws the scene's geometry
    scaled by that factor on a canvas of the scaled size (`shapes_varied` renders big and labels at final size)."""
    width, height = scene.size
    labels = Image.new("I", (round(width * scale), round(height * scale)), 0)
    draw = ImageDraw.Draw(labels)
    for index, shape in enumerate(scene.shapes, start=1):
        draw.polygon(shape_polygon(shape.scaled(scale)), fill=index)
    return np.asarray(labels, dtype=np.int32)


def ground_truth(shapes: list[Shape], label_map: np.ndarray, stuff_map: np.ndarray) -> dict:
    """The annotations of a drawn scene (see `render`); stuff id 0 in `stuff_map` is void: no segment."""
    height, width = label_map.shape
    panoptic = np.zeros((height, width), dtype=np.int32)
    objects, segments = [], []
    for index, shape in enumerate(shapes, start=1):
        mask = label_map == index
        if not mask.any():
            continue
        segment_id = len(segments) + 1
        panoptic[mask] = segment_id
        area, bbox = int(mask.sum()), segment_bbox(mask)
        objects.append({"category_id": shape.category_id, "bbox": bbox, "area": area, "iscrowd": 0,
                        "segmentation": mask_to_rle(mask), "track": index - 1})
        segments.append({"id": segment_id, "category_id": shape.category_id, "iscrowd": 0, "bbox": bbox,
                         "area": area})
    for category_id in np.unique(stuff_map).tolist():
        mask = (stuff_map == category_id) & (label_map == 0)
        if category_id == 0 or not mask.any():
            continue
        segment_id = len(segments) + 1
        panoptic[mask] = segment_id
        segments.append({"id": segment_id, "category_id": int(category_id), "iscrowd": 0,
                         "bbox": segment_bbox(mask), "area": int(mask.sum())})
    return {"objects": objects, "panoptic": panoptic, "segments_info": segments}


def render(scene: Scene) -> tuple[np.ndarray, dict]:
    """Draw a scene with flat-coloured shapes. Returns the RGB image (H, W, 3) uint8 and its ground truth:

    `objects`: COCO detection annotations of the visible things (bbox xywh, area, category_id, iscrowd 0,
    segmentation as RLE with an ASCII `counts`, track = index of the shape in the scene); fully occluded shapes
    are dropped. `panoptic`: (H, W) int32 segment id map (0 = void: pixels of no stuff class, which `random_scene`
    never makes); `segments_info`: COCO panoptic segments (id, category_id, iscrowd, bbox, area) for the visible
    things and stuff classes.
    """
    label_map = draw_labels(scene)
    palette = np.array([(0, 0, 0)] + [s.colour for s in scene.shapes], dtype=np.uint8)
    image = np.where(label_map[..., None] > 0, palette[label_map], scene.background)
    return image, ground_truth(scene.shapes, label_map, scene.stuff_map)


def render_scene(rng: np.random.Generator, width: int, height: int, max_objects: int = 6) -> tuple[np.ndarray, dict]:
    """Sample and draw one still scene (see `render` for the ground-truth format)."""
    return render(random_scene(rng, width, height, max_objects))


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    width, height = (size, size) if isinstance(size, int) else size
    if width % 2 or height % 2:
        raise ValueError(f"size must have even width and height (H.264 4:2:0 needs it), got {width}x{height}")
    return width, height


def write_dataset(out_dir: str | Path, n_images: int, size: int | tuple[int, int] = 320, seed: int = 0,
                  max_objects: int = 6, workers: int = 1, varied: bool = False) -> Path:
    """Write a COCO-format shapes dataset (`varied`: the training scenes of `shapes_varied`, with `size` their shorter
    side and a random aspect ratio per image; otherwise `render_scene`'s look at `size`):

    out_dir/images/NNNNNN.png, out_dir/annotations.json (detection, thing categories only, RLE segmentation),
    out_dir/panoptic/NNNNNN.png and out_dir/panoptic.json (panoptic, all categories). Image i is drawn from the
    generator seeded with (seed, i), so a dataset is reproducible and datasets with different seeds are disjoint;
    `workers` processes render the images in parallel (same files as one). They are spawned, so a script that
    passes workers > 1 must call this under `if __name__ == "__main__":` (`python -c` needs nothing).
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    if varied and not isinstance(size, int):
        raise ValueError(f"a varied dataset takes the shorter side as its size (an int), got {size}")
    width, height = _size(size)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "panoptic").mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, seed, image_id, width, height, max_objects, varied) for image_id in range(n_images)]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            records = pool.starmap(_write_image, jobs, chunksize=16)
    else:
        records = [_write_image(*job) for job in jobs]
    images, detections, panoptic_annotations = [], [], []
    for image, objects, panoptic in records:
        images.append(image)
        detections += [{"id": len(detections) + i + 1, "image_id": image["id"], **obj} for i, obj in enumerate(objects)]
        panoptic_annotations.append(panoptic)
    things = [c for c in CATEGORIES if c["isthing"]]
    (out_dir / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": detections, "categories": things}))
    (out_dir / "panoptic.json").write_text(json.dumps(
        {"images": images, "annotations": panoptic_annotations, "categories": CATEGORIES}))
    return out_dir


def _write_image(out_dir: Path, seed: int, image_id: int, width: int, height: int, max_objects: int,
                 varied: bool) -> tuple[dict, list[dict], dict]:
    """Render image `image_id` of a dataset, save its PNGs; returns its COCO image, objects and panoptic records."""
    rng = np.random.default_rng([seed, image_id])
    if varied:
        from model.training.shapes_varied import render_varied  # it builds on this module

        image, truth = render_varied(rng, width, max_objects)
        height, width = image.shape[:2]
    else:
        image, truth = render_scene(rng, width, height, max_objects)
    file_name = f"{image_id:06d}.png"
    Image.fromarray(image).save(out_dir / "images" / file_name)
    Image.fromarray(id_to_rgb(truth["panoptic"])).save(out_dir / "panoptic" / file_name)
    objects = [{k: v for k, v in obj.items() if k != "track"} for obj in truth["objects"]]
    return ({"id": image_id, "file_name": file_name, "width": width, "height": height}, objects,
            {"image_id": image_id, "file_name": file_name, "segments_info": truth["segments_info"]})


def write_sample_video(path: str | Path, seconds: float = 10.0, size: tuple[int, int] = (1280, 720), seed: int = 0,
                       fps: int = 25, max_objects: int = 6, speed: float = 1.0, margin: float = 0.0) -> Path:
    """Encode an H.264 MP4 of moving shapes and write its per-frame ground truth to `<path>.gt.json`.

    `max_objects`, `speed` (a factor on the default speed) and `margin` (see `advance`: shapes leave the view and
    come back) make harder tracking scenes: more occlusions, crossing paths, exits and re-entries.

    The MP4 is written with `+faststart` (index at the front) so it can be streamed over HTTP. Ground truth:
    {"fps", "width", "height", "categories", "frames": [{"frame_index", "pts", "objects": [...]}]} with the
    detection annotations of `render` (without RLE, to keep the file small); `track` follows a shape across frames,
    and `full_bbox` ([x, y, w, h], possibly beyond the frame) is the whole shape's box, occluded parts included.
    """
    import av  # here, not at the top: `model` must import without PyAV

    if seconds <= 0 or fps <= 0:
        raise ValueError(f"seconds and fps must be positive, got seconds={seconds} fps={fps}")
    width, height = _size(size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scene = random_scene(np.random.default_rng(seed), width, height, max_objects=max_objects,
                         max_speed=0.01 * min(width, height) * 25 / fps * speed)
    frames = []
    with av.open(str(path), mode="w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20"}
        for index in range(max(1, round(seconds * fps))):
            image, truth = render(scene)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
            objects = [{**{k: v for k, v in obj.items() if k != "segmentation"},
                        "full_bbox": _full_bbox(scene.shapes[obj["track"]])} for obj in truth["objects"]]
            frames.append({"frame_index": index, "pts": index / fps, "objects": objects})
            scene = advance(scene, margin)
        container.mux(stream.encode(None))
    gt = {"fps": fps, "width": width, "height": height, "categories": CATEGORIES, "frames": frames}
    Path(f"{path}.gt.json").write_text(json.dumps(gt))
    return path


def _full_bbox(shape: Shape) -> list[float]:
    xs, ys = zip(*shape_polygon(shape))
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def video_to_dataset(videos: list[str | Path], out_dir: str | Path) -> Path:
    """Turn videos of `write_sample_video` and their `<video>.gt.json` into one COCO detection dataset (the layout
    of `write_dataset`, without panoptic files) that `evaluate` reads: every decoded frame as a PNG, as the pipeline's
    decoder sees it after H.264, with the frame's ground-truth boxes."""
    import av

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, categories = [], [], []
    for video in videos:
        gt_path = Path(f"{video}.gt.json")
        if not gt_path.is_file():
            raise FileNotFoundError(f"{gt_path} not found: expected a video written by `cdetr sample-video`")
        gt = json.loads(gt_path.read_text())
        categories = [c for c in gt["categories"] if c["isthing"]]
        with av.open(str(video)) as container:
            frames = list(container.decode(video=0))
        if len(frames) != len(gt["frames"]):
            raise ValueError(f"{video} decoded to {len(frames)} frames but its ground truth has {len(gt['frames'])}")
        for frame, truth in zip(frames, gt["frames"]):
            image_id = len(images)
            file_name = f"{image_id:06d}.png"
            frame.to_image().save(out_dir / "images" / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": frame.width, "height": frame.height})
            for obj in truth["objects"]:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    **{k: obj[k] for k in ("category_id", "bbox", "area", "iscrowd")}})
    (out_dir / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return out_dir
