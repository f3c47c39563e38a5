"""The per-source tracker and its line/zone analytics on hand-built detection sequences (pipeline/tracking.py)."""
import json

import numpy as np
import pytest

from pipeline.config import SourceConfig, TrackingConfig
from pipeline.geometry import points_in_polygon, polygon_edges
from pipeline.schema import Detection, FrameResult
from pipeline.tracking import SourceTracker

FPS = 25
THRESHOLD = 0.5
STUFF = 7  # label id of a stuff class ("sky" in the shapes model)


def det(x: float, y: float, label: int = 1, score: float = 0.9, size: float = 20) -> Detection:
    """A detection whose box's bottom-centre (the default anchor) is at (x, y)."""
    name = {1: "circle", 2: "square", STUFF: "sky"}[label]
    return Detection(label=label, label_name=name, score=score, box=(x - size / 2, y - size, x + size / 2, y))


def frame(index: int, detections: list[Detection], pts: float | None = None) -> FrameResult:
    return FrameResult(source_id="cam", frame_index=index, pts=index / FPS if pts is None else pts, captured_at=0.0,
                       width=640, height=480, model="test", detections=detections)


def source(**extra) -> SourceConfig:
    return SourceConfig(id="cam", url="clip.mp4", **extra)


def tracker(src: SourceConfig | None = None, **settings) -> SourceTracker:
    return SourceTracker(TrackingConfig(**settings), src or source(), THRESHOLD, stuff_labels={STUFF})


def run(t: SourceTracker, frames: list[FrameResult]) -> list[FrameResult]:
    return [t.update(f) for f in frames]


def ids(result: FrameResult) -> list[int | None]:
    return [d.track_id for d in result.detections]


def events(results: list[FrameResult], kind: str | None = None) -> list[dict]:
    return [{"frame": r.frame_index, **e.model_dump(exclude_none=True)}
            for r in results for e in r.analytics.events if kind is None or e.type == kind]


def test_a_track_is_confirmed_on_its_second_frame_and_keeps_its_id():
    results = run(tracker(), [frame(i, [det(100 + 5 * i, 200)]) for i in range(10)])
    assert ids(results[0]) == [None]  # tentative: not yet a confirmed track
    assert {tuple(ids(r)) for r in results[1:]} == {(1,)}
    assert events(results) == [{"frame": 1, "type": "track_started", "track_id": 1, "label_name": "circle"}]


def test_crossing_paths_keep_their_ids():
    # Two circles on nearly the same row move towards each other, pass, and go on; while they overlap the
    # detector sees only the front one. Their motion carries each identity through.
    frames = []
    for i in range(40):
        a, b = det(100 + 10 * i, 200), det(500 - 10 * i, 204)
        frames.append(frame(i, [b] if 17 <= i <= 22 else [a, b]))
    results = run(tracker(), frames)
    first, last = results[5], results[-1]
    a_id, b_id = ids(first)
    assert a_id != b_id and ids(last) == [a_id, b_id]
    assert len(events(results, "track_started")) == 2 and not events(results, "track_ended")


def test_occlusion_keeps_the_id_within_max_lost_s():
    frames = [frame(i, [] if 10 <= i < 20 else [det(100 + 4 * i, 200)]) for i in range(30)]  # 0.4 s unseen
    results = run(tracker(max_lost_s=1.0), frames)
    assert ids(results[9]) == ids(results[20]) == ids(results[29]) == [1]
    assert not events(results, "track_ended")


def test_reentry_after_max_lost_s_is_a_new_id_never_a_reused_one():
    # Gone for 2 s: the track ends; the object that comes back gets the next ID.
    frames = [frame(i, [] if 10 <= i < 60 else [det(100, 200)]) for i in range(70)]
    results = run(tracker(max_lost_s=1.0), frames)
    assert ids(results[9]) == [1] and ids(results[61]) == [2]
    ended = events(results, "track_ended")
    assert [(e["track_id"], e["frame"]) for e in ended] == [(1, 35)]  # first frame more than 1 s after frame 9


