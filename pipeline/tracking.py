"""One source's tracker and line/zone analytics over its FrameResults, in frame order (docs/tracking.md).

Everything that decides an output (the tracks, the clock, the counters) is saved by `snapshot()` as versioned JSON,
and a SourceTracker built from a snapshot continues exactly as the original would: same IDs, counts and events.
"""
import statistics

import numpy as np

from pipeline.analytics import LineCounter, ZoneMonitor
from pipeline.config import SourceConfig, TrackingConfig
from pipeline.schema import Analytics, Detection, FrameResult, LineCount, TrackEvent, ZoneOccupancy
from pipeline.tracker import ByteTracker

SNAPSHOT_VERSION = 1


class FrameClock:
    """Seconds since the source's first frame, from the frames' pts, immune to pts that restart or jump.

    A live source's reconnect restarts its pts and a broken stream's can leap: a step that is not forward, or far
    longer than the usual interval, is replaced by the median interval seen (per frame_index step, so frames the
    sampler skipped still count). The tracker's motion model runs in "steps" of that interval."""
    WINDOW = 31  # intervals kept for the median
    JUMP = 4.0  # a step longer than this many median intervals is a jump, not time
    FIRST_MAX_S = 1.0  # before any interval is known, longer steps are jumps
    DEFAULT_S = 1 / 25  # the interval assumed before any is known

    def __init__(self):
        self.now = 0.0
        self.last_pts: float | None = None
        self.last_index: int | None = None
        self.intervals: list[float] = []

    def tick(self, pts: float | None, frame_index: int) -> float:
        """Advance to a frame; returns the steps (median intervals, as known before this frame) since the previous
        frame, 0 for the first."""
        if self.last_index is None:
            self.last_pts, self.last_index = pts, frame_index
            return 0.0
        skipped = frame_index - self.last_index
        usual = statistics.median(self.intervals) if self.intervals else None
        dt = None if pts is None or self.last_pts is None else (pts - self.last_pts) / skipped
        if dt is not None and 0 < dt <= (self.FIRST_MAX_S if usual is None else self.JUMP * usual):
            self.intervals = (self.intervals + [dt])[-self.WINDOW:]
        else:
            dt = usual or self.DEFAULT_S
        self.now += dt * skipped
        self.last_pts, self.last_index = pts, frame_index
        return dt * skipped / usual if usual else float(skipped)

    def to_json(self) -> dict:
        return {"now": self.now, "last_pts": self.last_pts, "last_index": self.last_index,
                "intervals": self.intervals}

    def restore(self, data: dict) -> None:
        self.now, self.last_pts, self.last_index = data["now"], data["last_pts"], data["last_index"]
        self.intervals = list(data["intervals"])


