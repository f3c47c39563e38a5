"""Training scenes that look like the pipeline's frames: the geometry of `shapes`, varied appearance.

The first bundled model saw only 256x256 images of one look (flat saturated shapes on stuff bands) and learned
shortcuts: a circle's box has equal *normalized* width and height, which is 1.8x too wide on a 16:9 frame
(model/weights/EVAL.md). A varied scene changes everything the label does not depend on:

- canvas: 16:9, 4:3, 9:16 or square; objects whose box covers ~2% to ~40% of the frame, overlapping;
- background: the labelled stuff bands (colours jittered) or an unlabelled (void) one: flat, gradient, smooth
  noise, stripes / checks, or clutter (ellipses, bars and lines that are no class);
- objects: flat, gradient or noisy fill in any colour that stands out from what is under it, with or without an
  outline (drawn inside the shape, so the masks do not change);
- the camera and the codec: colour jitter, blur, sensor noise, JPEG or H.264 (through PyAV) compression, and the
  decoder's own resize path (the scene drawn 1.5-3x larger, then scaled down by swscale as `pipeline.decoder`
  does for `decoder.output: rgb`; the labels are drawn at the final size).

The labels come from the same integer label map as `shapes.render`, so they stay exact.
"""
from __future__ import annotations

import colorsys
import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from model.training import shapes

ASPECTS = ((16, 9), (4, 3), (9, 16), (1, 1))
_BOX_AREA = (0.02, 0.40)  # fraction of the frame covered by an object's (unrotated) box, sampled log-uniformly


def canvas_size(rng: np.random.Generator, short_side: int) -> tuple[int, int]:
    """(width, height), both even, of a random aspect ratio from ASPECTS with the given shorter side."""
    a, b = ASPECTS[int(rng.integers(len(ASPECTS)))]
    long_side = 2 * round(short_side * max(a, b) / min(a, b) / 2)
    return (long_side, short_side) if a >= b else (short_side, long_side)


def _colour(rng: np.random.Generator, saturation=(0.15, 1.0), value=(0.25, 1.0)) -> np.ndarray:
    return 255 * np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*saturation), rng.uniform(*value)))