def test_a_low_score_frame_is_bridged_by_the_second_stage():
    frames = [frame(i, [det(100 + 5 * i, 200, score=0.3 if i in (5, 6) else 0.9)]) for i in range(10)]
    # A low-score detection far from every track is noise: not in the output.
    frames[5].detections.append(det(400, 400, score=0.3))
    results = run(tracker(), frames)
    assert [ids(r) for r in results[4:8]] == [[1], [1], [1], [1]]
    assert [d.score for d in results[5].detections] == [0.3]
    # Without the second stage (low_threshold above the scores), the track is lost over those frames.
    plain = run(tracker(low_threshold=0.45), frames)
    assert ids(plain[5]) == [] and ids(plain[7]) == [1]


def test_stuff_is_never_tracked_nor_counted():
    gate = {"name": "gate", "points": [[0, 200], [640, 200]], "in_side": "right"}
    frames = [frame(i, [det(300, 150 + 10 * i), det(300, 150 + 10 * i, label=STUFF, size=200)]) for i in range(12)]
    results = run(tracker(source(lines=[gate])), frames)
    assert {d.track_id for r in results for d in r.detections if d.label == STUFF} == {None}
    assert results[-1].analytics.lines[0].counts_in == {"circle": 1}  # the sky crossed too, and is not counted


def test_classes_are_matched_separately():
    # A circle and a square side by side (IoU 0.25): each keeps a track of its class.
    frames = [frame(i, [det(100 + 5 * i, 200, label=1), det(112 + 5 * i, 200, label=2)]) for i in range(10)]
    results = run(tracker(), frames)
    assert ids(results[9]) == [1, 2]
    assert {e["label_name"] for e in events(results, "track_started")} == {"circle", "square"}


def test_a_class_flip_continues_the_track_and_the_vote_keeps_its_class():
    # The model calls a circle a square for three frames (a look-alike) as it crosses the gate: no new track, and
    # the track's class (the score-weighted vote of its detections) stays circle, in the counts and the events.
    gate = {"name": "gate", "points": [[0, 200], [640, 200]], "in_side": "right"}
    frames = [frame(i, [det(300, 150 + 5 * i, label=2 if 9 <= i < 12 else 1, score=0.6 if 9 <= i < 12 else 0.9)])
              for i in range(20)]
    results = run(tracker(source(lines=[gate])), frames)
    assert {tuple(ids(r)) for r in results[1:]} == {(1,)}
    assert [d.label_name for d in results[10].detections] == ["square"]  # the detection keeps the model's class
    crossed = events(results, "line_crossed")
    assert [(e["frame"], e["label_name"]) for e in crossed] == [(11, "circle")]
    assert results[-1].analytics.lines[0].counts_in == {"circle": 1}
    # A square seen longer outvotes the circle: from then on the track is a square.
    frames += [frame(20 + i, [det(300, 250 + 5 * i, label=2)]) for i in range(20)]
    results = run(tracker(source(lines=[gate])), frames)
    assert {tuple(ids(r)) for r in results[1:]} == {(1,)}
    ended = run(tracker(source(lines=[gate]), max_lost_s=0.1), frames + [frame(40 + i, []) for i in range(5)])
    assert [e["label_name"] for e in events(ended, "track_ended")] == ["square"]


def test_a_crossing_while_tentative_counts_once_confirmed():
    # Confirmed on its third frame (min_hits 3), the object was past the gate by then: the gate counts it when the
    # track is confirmed, from where the track started (its anchor at y 190, 198, 206, ...; the margin is 2 px).
    gate = {"name": "gate", "points": [[0, 200], [640, 200]], "in_side": "right"}
    frames = [frame(i, [det(300, 190 + 8 * i)]) for i in range(6)]
    results = run(tracker(source(lines=[gate]), min_hits=3), frames)
    assert [(e["frame"], e["direction"]) for e in events(results, "line_crossed")] == [(2, "in")]
    assert results[-1].analytics.lines[0].counts_in == {"circle": 1}


def test_frames_without_a_high_score_detection_start_nothing():
    # The first frames have only low-score detections (no track yet to continue): nothing is tracked nor kept.
    frames = [frame(i, [det(100, 200, score=0.3), det(300, 200, score=0.2)]) for i in range(3)]
    results = run(tracker(), frames + [frame(3, [det(100, 200)]), frame(4, [det(100, 200)])])
    assert [ids(r) for r in results] == [[], [], [], [None], [1]]


