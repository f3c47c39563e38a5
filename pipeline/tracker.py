"""ByteTrack-style multi-object tracking by detection, with state that saves to and restores from plain JSON.

Each track's box (centre x, centre y, width, height) follows a constant-velocity Kalman filter. With diagonal noise
and a motion model that couples each coordinate only with its own velocity, the filter splits exactly into four
independent one-dimensional filters, so the whole state is a few (tracks, 4) arrays updated element-wise for all
tracks at once: no per-track matrices, no Python loop over tracks.

One `update` per frame, ByteTrack's order (Zhang et al., 2022):
1. predict every track to this frame;
2. match high-score detections to confirmed tracks (tracked or lost) by IoU;
3. match the low-score detections to the confirmed tracks still unmatched: a detection whose score dropped
   (occlusion, blur, a class the model hesitates on) continues its track instead of being thrown away (ByteTrack
   only tries the tracks seen in the previous frame; trying the lost ones too found more of the shapes videos'
   objects, bench/RESULTS.md);
4. match the remaining high-score detections to tentative tracks; tentative tracks left unmatched are dropped;
5. unmatched high-score detections start tentative tracks, except duplicates (IoU >= DUPLICATE_IOU with a
   detection already assigned or starting a track); a tentative track matched `min_hits` frames in a row is
   confirmed and gets the next ID of the source; a confirmed track unmatched for `max_lost_s` ends.
Ties are broken by order: tracks by creation, detections by (score desc, label, box), so the same detections always
give the same IDs.
"""
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from pipeline.config import TrackingConfig

TENTATIVE, TRACKED, LOST = 0, 1, 2

# Noise of the Kalman filter, per nominal frame interval, relative to the box's width (x, w) or height (y, h): the
# values ByteTrack and BoT-SORT use for pedestrians at 30 fps, which fit the shapes videos as well.
POSITION_NOISE = 1 / 20
VELOCITY_NOISE = 1 / 160
MEASUREMENT_NOISE = 1 / 20
# An unmatched detection overlapping an assigned one this much is the same object seen twice, not a new track.
DUPLICATE_IOU = 0.7


@dataclass
class TrackSet:
    """All tracks of a source as parallel arrays, in creation order (row i is one track in every array)."""
    serial: np.ndarray  # (n,) int64, creation number: the tie-break order
    track_id: np.ndarray  # (n,) int64, 0 while tentative (IDs start at 1)
    label: np.ndarray  # (n,) int64
    status: np.ndarray  # (n,) int8: TENTATIVE, TRACKED or LOST
    hits: np.ndarray  # (n,) int64, matched frames in a row (for confirmation)
    last_seen: np.ndarray  # (n,) float64, clock time of the last match
    pos: np.ndarray  # (n, 4) float64 cx, cy, w, h
    vel: np.ndarray  # (n, 4) per nominal frame interval
    p_pp: np.ndarray  # (n, 4) covariance of each coordinate's (position, velocity) pair: var(position),
    p_pv: np.ndarray  # (n, 4) covariance(position, velocity),
    p_vv: np.ndarray  # (n, 4) var(velocity)

    FIELDS = ("serial", "track_id", "label", "status", "hits", "last_seen", "pos", "vel", "p_pp", "p_pv", "p_vv")
    DTYPES = (np.int64, np.int64, np.int64, np.int8, np.int64, np.float64) + (np.float64,) * 5

    @classmethod
    def empty(cls) -> "TrackSet":
        return cls(*(np.zeros((0, 4) if name in ("pos", "vel", "p_pp", "p_pv", "p_vv") else 0, dtype=dtype)
                     for name, dtype in zip(cls.FIELDS, cls.DTYPES)))

    def __len__(self) -> int:
        return len(self.serial)

    def select(self, keep: np.ndarray) -> "TrackSet":
        return TrackSet(*(getattr(self, name)[keep] for name in self.FIELDS))

    def extend(self, other: "TrackSet") -> "TrackSet":
        return TrackSet(*(np.concatenate([getattr(self, name), getattr(other, name)]) for name in self.FIELDS))

    def to_json(self) -> dict:
        return {name: getattr(self, name).tolist() for name in self.FIELDS}

    @classmethod
    def from_json(cls, data: dict) -> "TrackSet":
        empty = cls.empty()
        return cls(*(np.asarray(data[name], dtype=dtype).reshape((-1,) + getattr(empty, name).shape[1:])
                     for name, dtype in zip(cls.FIELDS, cls.DTYPES)))


def _box_scale(pos: np.ndarray) -> np.ndarray:
    """Per coordinate, the size the noise is relative to: width for cx and w, height for cy and h."""
    size = np.maximum(pos[:, 2:], 1.0)
    return np.concatenate([size, size], axis=1)


