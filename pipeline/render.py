"""Drawing results: boxes and panoptic overlays on images, and annotated videos from the results in Redis."""
import argparse
import base64
import io
import json
import sys
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from model.coco_format import rgb_to_id
from pipeline.redis_server import resolve_redis_url
from pipeline.schema import Detection, FrameResult, Panoptic
from pipeline.sink import RedisSink, connect
from pipeline.wire import DEFAULT_PREFIX, JSON_FIELD, TYPE_FIELD

_PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                     (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)],
                    dtype=np.uint8)


def draw_detections(image: Image.Image, detections: list[Detection]) -> Image.Image:
    """A copy of `image` with each box and its `label score` (boxes are in the image's pixels)."""
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    for d in detections:
        colour = tuple(int(c) for c in _PALETTE[d.label % len(_PALETTE)])
        draw.rectangle(d.box, outline=colour, width=2)
        draw.text((d.box[0] + 3, d.box[1] + 2), f"{d.label_name} {d.score:.2f}", fill=colour)
    return image


def draw_panoptic(image: Image.Image, panoptic: Panoptic, alpha: float = 0.45) -> Image.Image:
    """Blend a colour per segment over `image` (the PNG is at model resolution: scaled with nearest neighbour)."""
    png = Image.open(io.BytesIO(base64.b64decode(panoptic.png))).convert("RGB").resize(image.size, Image.NEAREST)
    ids = rgb_to_id(np.asarray(png))
    category = {s.id: s.category_id for s in panoptic.segments}
    colours = np.zeros((*ids.shape, 3), np.uint8)
    for segment_id, category_id in category.items():
        colours[ids == segment_id] = _PALETTE[category_id % len(_PALETTE)]
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    covered = (ids > 0)[..., None]
    blended = np.where(covered, base * (1 - alpha) + colours * alpha, base)
    return Image.fromarray(blended.astype(np.uint8))


def annotate(image: Image.Image, result: FrameResult) -> Image.Image:
    if result.panoptic is not None:
        image = draw_panoptic(image, result.panoptic)
    return draw_detections(image, result.detections)


def source_url(sink: RedisSink, source_id: str) -> str:
    """The URL a source was processed from, as its `started` event recorded it."""
    for _, fields in sink.client.xrevrange(sink.events_key, count=100_000):
        event = json.loads(fields[JSON_FIELD])
        if event["type"] == "started" and event["source_id"] == source_id:
            return event["details"]["url"]
    raise LookupError(f"no `started` event for source {source_id!r} in {sink.events_key}; pass --video")


def render_video(sink: RedisSink, source_id: str, out_path: Path, video: str | None = None) -> Path:
    """Re-decode the source and draw each frame's latest result on it; H.264 MP4 at the source's frame rate."""
    results = {r.frame_index: r for r in _results(sink, source_id)}
    if not results:
        raise LookupError(f"no results in {sink.frames_key(source_id)}")
    video = video or source_url(sink, source_id)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    latest = None
    with av.open(video) as source, av.open(str(out_path), mode="w") as out:
        in_stream = source.streams.video[0]
        stream = out.add_stream("libx264", rate=in_stream.average_rate or 25)
        stream.width, stream.height, stream.pix_fmt = in_stream.width // 2 * 2, in_stream.height // 2 * 2, "yuv420p"
        for index, frame in enumerate(source.decode(in_stream)):
            latest = results.get(index, latest)  # fps-sampled sources: keep the last result on screen
            image = frame.to_image()
            if latest is not None:
                image = annotate(image, latest)
            image = image.crop((0, 0, stream.width, stream.height))
            out.mux(stream.encode(av.VideoFrame.from_image(image)))
        out.mux(stream.encode(None))
    return out_path


def _results(sink: RedisSink, source_id: str):
    for _, fields in sink.client.xrange(sink.frames_key(source_id)):
        if fields.get(TYPE_FIELD) == "frame":
            yield FrameResult.model_validate_json(fields[JSON_FIELD])


# --- `cdetr render` ---

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source_id", metavar="SOURCE_ID")
    parser.add_argument("out", type=Path, metavar="OUT.mp4")
    parser.add_argument("--video", help="the source video (default: the URL its `started` event recorded)")
    parser.add_argument("--redis-url", help="redis://, rediss:// or redis+sentinel:// URL (default: the local server)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="stream key prefix")


def run(args: argparse.Namespace) -> int:
    sink = RedisSink(connect(resolve_redis_url(args.redis_url)), args.prefix)
    try:
        path = render_video(sink, args.source_id, args.out, args.video)
    except LookupError as e:
        print(f"cdetr render: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