def test_same_detections_in_another_order_give_the_same_ids():
    def frames(reverse: bool) -> list[FrameResult]:
        out = []
        for i in range(8):
            dets = [det(100 + 40 * k + 3 * i, 200, score=0.9) for k in range(5)]
            out.append(frame(i, dets[::-1] if reverse else dets))
        return out
    straight, reverse = run(tracker(), frames(False)), run(tracker(), frames(True))
    assert ids(straight[-1]) == ids(reverse[-1])[::-1]
    assert sorted(ids(straight[-1])) == [1, 2, 3, 4, 5]


def test_line_counts_both_directions_once_despite_jitter():
    gate = {"name": "gate", "points": [[0, 200], [640, 200]], "in_side": "right"}
    # Down to the line, standing on it with the anchor jittering +-1.5 px across it, on down, then back up.
    ys = [150 + 10 * i for i in range(5)] + [200 + (1.5 if i % 2 else -1.5) for i in range(10)] \
        + [210 + 10 * i for i in range(5)] + [250 - 10 * i for i in range(12)]
    results = run(tracker(source(lines=[gate])), [frame(i, [det(300, y)]) for i, y in enumerate(ys)])
    crossed = events(results, "line_crossed")
    # The line runs left to right; its right-hand side (walking p0->p1 on the image) is below it.
    assert [e["direction"] for e in crossed] == ["in", "out"]
    assert results[-1].analytics.lines[0].model_dump() == {"name": "gate", "counts_in": {"circle": 1},
                                                           "counts_out": {"circle": 1}}


def test_line_class_filter_and_segment_extent():
    gate = {"name": "gate", "points": [[200, 200], [400, 200]], "in_side": "left", "labels": ["square"]}
    frames = [frame(i, [det(300, 150 + 10 * i, label=2), det(100, 150 + 10 * i, label=2),
                        det(340, 150 + 10 * i, label=1)]) for i in range(12)]
    results = run(tracker(source(lines=[gate])), frames)
    # Only the square through the segment counts: the other square passes beside it, the circle is filtered out.
    assert results[-1].analytics.lines[0].counts_out == {"square": 1}
    assert results[-1].analytics.lines[0].counts_in == {}


def test_zone_occupancy_and_dwell():
    dock = {"name": "dock", "polygon": [[205, 100], [405, 100], [405, 300], [205, 300]]}
    xs = [100 + 10 * i for i in range(40)]  # enters at x=210 (frame 11), leaves at x=410 (frame 31)
    results = run(tracker(source(zones=[dock])), [frame(i, [det(x, 200)]) for i, x in enumerate(xs)])
    entered, left = events(results, "zone_entered"), events(results, "zone_left")
    assert [e["frame"] for e in entered] == [11] and [e["frame"] for e in left] == [31]
    assert left[0]["dwell_s"] == pytest.approx(20 / FPS)
    assert results[20].analytics.zones[0].occupancy == {"circle": 1}
    assert results[-1].analytics.zones[0].occupancy == {}


def test_points_in_a_concave_zone():
    # A "C" shape: the notch (x 10-30, y 10-20) is outside; vertices and horizontal edges do not confuse the ray.
    c_shape = [(0, 0), (30, 0), (30, 10), (10, 10), (10, 20), (30, 20), (30, 30), (0, 30)]
    points = {(5, 15): True, (20, 15): False, (20, 5): True, (20, 25): True, (35, 15): False, (5, 10): True,
              (-1, 5): False, (15, 35): False}
    x, y = np.array(list(points), dtype=np.float64).T
    assert points_in_polygon(x, y, polygon_edges(c_shape)).tolist() == list(points.values())


def test_a_track_that_ends_inside_a_zone_leaves_it():
    dock = {"name": "dock", "polygon": [[0, 0], [640, 0], [640, 480], [0, 480]]}
    frames = [frame(i, [det(300, 200)] if i < 10 else []) for i in range(50)]
    results = run(tracker(source(zones=[dock]), max_lost_s=1.0), frames)
    ending = [e for e in events(results) if e["frame"] == 35]
    assert [e["type"] for e in ending] == ["zone_left", "track_ended"]
    assert ending[0]["dwell_s"] == pytest.approx(8 / FPS)  # confirmed (frame 1) to last seen inside (frame 9)
    assert results[20].analytics.zones[0].occupancy == {"circle": 1}  # briefly lost: still there
    assert results[-1].analytics.zones[0].occupancy == {}