def predict(tracks: TrackSet, steps: float) -> None:
    """Advance every track's filter by `steps` nominal frame intervals (in place)."""
    scale = _box_scale(tracks.pos)
    q_p = (POSITION_NOISE * scale) ** 2 * steps
    q_v = (VELOCITY_NOISE * scale) ** 2 * steps
    tracks.pos += steps * tracks.vel
    tracks.p_pp += 2 * steps * tracks.p_pv + steps * steps * tracks.p_vv + q_p
    tracks.p_pv += steps * tracks.p_vv
    tracks.p_vv += q_v


def correct(tracks: TrackSet, rows: np.ndarray, measured: np.ndarray) -> None:
    """Kalman update of tracks `rows` with measured (cx, cy, w, h) boxes (in place)."""
    r = (MEASUREMENT_NOISE * _box_scale(measured)) ** 2
    p_pp, p_pv, p_vv = tracks.p_pp[rows], tracks.p_pv[rows], tracks.p_vv[rows]
    gain_p, gain_v = p_pp / (p_pp + r), p_pv / (p_pp + r)
    innovation = measured - tracks.pos[rows]
    tracks.pos[rows] += gain_p * innovation
    tracks.vel[rows] += gain_v * innovation
    tracks.p_vv[rows] = p_vv - gain_v * p_pv
    tracks.p_pp[rows] = (1 - gain_p) * p_pp
    tracks.p_pv[rows] = (1 - gain_p) * p_pv


def new_tracks(boxes: np.ndarray, labels: np.ndarray, first_serial: int, now: float) -> TrackSet:
    """Tentative tracks at cx, cy, w, h `boxes`: unknown (zero, uncertain) velocity, as ByteTrack initialises."""
    n = len(boxes)
    scale = _box_scale(boxes)
    return TrackSet(
        serial=np.arange(first_serial, first_serial + n, dtype=np.int64), track_id=np.zeros(n, np.int64),
        label=labels.astype(np.int64), status=np.full(n, TENTATIVE, np.int8), hits=np.ones(n, np.int64),
        last_seen=np.full(n, now), pos=boxes.astype(np.float64), vel=np.zeros((n, 4)),
        p_pp=(2 * POSITION_NOISE * scale) ** 2, p_pv=np.zeros((n, 4)), p_vv=(10 * VELOCITY_NOISE * scale) ** 2)


