"""Line crossings and zone occupancy of confirmed tracks (docs/tracking.md), with state as plain JSON.

Each counter sees, per frame, the tracks matched in that frame (ID, class name, box) in track-ID order and answers
with what happened; the tracker's bookkeeping (which tracks exist, when they end) stays in pipeline/tracker.py.
"""
import math

from pipeline.config import LineConfig, ZoneConfig
from pipeline.geometry import Point, point_in_polygon

Box = tuple[float, float, float, float]

# A track changes side of a line only once its anchor is this far past it, as a fraction of the box's mean side:
# detection noise moves the anchor a few percent of the box size from frame to frame, and an object standing on the
# line must not count in, out, in, out.
LINE_HYSTERESIS = 0.1


def anchor_point(box: Box, anchor: str) -> Point:
    x0, y0, x1, y1 = box
    return ((x0 + x1) / 2, y1 if anchor == "bottom_center" else (y0 + y1) / 2)


class LineCounter:
    """Cumulative in/out counts per class of one line; a track counts each time it settles on the other side."""

    def __init__(self, line: LineConfig):
        self.line = line
        (x0, y0), (x1, y1) = line.points
        self.origin, self.direction = (x0, y0), (x1 - x0, y1 - y0)
        self.length = math.hypot(*self.direction)
        self.in_sign = 1 if line.in_side == "right" else -1  # see geometry.side_of_line: right is positive
        self.sides: dict[int, int] = {}  # track ID -> +1 on the in side, -1 on the other, settled past the margin
        self.counts_in: dict[str, int] = {}
        self.counts_out: dict[str, int] = {}

    def observe(self, track_id: int, label_name: str, box: Box) -> str | None:
        """The crossing direction ("in" or "out") if this observation completes one, else None."""
        if self.line.labels is not None and label_name not in self.line.labels:
            return None
        (ax, ay), (ox, oy), (dx, dy) = anchor_point(box, self.line.anchor), self.origin, self.direction
        distance = (dx * (ay - oy) - dy * (ax - ox)) / self.length  # signed, > 0 on the right of p0->p1
        margin = LINE_HYSTERESIS * ((box[2] - box[0]) + (box[3] - box[1])) / 2
        if abs(distance) <= margin:
            return None
        side = self.in_sign * (1 if distance > 0 else -1)
        before = self.sides.get(track_id)
        self.sides[track_id] = side
        # The anchor's foot on the line must fall between the two points: passing beside the line is no crossing.
        along = ((ax - ox) * dx + (ay - oy) * dy) / (self.length ** 2)
        if before is None or before == side or not 0 <= along <= 1:
            return None
        direction = "in" if side > 0 else "out"
        counts = self.counts_in if side > 0 else self.counts_out
        counts[label_name] = counts.get(label_name, 0) + 1
        return direction

    def forget(self, track_id: int) -> None:
        self.sides.pop(track_id, None)

    def to_json(self) -> dict:
        return {"sides": sorted(self.sides.items()), "counts_in": self.counts_in, "counts_out": self.counts_out}

    def restore(self, data: dict) -> None:
        self.sides = {int(t): int(s) for t, s in data["sides"]}
        self.counts_in, self.counts_out = dict(data["counts_in"]), dict(data["counts_out"])


class ZoneMonitor:
    """The tracks inside one zone, with the time each entered."""

    def __init__(self, zone: ZoneConfig):
        self.zone = zone
        self.inside: dict[int, tuple[str, float, float]] = {}  # track ID -> (class, entered at, last seen at)

    def observe(self, track_id: int, label_name: str, box: Box, now: float) -> tuple[str, float | None] | None:
        """("zone_entered", None) or ("zone_left", dwell seconds) if the track crossed the zone's border, else None.
        Dwell runs from the first frame seen inside to the first seen outside."""
        if self.zone.labels is not None and label_name not in self.zone.labels:
            return None
        now_inside = point_in_polygon(anchor_point(box, self.zone.anchor), self.zone.polygon)
        was = self.inside.get(track_id)
        if now_inside:
            self.inside[track_id] = (label_name, now if was is None else was[1], now)
            return ("zone_entered", None) if was is None else None
        if was is None:
            return None
        del self.inside[track_id]
        return "zone_left", now - was[1]

    def end(self, track_id: int) -> float | None:
        """A track that ended leaves: its dwell up to the last frame it was seen inside, None if it was outside."""
        was = self.inside.pop(track_id, None)
        return None if was is None else was[2] - was[1]

    def occupancy(self) -> dict[str, int]:
        """Tracks inside per class, including tracks briefly lost there (they end after tracking.max_lost_s)."""
        counts: dict[str, int] = {}
        for label_name, _, _ in self.inside.values():
            counts[label_name] = counts.get(label_name, 0) + 1
        return dict(sorted(counts.items()))

    def to_json(self) -> dict:
        return {"inside": [[t, *v] for t, v in sorted(self.inside.items())]}

    def restore(self, data: dict) -> None:
        self.inside = {int(t): (str(name), float(entered), float(seen)) for t, name, entered, seen in data["inside"]}
