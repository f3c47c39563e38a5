"""ByteTrack-style multi-object tracking by detection, with state that saves to and restores from plain JSON.

Each track's box (centre x, centre y, width, height) follows a constant-velocity Kalman filter. With diagonal noise
and a motion model that couples each coordinate only with its own velocity, the filter splits exactly into four
independent one-dimensional filters, so the whole state is a few (tracks, 4) arrays updated element-wise for all
tracks at once: no per-track matrices, no Python loop over tracks. The noise of x and w is relative to the box's
width, that of y and h to its height, so x and w (and y and h) always have the same covariance: it is kept once.

One `update` per frame, ByteTrack's order (Zhang et al., 2022):
1. predict every track to this frame;
2. match high-score detections to confirmed tracks (tracked or lost) of their class by IoU;
3. match the low-score detections to the confirmed tracks of their class still unmatched: a detection whose score
   dropped (occlusion, blur, a class the model hesitates on) continues its track instead of being thrown away
   (ByteTrack only tries the tracks seen in the previous frame; trying the lost ones too found more of the shapes
   videos' objects, bench/RESULTS.md);
4. match the remaining high-score detections to the confirmed tracks still unmatched whatever their class, at a
   stricter IoU (RELABEL_IOU): the model's class of one object flips between look-alikes (hexagon and circle,
   diamond and square), and the object is no new one;
5. match the remaining high-score detections to tentative tracks of their class; tentative tracks left unmatched
   are dropped;
6. unmatched high-score detections start tentative tracks, except duplicates (IoU >= DUPLICATE_IOU with a
   detection already assigned or starting a track); a tentative track matched `min_hits` frames in a row is
   confirmed and gets the next ID of the source; a confirmed track unmatched for `max_lost_s` ends.
A track's class is the vote of the detections it matched, each weighted by its score (ties: the class it saw
first); class-aware matching uses it.
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
# A high-score detection of another class continues a track only when it overlaps the prediction this much.
RELABEL_IOU = 0.4
WIDTH_HEIGHT = np.array([0, 1, 0, 1])  # the (width, height) column each of cx, cy, w, h is relative to


@dataclass
class TrackSet:
    """All tracks of a source as parallel arrays, in creation order (row i is one track in every array)."""
    track_id: np.ndarray  # (n,) int64, 0 while tentative (IDs start at 1)
    status: np.ndarray  # (n,) int8: TENTATIVE, TRACKED or LOST
    hits: np.ndarray  # (n,) int64, matched frames in a row (for confirmation)
    last_seen: np.ndarray  # (n,) float64, clock time of the last match
    first: np.ndarray  # (n, 4) float64, xyxy box of the detection that started the track
    pos: np.ndarray  # (n, 4) float64 cx, cy, w, h
    vel: np.ndarray  # (n, 4) per nominal frame interval
    p_pp: np.ndarray  # (n, 2) covariance of each coordinate's (position, velocity) pair, for the x and w
    p_pv: np.ndarray  # (n, 2) coordinates (column 0) and the y and h ones (column 1): var(position),
    p_vv: np.ndarray  # (n, 2) covariance(position, velocity), var(velocity)
    votes: np.ndarray  # (n, classes) float64, sum of the scores of the detections matched, per class column

    FIELDS = ("track_id", "status", "hits", "last_seen", "first", "pos", "vel", "p_pp", "p_pv", "p_vv", "votes")
    DTYPES = (np.int64, np.int8, np.int64) + (np.float64,) * 8
    WIDTHS = (0, 0, 0, 0, 4, 4, 4, 2, 2, 2, None)  # columns of each array (0: one-dimensional)

    @classmethod
    def empty(cls, classes: int = 0) -> "TrackSet":
        return cls(*(np.zeros((0, classes if w is None else w) if w != 0 else 0, dtype=dtype)
                     for w, dtype in zip(cls.WIDTHS, cls.DTYPES)))

    def __len__(self) -> int:
        return len(self.track_id)

    def select(self, keep: np.ndarray) -> "TrackSet":
        return TrackSet(*(getattr(self, name)[keep] for name in self.FIELDS))

    def extend(self, other: "TrackSet") -> "TrackSet":
        return TrackSet(*(np.concatenate([getattr(self, name), getattr(other, name)]) for name in self.FIELDS))

    def to_json(self) -> dict:
        data = {name: getattr(self, name).tolist() for name in self.FIELDS if name not in ("first", "votes")}
        # Only a tentative track's first box is ever read (when it is confirmed).
        data["first"] = self.first[self.status == TENTATIVE].tolist()
        # Votes are sparse (a track sees one or two classes): [[column, weight], ...] per track.
        data["votes"] = [[[int(c), float(row[c])] for c in np.flatnonzero(row)] for row in self.votes]
        return data

    @classmethod
    def from_json(cls, data: dict, classes: int) -> "TrackSet":
        arrays = {name: np.asarray(data[name], dtype=dtype).reshape(-1, w) if w else np.asarray(data[name], dtype=dtype)
                  for name, dtype, w in zip(cls.FIELDS, cls.DTYPES, cls.WIDTHS) if name not in ("first", "votes")}
        n = len(arrays["track_id"])
        arrays["first"] = np.full((n, 4), np.nan)  # never read for a confirmed track
        arrays["first"][arrays["status"] == TENTATIVE] = np.asarray(data["first"], dtype=np.float64).reshape(-1, 4)
        arrays["votes"] = np.zeros((n, classes))
        for row, pairs in enumerate(data["votes"]):
            for column, weight in pairs:
                arrays["votes"][row, int(column)] = weight
        return cls(**arrays)


def predict(tracks: TrackSet, steps: float) -> None:
    """Advance every track's filter by `steps` nominal frame intervals (in place)."""
    scale2 = np.square(np.maximum(tracks.pos[:, 2:], 1.0)) * steps
    tracks.pos += steps * tracks.vel
    tracks.p_pp += (2 * steps) * tracks.p_pv + (steps * steps) * tracks.p_vv + POSITION_NOISE ** 2 * scale2
    tracks.p_pv += steps * tracks.p_vv
    tracks.p_vv += VELOCITY_NOISE ** 2 * scale2