def xyxy_to_cxcywh(boxes: np.ndarray) -> np.ndarray:
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                     boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    half = np.maximum(boxes[:, 2:], 0) / 2
    return np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], axis=1)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every xyxy box of `a` with every box of `b`, (len(a), len(b))."""
    wh = np.maximum(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]), 0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    # Boxes here have positive sizes (detections, and predictions clamped in cxcywh_to_xyxy); an empty union
    # can only come from two zero-size boxes.
    return inter / np.maximum(union, 1e-9)


def duplicates_removed(boxes: np.ndarray, candidates: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """The `candidates` (in tie-break order) that are no duplicate of a detection in `taken` or of an earlier
    candidate kept: DETR may give one object two queries, e.g. the same box as a hexagon and as a circle, and the
    second is no new object."""
    kept: list[int] = []
    for d in candidates.tolist():
        others = np.concatenate([taken, np.array(kept, dtype=np.int64)])
        if len(others) == 0 or iou_matrix(boxes[d:d + 1], boxes[others]).max() < DUPLICATE_IOU:
            kept.append(d)
    return np.array(kept, dtype=np.int64)


def match(iou: np.ndarray, min_iou: float) -> list[tuple[int, int]]:
    """Pairs (row, column) of the assignment maximising total IoU among pairs with IoU >= min_iou."""
    if iou.size == 0:
        return []
    # Pairs below the gate get a cost no feasible assignment beats, then are dropped from the answer.
    cost = np.where(iou >= min_iou, 1.0 - iou, 1e6)
    rows, cols = linear_sum_assignment(cost)
    return [(r, c) for r, c in zip(rows.tolist(), cols.tolist()) if iou[r, c] >= min_iou]


class ByteTracker:
    """Tracks of one source. `update` takes one frame's detections; state is `to_json` / `from_json`."""

    def __init__(self, settings: TrackingConfig, high_threshold: float):
        self.settings = settings
        self.high_threshold = high_threshold
        self.tracks = TrackSet.empty()
        self.next_id = 1  # the next confirmed track's ID: IDs are never reused
        self.next_serial = 0

    def update(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, steps: float, now: float
               ) -> tuple[np.ndarray, list[int], list[tuple[int, int]]]:
        """One frame: xyxy `boxes`, `scores`, `labels` (already ordered: score desc, then label, then box),
        `steps` nominal frame intervals since the last frame, `now` the clock in seconds.

        Returns the confirmed track ID of each detection (0: none), the IDs confirmed in this frame, and the
        (track ID, label) of the tracks that ended (lost longer than max_lost_s)."""
        settings, tracks = self.settings, self.tracks
        predict(tracks, steps)
        assigned = np.full(len(boxes), -1, dtype=np.int64)  # row of the track each detection joined, -1: none
        high = np.flatnonzero(scores >= self.high_threshold)
        low = np.flatnonzero((scores < self.high_threshold) & (scores >= settings.low_threshold))
        iou = iou_matrix(cxcywh_to_xyxy(tracks.pos), boxes)
        if settings.class_aware:
            iou = np.where(tracks.label[:, None] == labels[None, :], iou, 0.0)

        confirmed = np.flatnonzero(tracks.status != TENTATIVE)
        self._associate(iou, confirmed, high, settings.match_iou, assigned)
        taken = np.zeros(len(tracks), dtype=bool)
        taken[assigned[assigned >= 0]] = True
        self._associate(iou, np.flatnonzero((tracks.status != TENTATIVE) & ~taken), low, settings.low_match_iou,
                        assigned)
        tentative = np.flatnonzero(tracks.status == TENTATIVE)
        self._associate(iou, tentative, high[assigned[high] < 0], settings.match_iou, assigned)

        matched_dets = np.flatnonzero(assigned >= 0)
        rows = assigned[matched_dets]
        correct(tracks, rows, xyxy_to_cxcywh(boxes[matched_dets]))
        if not settings.class_aware:
            tracks.label[rows] = labels[matched_dets]
        tracks.last_seen[rows] = now
        tracks.hits[rows] += 1
        # Unmatched high-score detections start tracks, as matched rows of their own (a track of min_hits 1 is
        # confirmed at once).
        unmatched = duplicates_removed(boxes, high[assigned[high] < 0], np.flatnonzero(assigned >= 0))
        assigned[unmatched] = len(tracks) + np.arange(len(unmatched))
        if len(unmatched):
            self.tracks = tracks = tracks.extend(
                new_tracks(xyxy_to_cxcywh(boxes[unmatched]), labels[unmatched], self.next_serial, now))
            self.next_serial += len(unmatched)
        matched = np.zeros(len(tracks), dtype=bool)
        matched[assigned[assigned >= 0]] = True
        tracks.hits[~matched] = 0

        started = self._confirm(matched)
        track_ids = np.where(assigned >= 0, tracks.track_id[np.maximum(assigned, 0)], 0)
        ended = self._forget(matched, now)
        return track_ids, started, ended

    def _associate(self, iou: np.ndarray, rows: np.ndarray, dets: np.ndarray, min_iou: float,
                   assigned: np.ndarray) -> None:
        """Match tracks `rows` with detections `dets` (both in tie-break order); record it in `assigned`."""
        if len(rows) and len(dets):
            for r, d in match(iou[np.ix_(rows, dets)], min_iou):
                assigned[dets[d]] = rows[r]

    def _confirm(self, matched: np.ndarray) -> list[int]:
        tracks = self.tracks
        tracks.status[matched & (tracks.status == LOST)] = TRACKED
        promote = np.flatnonzero(matched & (tracks.status == TENTATIVE) & (tracks.hits >= self.settings.min_hits))
        started = list(range(self.next_id, self.next_id + len(promote)))
        tracks.track_id[promote] = started
        tracks.status[promote] = TRACKED
        self.next_id += len(promote)
        return started

    def _forget(self, matched: np.ndarray, now: float) -> list[tuple[int, int]]:
        """Drop unmatched tentative tracks, mark unmatched confirmed ones lost, end those lost too long."""
        tracks = self.tracks
        tracks.status[~matched & (tracks.status == TRACKED)] = LOST
        expired = (tracks.status == LOST) & (now - tracks.last_seen > self.settings.max_lost_s)
        ended = list(zip(tracks.track_id[expired].tolist(), tracks.label[expired].tolist()))
        keep = ~expired & (matched | (tracks.status != TENTATIVE))
        if not keep.all():
            self.tracks = tracks.select(keep)
        return ended

    def active(self) -> list[tuple[int, int]]:
        """(track ID, label) of the confirmed tracks, tracked or lost."""
        confirmed = self.tracks.status != TENTATIVE
        return list(zip(self.tracks.track_id[confirmed].tolist(), self.tracks.label[confirmed].tolist()))

    def to_json(self) -> dict:
        return {"next_id": self.next_id, "next_serial": self.next_serial, "tracks": self.tracks.to_json()}

    def restore(self, data: dict) -> None:
        self.next_id, self.next_serial = int(data["next_id"]), int(data["next_serial"])
        self.tracks = TrackSet.from_json(data["tracks"])