def _gradient(rng: np.random.Generator, width: int, height: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A linear gradient from colour a to b along a random direction, (H, W, 3) float."""
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    return a + t[..., None] * (b - a)


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a random grid of `cells` across, bilinearly upsampled, (H, W) float."""
    grid = rng.uniform(0, 255, size=(max(2, cells * height // width), max(2, cells))).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC), np.float32) / 127.5 - 1


def _plain_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """An unlabelled background: flat, gradient, smooth noise, stripes/checks or clutter. (H, W, 3) float."""
    kind = rng.choice(["flat", "gradient", "noise", "pattern", "clutter"])
    base = _colour(rng)
    if kind == "flat":
        return np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if kind == "gradient":
        return _gradient(rng, width, height, base, _colour(rng))
    if kind == "noise":
        amplitude = rng.uniform(20, 70)
        return base + amplitude * _smooth_noise(rng, width, height, int(rng.integers(3, 12)))[..., None]
    if kind == "pattern":  # stripes (one direction) or checks (two), at a random period and angle
        period, angle = rng.uniform(6, 40), rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        wave = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
        if rng.uniform() < 0.5:
            wave = wave * np.sin(2 * math.pi * (-xx * math.sin(angle) + yy * math.cos(angle)) / period)
        mix = (wave > 0).astype(np.float32)[..., None]
        return base * mix + _colour(rng) * (1 - mix)
    image = Image.fromarray(_gradient(rng, width, height, base, _colour(rng)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    for _ in range(int(rng.integers(4, 16))):  # distractors: elongated ellipses, bars and lines (no class)
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        long_r = rng.uniform(0.03, 0.2) * short
        short_r = long_r * rng.uniform(0.15, 0.5)
        fill = tuple(int(c) for c in _colour(rng))
        shape = rng.choice(["ellipse", "bar", "line"])
        if shape == "ellipse":
            draw.ellipse([x - long_r, y - short_r, x + long_r, y + short_r], fill=fill)
        elif shape == "bar":
            draw.rectangle([x - short_r, y - long_r, x + short_r, y + long_r], fill=fill)
        else:
            draw.line([x, y, x + rng.uniform(-2, 2) * long_r, y + rng.uniform(-2, 2) * long_r], fill=fill,
                      width=int(rng.integers(1, 5)))
    return np.asarray(image, np.float32)


def _stuff_background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The labelled stuff bands of `shapes`, each class's colour jittered. (image float, stuff map)."""
    stuff_map = shapes.stuff_bands(rng, width, height)
    colours = {}
    for category_id, rgb in shapes.STUFF_COLOURS.items():
        h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
        h, s, v = (h + rng.uniform(-0.04, 0.04)) % 1, s * rng.uniform(0.7, 1.3), v * rng.uniform(0.75, 1.2)
        colours[category_id] = tuple(255 * c for c in colorsys.hsv_to_rgb(h, min(s, 1), min(v, 1)))
    return shapes.stuff_texture(rng, stuff_map, colours).astype(np.float32), stuff_map


def _place_shapes(rng: np.random.Generator, background: np.ndarray, scale: float,
                  max_objects: int) -> list[shapes.Shape]:
    """1..max_objects shapes (final-frame pixels) of any size in _BOX_AREA, fully inside the frame, each with a
    colour that differs (RGB distance >= 80) from the mean background under it, so no label marks an invisible
    object. `background` is the image drawn at `scale` times the frame."""
    height, width = round(background.shape[0] / scale), round(background.shape[1] / scale)
    placed = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        fraction = math.exp(rng.uniform(*np.log(_BOX_AREA)))
        radius = min(math.sqrt(fraction * width * height) / 2, 0.48 * min(width, height))
        cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        under = background[int((cy - radius) * scale):int((cy + radius) * scale) + 1,
                           int((cx - radius) * scale):int((cx + radius) * scale) + 1]
        mean = under.reshape(-1, 3).mean(0)
        colour = _colour(rng)
        for _ in range(20):
            if np.linalg.norm(colour - mean) >= 80:
                break
            colour = _colour(rng)
        placed.append(shapes.Shape(category_id=int(rng.choice(shapes.THING_IDS)), center=(cx, cy), radius=radius,
                                   angle=rng.uniform(0, 2 * math.pi), colour=tuple(int(c) for c in colour)))
    return placed


def _paint_shapes(rng: np.random.Generator, image: np.ndarray, label_map: np.ndarray,
                  placed: list[shapes.Shape], scale: float) -> np.ndarray:
    """Fill every shape's pixels (flat, gradient or noisy) and maybe outline it inside its own mask."""
    height, width = label_map.shape
    for index, shape in enumerate(placed, start=1):
        mask = label_map == index
        if not mask.any():
            continue
        colour = np.array(shape.colour, np.float32)
        style = rng.choice(["flat", "gradient", "noise"], p=[0.5, 0.25, 0.25])
        if style == "gradient":  # towards a lighter or darker shade of the same colour
            fill = _gradient(rng, width, height, colour, colour * rng.uniform(0.4, 1.6))[mask]
        elif style == "noise":
            fill = colour + rng.uniform(10, 35) * _smooth_noise(rng, width, height, 24)[mask][:, None]
        else:
            fill = colour
        image[mask] = fill
        if rng.uniform() < 0.3:
            outline = Image.new("L", (width, height), 0)
            points = shapes.shape_polygon(shape.scaled(scale))
            ImageDraw.Draw(outline).line(points + points[:1], fill=1, width=max(1, round(rng.uniform(1, 4) * scale)))
            edge = (np.asarray(outline) > 0) & mask
            image[edge] = rng.choice([0.0, 255.0]) * 0.85 + colour * 0.15
    return image


def _camera(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Colour jitter, then maybe blur and sensor noise. float in, uint8 out."""
    if rng.uniform() < 0.8:
        gray = image.mean(-1, keepdims=True)
        image = gray + (image - gray) * rng.uniform(0.6, 1.4)  # saturation
        image = (image - 128) * rng.uniform(0.7, 1.3) + 128 + rng.uniform(-30, 30)  # contrast, brightness
    if rng.uniform() < 0.3:
        image = image + rng.normal(0, rng.uniform(2, 10), size=image.shape)
    out = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    if rng.uniform() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.6)))
    return np.asarray(out)


def h264_round_trip(image: np.ndarray, crf: int) -> np.ndarray:
    """Encode one frame with libx264 (yuv420p, an I-frame at `crf`) and decode it again, with PyAV."""
    import av  # here, not at the top: `model` must import without PyAV

    height, width = image.shape[:2]
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency"}
    packets = encoder.encode(av.VideoFrame.from_ndarray(image, format="rgb24")) + encoder.encode(None)
    decoder = av.CodecContext.create("h264", "r")
    frames = [f for packet in packets for f in decoder.decode(packet)] + decoder.decode(None)
    return frames[0].to_ndarray(format="rgb24")


def _codec(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Maybe JPEG- or H.264-compress the frame (the artefacts a camera stream carries)."""
    draw = rng.uniform()
    if draw < 0.25:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(rng.integers(15, 70)))
        return np.asarray(Image.open(buffer).convert("RGB"))
    if draw < 0.55:
        return h264_round_trip(image, int(rng.integers(24, 40)))
    return image


def swscale_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale an RGB frame the way the decoder does for `decoder.output: rgb` (swscale through PyAV's reformat)."""
    import av

    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()


def render_varied(rng: np.random.Generator, short_side: int, max_objects: int = 6) -> tuple[np.ndarray, dict]:
    """One varied training scene (see the module docstring) with `shapes.render`'s ground truth; one in five
    keeps the original look (`shapes.render_scene`) on the random canvas, so the old test set stays covered."""
    width, height = canvas_size(rng, short_side)
    if rng.uniform() < 0.2:
        return shapes.render_scene(rng, width, height, max_objects)
    scale = rng.uniform(1.5, 3.0) if rng.uniform() < 0.35 else 1.0  # drawn big, scaled down by the decoder's path
    big_w, big_h = round(width * scale), round(height * scale)
    if rng.uniform() < 0.5:
        background, big_stuff = _stuff_background(rng, big_w, big_h)
    else:
        background, big_stuff = _plain_background(rng, big_w, big_h), np.zeros((big_h, big_w), np.int32)
    stuff_map = np.asarray(Image.fromarray(big_stuff).resize((width, height), Image.Resampling.NEAREST), np.int32)
    # Geometry in final-frame pixels: drawn at `scale` for the image, at 1 for the labels.
    scene = shapes.Scene(background, stuff_map, _place_shapes(rng, background, scale, max_objects))
    big_labels = shapes.draw_labels(scene, scale)
    image = _camera(rng, _paint_shapes(rng, background.copy(), big_labels, scene.shapes, scale))
    if scale != 1.0:
        image = swscale_resize(image, width, height)
    return _codec(rng, image), shapes.ground_truth(scene.shapes, shapes.draw_labels(scene), stuff_map)
