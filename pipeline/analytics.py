"""Line crossings and zone occupancy of confirmed tracks (docs/tracking.md), with state as plain JSON.

Each counter sees, per frame, the tracks matched in that frame (IDs, class names, boxes as one array) in track-ID
order and answers with what happened, computed for all the tracks at once; the tracker's bookkeeping (which tracks
exist, when they end) stays in pipeline/tracker.py.
"""
import math

import numpy as np

from pipeline.config import LineConfig, ZoneConfig
from pipeline.geometry import points_in_polygon, polygon_edges

# A track changes side of a line only once its anchor is this far past it, as a fraction of the box's mean side:
# detection noise moves the anchor a few percent of the box size from frame to frame, and an object standing on the
# line must not count in, out, in, out.
LINE_HYSTERESIS = 0.1


def anchor_points(boxes: np.ndarray, anchor: str) -> tuple[np.ndarray, np.ndarray]:
    """x and y of the anchor points of (n, 4) xyxy boxes."""
    y = boxes[:, 3] if anchor == "bottom_center" else (boxes[:, 1] + boxes[:, 3]) / 2
    return (boxes[:, 0] + boxes[:, 2]) / 2, y


def anchor_point(box: tuple[float, float, float, float], anchor: str) -> tuple[float, float]:
    """The anchor point of one xyxy box (for drawing it)."""
    x, y = anchor_points(np.array([box], dtype=np.float64), anchor)
    return float(x[0]), float(y[0])


class LineCounter:
    """Cumulative in/out counts per class of one line; a track counts each time it settles on the other side."""

    def __init__(self, line: LineConfig):
        self.line = line
        (x0, y0), (x1, y1) = line.points
        self.origin, self.direction = (x0, y0), (x1 - x0, y1 - y0)
        self.length = math.hypot(x1 - x0, y1 - y0)
        self.in_sign = 1 if line.in_side == "right" else -1  # see geometry.side_of_line: right is positive
        self.sides: dict[int, int] = {}  # track ID -> +1 on the in side, -1 on the other, settled past the margin
        self.counts_in: dict[str, int] = {}
        self.counts_out: dict[str, int] = {}

    def observe(self, track_ids: list[int], names: list[str], boxes: np.ndarray) -> list[tuple[int, str]]:
        """(k, "in" or "out") for each track k (an index into the arguments) whose observation completes a
        crossing."""
        (ax, ay), (ox, oy), (dx, dy) = anchor_points(boxes, self.line.anchor), self.origin, self.direction
        distance = (dx * (ay - oy) - dy * (ax - ox)) / self.length  # signed, > 0 on the right of p0->p1
        margin = (boxes[:, 2:] - boxes[:, :2]).sum(axis=1) * (LINE_HYSTERESIS / 2)
        settled = np.abs(distance) > margin
        if self.line.labels is not None:
            settled &= np.isin(names, self.line.labels)
        out = []
        for k, right in zip(np.flatnonzero(settled).tolist(), (distance[settled] > 0).tolist()):
            track_id, side = track_ids[k], self.in_sign if right else -self.in_sign
            before = self.sides.get(track_id)
            self.sides[track_id] = side
            if before != -side:
                continue
            # The anchor's foot on the line must fall between the two points: passing beside the line is no
            # crossing.
            along = ((ax[k] - ox) * dx + (ay[k] - oy) * dy) / (self.length ** 2)
            if 0 <= along <= 1:
                counts = self.counts_in if side > 0 else self.counts_out
                counts[names[k]] = counts.get(names[k], 0) + 1
                out.append((k, "in" if side > 0 else "out"))
        return out

    def forget(self, track_id: int) -> None:
        self.sides.pop(track_id, None)

    def to_json(self) -> dict:
        return {"sides": sorted(self.sides.items()), "counts_in": self.counts_in, "counts_out": self.counts_out}

    def restore(self, data: dict) -> None:
        self.sides = {int(t): int(s) for t, s in data["sides"]}
        self.counts_in, self.counts_out = dict(data["counts_in"]), dict(data["counts_out"])


class ZoneMonitor:
    """The tracks inside one zone, with the time each entered and was last seen inside."""

    def __init__(self, zone: ZoneConfig):
        self.zone = zone
        self.edges = polygon_edges(zone.polygon)
        self.entered: dict[int, float] = {}  # track ID -> clock time it entered, for the tracks inside
        self.seen: dict[int, float] = {}  # track ID -> clock time it was last seen inside

    def observe(self, track_ids: list[int], names: list[str], boxes: np.ndarray, now: float
                ) -> list[tuple[int, str, float | None]]:
        """(k, "zone_entered", None) or (k, "zone_left", dwell seconds) for each track k (an index into the
        arguments) that crossed the zone's border. Dwell runs from the first frame seen inside to the first seen
        outside."""
        inside = points_in_polygon(*anchor_points(boxes, self.zone.anchor), self.edges)
        if self.zone.labels is not None:
            inside &= np.isin(names, self.zone.labels)
        was = np.array([t in self.entered for t in track_ids], dtype=bool)
        self.seen.update((track_ids[k], now) for k in np.flatnonzero(inside).tolist())
        out = []
        for k in np.flatnonzero(inside != was).tolist():
            t = track_ids[k]
            if inside[k]:
                self.entered[t] = now
                out.append((k, "zone_entered", None))
            else:
                del self.seen[t]
                out.append((k, "zone_left", now - self.entered.pop(t)))
        return out

    def end(self, track_id: int) -> float | None:
        """A track that ended leaves: its dwell up to the last frame it was seen inside, None if it was outside."""
        if track_id not in self.entered:
            return None
        return self.seen.pop(track_id) - self.entered.pop(track_id)

    def occupancy(self, names: dict[int, str]) -> dict[str, int]:
        """Tracks inside per class (`names`: track ID -> class name), including tracks briefly lost there (they
        end after tracking.max_lost_s)."""
        counts: dict[str, int] = {}
        for t in self.entered:
            counts[names[t]] = counts.get(names[t], 0) + 1
        return dict(sorted(counts.items()))

    def to_json(self) -> dict:
        return {"inside": [[t, entered, self.seen[t]] for t, entered in sorted(self.entered.items())]}

    def restore(self, data: dict) -> None:
        self.entered = {int(t): float(entered) for t, entered, _ in data["inside"]}
        self.seen = {int(t): float(seen) for t, _, seen in data["inside"]}