def correct(tracks: TrackSet, rows: np.ndarray, measured: np.ndarray) -> None:
    """Kalman update of tracks `rows` with measured (cx, cy, w, h) boxes (in place)."""
    r = MEASUREMENT_NOISE ** 2 * np.square(np.maximum(measured[:, 2:], 1.0))
    p_pp, p_pv, p_vv = tracks.p_pp[rows], tracks.p_pv[rows], tracks.p_vv[rows]
    gain_p, gain_v = p_pp / (p_pp + r), p_pv / (p_pp + r)
    innovation = measured - tracks.pos[rows]
    tracks.pos[rows] += gain_p[:, WIDTH_HEIGHT] * innovation
    tracks.vel[rows] += gain_v[:, WIDTH_HEIGHT] * innovation
    tracks.p_vv[rows] = p_vv - gain_v * p_pv
    tracks.p_pp[rows] = p_pp - gain_p * p_pp
    tracks.p_pv[rows] = p_pv - gain_p * p_pv


def new_tracks(boxes: np.ndarray, votes: np.ndarray, now: float) -> TrackSet:
    """Tentative tracks at xyxy `boxes`: unknown (zero, uncertain) velocity, as ByteTrack initialises."""
    n = len(boxes)
    pos = xyxy_to_cxcywh(boxes)
    scale = np.maximum(pos[:, 2:], 1.0)
    return TrackSet(
        track_id=np.zeros(n, np.int64), status=np.full(n, TENTATIVE, np.int8), hits=np.ones(n, np.int64),
        last_seen=np.full(n, now), first=boxes.astype(np.float64), pos=pos, vel=np.zeros((n, 4)),
        p_pp=(2 * POSITION_NOISE * scale) ** 2, p_pv=np.zeros((n, 2)), p_vv=(10 * VELOCITY_NOISE * scale) ** 2,
        votes=votes)


