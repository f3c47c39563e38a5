"""The Redis wire format, version 1 (docs/wire-format.md), as pydantic models: the messages inside the entries
(the streams' keys, entry fields and entry IDs are pipeline/wire.py).

Producers and Python subscribers share these classes; `cdetr schema` prints their JSON Schema for everyone else.
Fields may be added, never renamed; `v` bumps on a breaking change. Readers ignore fields they do not know, so an
older subscriber keeps working against a newer producer.
"""
import argparse
import json
import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic.json_schema import models_json_schema

from pipeline.config import SourceConfig

WIRE_VERSION = 1


class RLE(BaseModel):
    """A binary mask in COCO run-length encoding, as pycocotools reads it (`mask.decode`)."""
    size: tuple[int, int] = Field(description="[height, width] of the source frame")
    counts: str = Field(description="COCO compressed RLE (column-major runs), an ASCII string")
    area: int = Field(description="pixels in the mask")


class Detection(BaseModel):
    label: int
    label_name: str
    score: float
    box: tuple[float, float, float, float] = Field(description="[x0, y0, x1, y1] in source-frame pixels")
    mask: RLE | None = Field(None, description="instance mask in source-frame pixels when model.instance_masks is "
                                               "on; None when off or when its query got no mask")
    track_id: int | None = Field(
        None, description="identity of the object across frames, unique within the source and never reused; null "
        "when tracking is off, for a detection not (yet) in a confirmed track, and for stuff classes")


class Segment(BaseModel):
    id: int = Field(description="segment id in the PNG: R + 256*G + 256^2*B")
    category_id: int
    label_name: str
    isthing: bool
    score: float
    area: int
    bbox: tuple[float, float, float, float] = Field(description="[x, y, w, h] in PNG pixels")


class Panoptic(BaseModel):
    png: str = Field(description="base64 PNG, id = R + 256*G + 256^2*B, 0 = void; at model input resolution")
    segments: list[Segment]


class LineCount(BaseModel):
    name: str = Field(description="the line's name in the source's config")
    counts_in: dict[str, int] = Field(description="objects that crossed to the line's `in` side since the source "
                                                  "started, per class label_name")
    counts_out: dict[str, int] = Field(description="objects that crossed to its other side, per class label_name")


class ZoneOccupancy(BaseModel):
    name: str = Field(description="the zone's name in the source's config")
    occupancy: dict[str, int] = Field(description="tracked objects inside the zone in this frame, per class "
                                                  "label_name")


class TrackEvent(BaseModel):
    """Something that happened to a track in this frame; written once, with its frame."""
    type: Literal["track_started", "track_ended", "line_crossed", "zone_entered", "zone_left"]
    track_id: int
    label_name: str
    line: str | None = Field(None, description="line_crossed: the line's name")
    zone: str | None = Field(None, description="zone_entered / zone_left: the zone's name")
    direction: Literal["in", "out"] | None = Field(None, description="line_crossed: to the `in` side or out of it")
    dwell_s: float | None = Field(None, description="zone_left: seconds the object spent in the zone")


class Analytics(BaseModel):
    lines: list[LineCount] = Field(description="cumulative counts of every configured line")
    zones: list[ZoneOccupancy] = Field(description="current occupancy of every configured zone")
    events: list[TrackEvent] = Field(description="this frame's events, in a deterministic order")


class FrameResult(BaseModel):
    v: Literal[1] = WIRE_VERSION
    source_id: str
    frame_index: int = Field(ge=0, description="index of the decoded frame in its source (0-based)")
    pts: float | None = Field(description="presentation time in seconds, from the container")
    captured_at: float = Field(description="unix time the frame was decoded")
    width: int = Field(description="source frame width")
    height: int = Field(description="source frame height")
    model: str
    detections: list[Detection]
    panoptic: Panoptic | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    error: str | None = Field(None, description="set when the result was replaced (e.g. too large): what and why")
    analytics: Analytics | None = Field(None, description="line counts, zone occupancy and track events; None when "
                                                          "tracking is off for the source")


class Event(BaseModel):
    v: Literal[1] = WIRE_VERSION
    type: Literal["started", "reconnecting", "recovered", "error", "eos", "dropped", "corrupt", "lost",
                  "auth_failed"]
    source_id: str | None = None
    at: float = Field(default_factory=time.time, description="unix time of the event")
    message: str = ""
    details: dict[str, Any] = Field(default_factory=dict)


class AddSource(BaseModel):
    """Control message: start processing another source."""
    model_config = ConfigDict(extra="forbid")
    op: Literal["add"]
    source: SourceConfig


class RemoveSource(BaseModel):
    """Control message: stop a source; what it already decoded is written, then its `eos`."""
    model_config = ConfigDict(extra="forbid")
    op: Literal["remove"]
    source_id: str


class Stop(BaseModel):
    """Control message: stop the job as Ctrl-C does."""
    model_config = ConfigDict(extra="forbid")
    op: Literal["stop"]


# Messages on `cdetr:control` (field `json`) are parsed by this adapter only: JSON in, validated models out.
ControlMessage = TypeAdapter(Annotated[Union[AddSource, RemoveSource, Stop], Field(discriminator="op")])

SCHEMAS = {"frame": FrameResult, "event": Event, "control": ControlMessage}


def json_schema(name: str) -> dict[str, Any]:
    """JSON Schema of one wire message (`frame`, `event`, `control`), or all of them under `$defs` for `all`."""
    if name in SCHEMAS:
        schema = SCHEMAS[name]
        return schema.json_schema() if isinstance(schema, TypeAdapter) else schema.model_json_schema()
    _, defs = models_json_schema([(m, "validation") for m in (FrameResult, Event, AddSource, RemoveSource, Stop)],
                                 title=f"cdetr Redis wire format v{WIRE_VERSION}")
    return defs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", nargs="?", default="all", choices=("all", *SCHEMAS),
                        help="FrameResult (frame), Event (event), control message (control) or all (default)")


def run(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(args.which), indent=2))
    return 0