class SourceTracker:
    """Multi-object tracker + line/zone analytics of one source; deterministic; state as versioned JSON."""

    def __init__(self, settings: TrackingConfig, source: SourceConfig, threshold: float,
                 stuff_labels: set[int] = frozenset(), snapshot: dict | None = None):
        self.settings = settings
        self.threshold = threshold  # the model's output threshold: lower scores only continue confirmed tracks
        self.stuff_labels = frozenset(stuff_labels)
        high = threshold if settings.high_threshold is None else settings.high_threshold
        self.tracker = ByteTracker(settings, high)
        self.clock = FrameClock()
        self.lines = [LineCounter(line) for line in source.lines]
        self.zones = [ZoneMonitor(zone) for zone in source.zones]
        self.names: dict[int, str] = {}  # confirmed track ID -> class name, for its events
        self.frame_index = -1
        if snapshot is not None:
            self._restore(snapshot)

    def update(self, result: FrameResult) -> FrameResult:
        """The frame's result with track IDs, the detections below the threshold that continue tracks, and its
        analytics. Frames must come in frame_index order."""
        if result.frame_index <= self.frame_index:
            raise ValueError(f"source {result.source_id}: frame {result.frame_index} given after frame "
                             f"{self.frame_index}; the tracker takes frames in order, each once")
        self.frame_index = result.frame_index
        steps = self.clock.tick(result.pts, result.frame_index)
        now = self.clock.now
        candidates = sorted((i for i, d in enumerate(result.detections)
                             if d.label not in self.stuff_labels and d.score >= self.settings.low_threshold),
                            key=lambda i: _order(result.detections[i]))
        dets = [result.detections[i] for i in candidates]
        boxes = np.array([d.box for d in dets], dtype=np.float64).reshape(-1, 4)
        scores = np.array([d.score for d in dets], dtype=np.float64)
        labels = np.array([d.label for d in dets], dtype=np.int64)
        ids, started, ended = self.tracker.update(boxes, scores, labels, steps, now)
        track_of = dict(zip(candidates, ids.tolist()))

        events = self._ended(ended)
        observed = sorted((track_id, dets[k]) for k, track_id in enumerate(ids.tolist()) if track_id)
        started_set = set(started)
        for track_id, det in observed:
            self.names[track_id] = det.label_name
            if track_id in started_set:
                events.append(TrackEvent(type="track_started", track_id=track_id, label_name=det.label_name))
            events += self._observe(track_id, det, now)

        kept = []
        for i, det in enumerate(result.detections):
            track_id = track_of.get(i, 0)
            if det.score >= self.threshold or track_id:
                kept.append(det.model_copy(update={"track_id": track_id or None}))
        return result.model_copy(update={"detections": kept, "analytics": self._analytics(events)})

    def _ended(self, ended: list[tuple[int, int]]) -> list[TrackEvent]:
        events = []
        for track_id, _ in sorted(ended):
            name = self.names.pop(track_id)
            for zone in self.zones:
                dwell = zone.end(track_id)
                if dwell is not None:
                    events.append(TrackEvent(type="zone_left", track_id=track_id, label_name=name,
                                             zone=zone.zone.name, dwell_s=dwell))
            for line in self.lines:
                line.forget(track_id)
            events.append(TrackEvent(type="track_ended", track_id=track_id, label_name=name))
        return events

    def _observe(self, track_id: int, det: Detection, now: float) -> list[TrackEvent]:
        events = []
        for line in self.lines:
            direction = line.observe(track_id, det.label_name, det.box)
            if direction is not None:
                events.append(TrackEvent(type="line_crossed", track_id=track_id, label_name=det.label_name,
                                         line=line.line.name, direction=direction))
        for zone in self.zones:
            change = zone.observe(track_id, det.label_name, det.box, now)
            if change is not None:
                events.append(TrackEvent(type=change[0], track_id=track_id, label_name=det.label_name,
                                         zone=zone.zone.name, dwell_s=change[1]))
        return events

    def _analytics(self, events: list[TrackEvent]) -> Analytics:
        return Analytics(
            lines=[LineCount(name=c.line.name, counts_in=dict(sorted(c.counts_in.items())),
                             counts_out=dict(sorted(c.counts_out.items()))) for c in self.lines],
            zones=[ZoneOccupancy(name=z.zone.name, occupancy=z.occupancy()) for z in self.zones],
            events=events)

    def snapshot(self) -> dict:
        """The state as JSON-serialisable data: {"v": 1, "frame_index": last frame processed or -1, ...}."""
        return {"v": SNAPSHOT_VERSION, "frame_index": self.frame_index, "clock": self.clock.to_json(),
                "tracker": self.tracker.to_json(), "names": sorted(self.names.items()),
                "lines": {c.line.name: c.to_json() for c in self.lines},
                "zones": {z.zone.name: z.to_json() for z in self.zones}}

    def _restore(self, snapshot: dict) -> None:
        if snapshot.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"tracker snapshot version {snapshot.get('v')!r} is not {SNAPSHOT_VERSION}")
        self.frame_index = int(snapshot["frame_index"])
        self.clock.restore(snapshot["clock"])
        self.tracker.restore(snapshot["tracker"])
        self.names = {int(t): str(n) for t, n in snapshot["names"]}
        # A line or zone added to the config since the snapshot starts from zero; one removed is dropped.
        for counter in self.lines:
            if counter.line.name in snapshot["lines"]:
                counter.restore(snapshot["lines"][counter.line.name])
        for zone in self.zones:
            if zone.zone.name in snapshot["zones"]:
                zone.restore(snapshot["zones"][zone.zone.name])


def _order(det: Detection) -> tuple:
    """The tie-break order of detections: score descending, then class, then box."""
    return -det.score, det.label, det.box