def xyxy_to_cxcywh(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], axis=1)


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    half = np.maximum(boxes[:, 2:], 0) / 2
    return np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], axis=1)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every xyxy box of `a` with every box of `b`, (len(a), len(b))."""
    ax0, ay0, ax1, ay1 = a.T[:, :, None]
    bx0, by0, bx1, by1 = b.T[:, None, :]
    inter = (np.maximum(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0.0)
             * np.maximum(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0.0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    # Boxes here have positive sizes (detections, and predictions clamped in cxcywh_to_xyxy); an empty union
    # can only come from two zero-size boxes.
    return inter / np.maximum(union, 1e-9)


def duplicates_removed(boxes: np.ndarray, candidates: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """The `candidates` (in tie-break order) that are no duplicate of a detection in `taken` or of an earlier
    candidate kept: DETR may give one object two queries, e.g. the same box as a hexagon and as a circle, and the
    second is no new object."""
    if len(candidates) == 0:
        return candidates
    overlap = iou_matrix(boxes[candidates], boxes) >= DUPLICATE_IOU  # (candidates, detections)
    placed = np.zeros(len(boxes), dtype=bool)
    placed[taken] = True
    kept: list[int] = []
    for k, d in enumerate(candidates.tolist()):
        if not (overlap[k] & placed).any():
            kept.append(d)
            placed[d] = True
    return np.array(kept, dtype=np.int64)


def match(iou: np.ndarray, min_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """The rows and columns of the pairs of the assignment maximising total IoU among pairs with IoU >= min_iou."""
    gate = iou >= min_iou
    # Pairs below the gate get a cost no feasible assignment beats, then are dropped from the answer.
    rows, cols = linear_sum_assignment(np.where(gate, 1.0 - iou, 1e6))
    kept = gate[rows, cols]
    return rows[kept], cols[kept]


class ByteTracker:
    """Tracks of one source. `update` takes one frame's detections; state is `to_json` / `restore`."""

    def __init__(self, settings: TrackingConfig, high_threshold: float):
        self.settings = settings
        self.high_threshold = high_threshold
        self.classes: list[int] = []  # the label of each column of the votes, in the order first seen
        self.column: dict[int, int] = {}  # label -> its column
        self.tracks = TrackSet.empty()
        self.next_id = 1  # the next confirmed track's ID: IDs are never reused

    def labels(self) -> np.ndarray:
        """Each track's class: the label with most votes (ties: the one first seen)."""
        if not self.classes:
            return np.zeros(len(self.tracks), dtype=np.int64)
        return np.asarray(self.classes, dtype=np.int64)[self.tracks.votes.argmax(axis=1)]

    def update(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, steps: float, now: float
               ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
        """One frame: xyxy `boxes`, `scores`, `labels` (already ordered: score desc, then label, then box),
        `steps` nominal frame intervals since the last frame, `now` the clock in seconds.

        Returns the track row each detection joined (-1: none; rows index `self.tracks` after the call), the rows
        of the tracks confirmed in this frame, and the (track ID, label) of the tracks that ended (lost longer than
        max_lost_s; no longer in `self.tracks`)."""
        settings, tracks = self.settings, self.tracks
        predict(tracks, steps)
        columns = self._columns(labels)
        assigned = np.full(len(boxes), -1, dtype=np.int64)  # row of the track each detection joined, -1: none
        high = np.flatnonzero(scores >= self.high_threshold)
        low = np.flatnonzero((scores < self.high_threshold) & (scores >= settings.low_threshold))
        iou = iou_matrix(cxcywh_to_xyxy(tracks.pos), boxes)
        same_class = np.where(self.labels()[:, None] == labels[None, :], iou, 0.0) if settings.class_aware else iou

        confirmed = tracks.status != TENTATIVE
        self._associate(same_class, np.flatnonzero(confirmed), high, settings.match_iou, assigned)
        self._associate(same_class, self._free(confirmed, assigned), low, settings.low_match_iou, assigned)
        left = high[assigned[high] < 0]
        if settings.class_aware and len(left) and self._associate(iou, self._free(confirmed, assigned), left,
                                                                  RELABEL_IOU, assigned):
            left = high[assigned[high] < 0]
        if len(left) and self._associate(same_class, np.flatnonzero(~confirmed), left, settings.match_iou, assigned):
            left = high[assigned[high] < 0]

        matched_dets = np.flatnonzero(assigned >= 0)
        rows = assigned[matched_dets]
        correct(tracks, rows, xyxy_to_cxcywh(boxes[matched_dets]))
        tracks.votes[rows, columns[matched_dets]] += scores[matched_dets]
        tracks.last_seen[rows] = now
        tracks.hits[rows] += 1
        # Unmatched high-score detections start tracks, as matched rows of their own (a track of min_hits 1 is
        # confirmed at once).
        unmatched = duplicates_removed(boxes, left, matched_dets)
        if len(unmatched):
            votes = np.zeros((len(unmatched), len(self.classes)))
            votes[np.arange(len(unmatched)), columns[unmatched]] = scores[unmatched]
            assigned[unmatched] = len(tracks) + np.arange(len(unmatched))
            self.tracks = tracks = tracks.extend(new_tracks(boxes[unmatched], votes, now))
        matched = np.zeros(len(tracks), dtype=bool)
        matched[assigned[assigned >= 0]] = True
        tracks.hits[~matched] = 0

        started = self._confirm(matched)
        ended, kept = self._forget(matched, now)
        if kept is not None:  # rows moved: renumber the assignments and confirmations
            assigned = np.where(assigned >= 0, kept[np.maximum(assigned, 0)], -1)
            started = kept[started]
        return assigned, started, ended

    def _columns(self, labels: np.ndarray) -> np.ndarray:
        """The votes column of each label, adding columns for labels never seen before."""
        labels = labels.tolist()
        for label in labels:
            if label not in self.column:
                self.column[label] = len(self.classes)
                self.classes.append(label)
                self.tracks.votes = np.concatenate([self.tracks.votes, np.zeros((len(self.tracks), 1))], axis=1)
        return np.array([self.column[label] for label in labels], dtype=np.int64)

    @staticmethod
    def _free(rows: np.ndarray, assigned: np.ndarray) -> np.ndarray:
        """The rows among boolean `rows` that no detection has joined yet."""
        free = rows.copy()
        free[assigned[assigned >= 0]] = False
        return np.flatnonzero(free)

    def _associate(self, iou: np.ndarray, rows: np.ndarray, dets: np.ndarray, min_iou: float,
                   assigned: np.ndarray) -> int:
        """Match tracks `rows` with detections `dets` (both in tie-break order); record it in `assigned`. Returns
        the number of pairs."""
        if len(rows) == 0 or len(dets) == 0:
            return 0
        r, d = match(iou[rows][:, dets], min_iou)
        assigned[dets[d]] = rows[r]
        return len(r)

    def _confirm(self, matched: np.ndarray) -> np.ndarray:
        tracks = self.tracks
        tracks.status[matched & (tracks.status == LOST)] = TRACKED
        promote = np.flatnonzero(matched & (tracks.status == TENTATIVE) & (tracks.hits >= self.settings.min_hits))
        tracks.track_id[promote] = np.arange(self.next_id, self.next_id + len(promote))
        tracks.status[promote] = TRACKED
        self.next_id += len(promote)
        return promote

    def _forget(self, matched: np.ndarray, now: float) -> tuple[list[tuple[int, int]], np.ndarray | None]:
        """Drop unmatched tentative tracks, mark unmatched confirmed ones lost, end those lost too long. Returns
        the ended tracks' (ID, label) and, when rows went, each old row's new row (-1: gone)."""
        tracks = self.tracks
        tracks.status[~matched & (tracks.status == TRACKED)] = LOST
        expired = (tracks.status == LOST) & (now - tracks.last_seen > self.settings.max_lost_s)
        ended = list(zip(tracks.track_id[expired].tolist(), self.labels()[expired].tolist())) if expired.any() else []
        keep = ~expired & (matched | (tracks.status != TENTATIVE))
        if keep.all():
            return ended, None
        self.tracks = tracks.select(keep)
        return ended, np.where(keep, np.cumsum(keep) - 1, -1)

    def to_json(self) -> dict:
        return {"next_id": self.next_id, "classes": self.classes, "tracks": self.tracks.to_json()}

    def restore(self, data: dict) -> None:
        self.next_id = int(data["next_id"])
        self.classes = [int(label) for label in data["classes"]]
        self.column = {label: k for k, label in enumerate(self.classes)}
        self.tracks = TrackSet.from_json(data["tracks"], len(self.classes))
