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
        self.label_names: dict[int, str] = {}  # label -> label_name, of the classes seen
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
        candidates, table = self._candidates(result.detections)
        rows, started, ended = self.tracker.update(table[:, 2:], table[:, 0], table[:, 1].astype(np.int64), steps,
                                                   self.clock.now)
        names = [self.label_names[label] for label in self.tracker.labels().tolist()]  # per track row
        track_ids = np.append(self.tracker.tracks.track_id, 0)[rows]  # row -1 (no track): 0
        events = self._ended(ended)
        seen = np.flatnonzero(track_ids)
        seen = seen[np.argsort(track_ids[seen])]  # by ID: events come in ID order
        events += self._observe(track_ids[seen].tolist(), rows[seen], [names[r] for r in rows[seen].tolist()],
                                table[seen, 2:], started)
        return result.model_copy(update={"detections": self._kept(result.detections, candidates, track_ids),
                                         "analytics": self._analytics(events, names)})

    def _candidates(self, detections: list[Detection]) -> tuple[list[int], np.ndarray]:
        """The indices of the detections to track, in tie-break order (score descending, then class, then box),
        and their (score, label, x0, y0, x1, y1) rows."""
        candidates = [i for i, d in enumerate(detections)
                      if d.label not in self.stuff_labels and d.score >= self.settings.low_threshold]
        for i in candidates:
            self.label_names.setdefault(detections[i].label, detections[i].label_name)
        table = np.array([(detections[i].score, detections[i].label, *detections[i].box) for i in candidates],
                         dtype=np.float64).reshape(-1, 6)
        order = np.lexsort((*table[:, 5:1:-1].T, table[:, 1], -table[:, 0]))  # the last key sorts first
        return [candidates[k] for k in order.tolist()], table[order]

    def _kept(self, detections: list[Detection], candidates: list[int], track_ids: np.ndarray) -> list[Detection]:
        """The detections to output: those at the model's threshold and those continuing a track, with their
        track IDs (candidate k is detections[candidates[k]], in track track_ids[k], 0: none)."""
        track_of = [None] * len(detections)
        for i, track_id in zip(candidates, track_ids.tolist()):
            track_of[i] = track_id or None
        kept = []
        for det, track_id in zip(detections, track_of):
            if track_id is None and det.score < self.threshold:
                continue
            if track_id != det.track_id:
                det = Detection.model_validate({**det.__dict__, "track_id": track_id})  # 2x cheaper than model_copy
            kept.append(det)
        return kept

    def _ended(self, ended: list[tuple[int, int]]) -> list[TrackEvent]:
        events = []
        for track_id, label in sorted(ended):
            name = self.label_names[label]
            for zone in self.zones:
                dwell = zone.end(track_id)
                if dwell is not None:
                    events.append(TrackEvent(type="zone_left", track_id=track_id, label_name=name,
                                             zone=zone.zone.name, dwell_s=dwell))
            for line in self.lines:
                line.forget(track_id)
            events.append(TrackEvent(type="track_ended", track_id=track_id, label_name=name))
        return events

    def _observe(self, ids: list[int], rows: np.ndarray, names: list[str], boxes: np.ndarray, started: np.ndarray
                 ) -> list[TrackEvent]:
        """The events of the tracks seen in this frame: IDs `ids` (ascending), at `rows` of the tracker, of
        classes `names`, with `boxes`; `started`: the rows of the tracks confirmed in this frame."""
        per_track: list[list[TrackEvent]] = [[] for _ in ids]
        started_rows = set(started.tolist())
        new = [k for k, row in enumerate(rows.tolist()) if row in started_rows]
        for k in new:
            per_track[k].append(TrackEvent(type="track_started", track_id=ids[k], label_name=names[k]))
        if new and self.lines:
            # A track crossing while still tentative counts once confirmed: the lines first see where it started.
            first = self.tracker.tracks.first[rows[new]]
            for line in self.lines:
                line.observe([ids[k] for k in new], [names[k] for k in new], first)
        for line in self.lines:
            for k, direction in line.observe(ids, names, boxes):
                per_track[k].append(TrackEvent(type="line_crossed", track_id=ids[k], label_name=names[k],
                                               line=line.line.name, direction=direction))
        for zone in self.zones:
            for k, change, dwell in zone.observe(ids, names, boxes, self.clock.now):
                per_track[k].append(TrackEvent(type=change, track_id=ids[k], label_name=names[k],
                                               zone=zone.zone.name, dwell_s=dwell))
        return [event for events in per_track for event in events]

    def _analytics(self, events: list[TrackEvent], names: list[str]) -> Analytics:
        """Counts, occupancy and `events`; `names`: the class name of each row of the tracker."""
        if self.zones:
            confirmed = self.tracker.tracks.track_id
            names_of = {t: name for t, name in zip(confirmed.tolist(), names) if t}
        return Analytics(
            lines=[LineCount(name=c.line.name, counts_in=dict(sorted(c.counts_in.items())),
                             counts_out=dict(sorted(c.counts_out.items()))) for c in self.lines],
            zones=[ZoneOccupancy(name=z.zone.name, occupancy=z.occupancy(names_of)) for z in self.zones],
            events=events)

    def snapshot(self) -> dict:
        """The state as JSON-serialisable data: {"v": 1, "frame_index": last frame processed or -1, ...}."""
        return {"v": SNAPSHOT_VERSION, "frame_index": self.frame_index, "clock": self.clock.to_json(),
                "tracker": self.tracker.to_json(), "label_names": sorted(self.label_names.items()),
                "lines": {c.line.name: c.to_json() for c in self.lines},
                "zones": {z.zone.name: z.to_json() for z in self.zones}}

    def _restore(self, snapshot: dict) -> None:
        if snapshot.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"tracker snapshot version {snapshot.get('v')!r} is not {SNAPSHOT_VERSION}")
        self.frame_index = int(snapshot["frame_index"])
        self.clock.restore(snapshot["clock"])
        self.tracker.restore(snapshot["tracker"])
        self.label_names = {int(label): str(n) for label, n in snapshot["label_names"]}
        # A line or zone added to the config since the snapshot starts from zero; one removed is dropped.
        for counter in self.lines:
            if counter.line.name in snapshot["lines"]:
                counter.restore(snapshot["lines"][counter.line.name])
        for zone in self.zones:
            if zone.zone.name in snapshot["zones"]:
                zone.restore(snapshot["zones"][zone.zone.name])