@pytest.mark.parametrize("pts", [
    [i / FPS for i in range(15)] + [i / FPS for i in range(15)],  # a reconnect restarts pts
    [i / FPS for i in range(15)] + [1000 + i / FPS for i in range(15)],  # a jump forward
    [None] * 30,  # no pts at all
])
def test_pts_that_restart_or_jump_are_not_time(pts):
    dock = {"name": "dock", "polygon": [[0, 0], [640, 0], [640, 480], [0, 480]]}
    frames = [frame(i, [det(100 + 5 * i, 200)] if i < 29 else [], pts=p) for i, p in enumerate(pts)]
    results = run(tracker(source(zones=[dock]), max_lost_s=0.5), frames)
    assert {tuple(ids(r)) for r in results[1:29]} == {(1,)}
    assert not events(results, "track_ended")
    more = [frame(30 + i, [], pts=None) for i in range(20)]
    t = tracker(source(zones=[dock]), max_lost_s=0.5)
    ended = events(run(t, frames + more), "track_ended")
    assert [e["frame"] for e in ended] == [41]  # 13 frames of 1/25 s after frame 28: just over 0.5 s


def _busy_sequence() -> list[FrameResult]:
    """Several objects crossing a line and a zone, one occluded for a while, one low-score frame, one leaving,
    one whose class flips for a few frames."""
    frames = []
    for i in range(60):
        flipped = 2 if 40 <= i < 43 else 1  # the model hesitates between look-alikes
        dets = [det(50 + 8 * i, 150, label=flipped), det(600 - 7 * i, 260, label=2, score=0.35 if i == 30 else 0.8)]
        if not 20 <= i < 26:
            dets.append(det(300, 60 + 6 * i, label=1, score=0.7))
        if i < 25:
            dets.append(det(500, 400, label=2, score=0.6))
        frames.append(frame(i, dets))
    return frames


def test_a_snapshot_mid_sequence_continues_exactly():
    src = source(lines=[{"name": "gate", "points": [[320, 0], [320, 480]], "in_side": "left"},
                        {"name": "row", "points": [[0, 250], [640, 250]], "in_side": "right"}],
                 zones=[{"name": "dock", "polygon": [[250, 100], [450, 100], [450, 300], [250, 300]]}])
    frames = _busy_sequence()
    whole = run(tracker(src), frames)
    assert events(whole, "line_crossed") and events(whole, "zone_left") and events(whole, "track_ended")
    for cut in (1, 23, 31, 41):
        first = tracker(src)
        run(first, frames[:cut])
        state = json.loads(json.dumps(first.snapshot()))  # through JSON, as it is stored
        assert state["v"] == 1 and state["frame_index"] == cut - 1
        resumed = SourceTracker(TrackingConfig(), src, THRESHOLD, stuff_labels={STUFF}, snapshot=state)
        rest = run(resumed, frames[cut:])
        assert [r.model_dump() for r in rest] == [r.model_dump() for r in whole[cut:]]
        assert json.dumps(resumed.snapshot()) == json.dumps(tracker_after(src, frames).snapshot())


def tracker_after(src: SourceConfig, frames: list[FrameResult]) -> SourceTracker:
    t = tracker(src)
    run(t, frames)
    return t


def test_frames_out_of_order_are_refused():
    t = tracker()
    run(t, [frame(0, [det(100, 200)]), frame(1, [det(100, 200)])])
    with pytest.raises(ValueError, match="frame 1 given after frame 1"):
        t.update(frame(1, []))
    resumed = SourceTracker(TrackingConfig(), source(), THRESHOLD, snapshot=t.snapshot())
    with pytest.raises(ValueError, match="frame 0 given after frame 1"):
        resumed.update(frame(0, []))
    with pytest.raises(ValueError, match="snapshot version"):
        SourceTracker(TrackingConfig(), source(), THRESHOLD, snapshot={**t.snapshot(), "v": 2})
