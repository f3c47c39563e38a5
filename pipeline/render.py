"""Drawing results: boxes and panoptic overlays on images, and annotated videos from the results in Redis, with
track IDs and their trails, and the source's counting lines and zones with their counts."""
import argparse
import base64
import io
import json
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw
from pydantic import ValidationError

from model.coco_format import rgb_to_id
from pipeline import analytics_flags
from pipeline.analytics import anchor_point
from pipeline.config import ConfigError, LineConfig, ZoneConfig, load_config
from pipeline.redis_server import resolve_redis_url
from pipeline.schema import Analytics, Detection, FrameResult, Panoptic
from pipeline.sink import RedisSink, connect
from pipeline.wire import DEFAULT_PREFIX, JSON_FIELD, TYPE_FIELD

_PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                     (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)],
                    dtype=np.uint8)
_GEOMETRY = (255, 255, 255)  # lines and zones
TRAIL = 20  # frames of a track's trail


def _colour(index: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in _PALETTE[index % len(_PALETTE)])


def draw_detections(image: Image.Image, detections: list[Detection],
                    trails: dict[int, deque] | None = None) -> Image.Image:
    """A copy of `image` with each box and its `label score`, coloured by class; a tracked detection's box is
    coloured by its track, labelled `#id`, with its anchor's trail from `trails` (boxes are in the image's pixels)."""
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    for d in detections:
        colour = _colour(d.label if d.track_id is None else d.track_id)
        trail = (trails or {}).get(d.track_id, ())
        if len(trail) > 1:
            draw.line(list(trail), fill=colour, width=2)
        draw.rectangle(d.box, outline=colour, width=2)
        name = d.label_name if d.track_id is None else f"#{d.track_id} {d.label_name}"
        draw.text((d.box[0] + 3, d.box[1] + 2), f"{name} {d.score:.2f}", fill=colour)
    return image


def draw_analytics(image: Image.Image, analytics: Analytics, lines: Sequence[LineConfig] = (),
                   zones: Sequence[ZoneConfig] = ()) -> Image.Image:
    """`image` with the source's `lines` and `zones` drawn and labelled with their counts (in / out across each
    line, objects inside each zone; all classes), and every count of `analytics` listed at the top left (also those
    whose geometry is not given)."""
    draw = ImageDraw.Draw(image)
    counts = {c.name: f"{c.name}: in {sum(c.counts_in.values())} out {sum(c.counts_out.values())}"
              for c in analytics.lines}
    occupancy = {z.name: f"{z.name}: {sum(z.occupancy.values())} inside" for z in analytics.zones}
    for zone in zones:
        draw.polygon([tuple(p) for p in zone.polygon], outline=_GEOMETRY, width=1)
        draw.text(tuple(zone.polygon[0]), occupancy.get(zone.name, zone.name), fill=_GEOMETRY)
    for line in lines:
        draw.line([tuple(p) for p in line.points], fill=_GEOMETRY, width=2)
        (x0, y0), (x1, y1) = line.points
        draw.text(((x0 + x1) / 2 + 3, (y0 + y1) / 2 + 3), counts.get(line.name, line.name), fill=_GEOMETRY)
    for row, text in enumerate([*counts.values(), *occupancy.values()]):
        draw.rectangle(draw.textbbox((4, 4 + 11 * row), text), fill=(0, 0, 0))  # readable over any scene
        draw.text((4, 4 + 11 * row), text, fill=_GEOMETRY)
    return image


def follow(trails: dict[int, deque], result: FrameResult) -> None:
    """Extend the tracks' trails with `result`'s anchors (box bottom-centres); forget the tracks that ended."""
    for d in result.detections:
        if d.track_id is not None:
            trails.setdefault(d.track_id, deque(maxlen=TRAIL)).append(anchor_point(d.box, "bottom_center"))
    for event in result.analytics.events if result.analytics is not None else ():
        if event.type == "track_ended":
            trails.pop(event.track_id, None)


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


def annotate(image: Image.Image, result: FrameResult, trails: dict[int, deque] | None = None,
             lines: Sequence[LineConfig] = (), zones: Sequence[ZoneConfig] = ()) -> Image.Image:
    """`image` with `result` drawn: panoptic colours, boxes, tracks with `trails`, and the source's `lines` and
    `zones` with the result's counts."""
    if result.panoptic is not None:
        image = draw_panoptic(image, result.panoptic)
    image = draw_detections(image, result.detections, trails)
    if result.analytics is not None:
        image = draw_analytics(image, result.analytics, lines, zones)
    return image


def source_url(sink: RedisSink, source_id: str) -> str:
    """The URL a source was processed from, as its `started` event recorded it."""
    for _, fields in sink.client.xrevrange(sink.events_key, count=100_000):
        event = json.loads(fields[JSON_FIELD])
        if event["type"] == "started" and event["source_id"] == source_id:
            return event["details"]["url"]
    raise LookupError(f"no `started` event for source {source_id!r} in {sink.events_key}; pass --video")


def render_video(sink: RedisSink, source_id: str, out_path: Path, video: str | None = None,
                 lines: Sequence[LineConfig] = (), zones: Sequence[ZoneConfig] = ()) -> Path:
    """Re-decode the source and draw each frame's latest result on it, with the source's `lines` and `zones`; H.264
    MP4 at the source's frame rate."""
    results = {r.frame_index: r for r in _results(sink, source_id)}
    if not results:
        raise LookupError(f"no results in {sink.frames_key(source_id)}")
    video = video or source_url(sink, source_id)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    latest, trails = None, {}
    with av.open(video) as container, av.open(str(out_path), mode="w") as out:
        in_stream = container.streams.video[0]
        stream = out.add_stream("libx264", rate=in_stream.average_rate or 25)
        stream.width, stream.height, stream.pix_fmt = in_stream.width // 2 * 2, in_stream.height // 2 * 2, "yuv420p"
        for index, frame in enumerate(container.decode(in_stream)):
            if index in results:  # fps-sampled sources: keep the last result on screen
                latest = results[index]
                follow(trails, latest)
            image = frame.to_image()
            if latest is not None:
                image = annotate(image, latest, trails, lines, zones)
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
    parser.add_argument("--config", type=Path,
                        help="the job's YAML/JSON config file: draws the lines and zones of SOURCE_ID in it")
    analytics_flags.add_arguments(parser, per_source=False)


def run(args: argparse.Namespace) -> int:
    sink = RedisSink(connect(resolve_redis_url(args.redis_url)), args.prefix)
    try:
        path = render_video(sink, args.source_id, args.out, args.video, *_geometry(args))
    except (LookupError, ConfigError) as e:
        print(f"cdetr render: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _geometry(args: argparse.Namespace) -> tuple[list[LineConfig], list[ZoneConfig]]:
    """The lines and zones to draw: the source's in --config, then --line and --zone (validated as in `cdetr run`)."""
    configured = [s for s in load_config(args.config).sources if s.id == args.source_id] if args.config else []
    lines = [line for s in configured for line in s.lines] + [_valid(LineConfig, "--line", x) for x in args.line]
    zones = [zone for s in configured for zone in s.zones] + [_valid(ZoneConfig, "--zone", x) for x in args.zone]
    return lines, zones


def _valid(model: type[LineConfig] | type[ZoneConfig], flag: str, item: dict) -> LineConfig | ZoneConfig:
    try:
        return model.model_validate(item)
    except ValidationError as e:
        error = e.errors()[0]
        raise ConfigError(f"{flag} {item['name']}: {'.'.join(map(str, error['loc']))}: {error['msg']}") from None
