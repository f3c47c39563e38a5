"""What bench/bench_tracking.py measures with: the `trackers` package's metrics on a hand-computed case, line counts
over any tracker's tracks, and the shapes videos whose objects leave the view and come back."""
import importlib.util
import json
from pathlib import Path

import pytest

from model.training.shapes import write_sample_video

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_tracking.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_tracking", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _box(k: int) -> tuple[float, float, float, float]:
    return (100.0 * k, 0.0, 100.0 * k + 50, 50.0)


def test_metrics_match_a_hand_computed_case(bench):
    # Two objects, four frames, boxes found exactly (IoU 1, so every HOTA threshold agrees). The tracker keeps A as
    # track 1 but switches B from track 2 to track 3 at frame 2, and reports a false box (track 4) in frame 0.
    truth = [[(0, 1, _box(0)), (1, 1, _box(1))] for _ in range(4)]
    tracked = [[(1, 1, _box(0)), (2 if f < 2 else 3, 1, _box(1))] for f in range(4)]
    tracked[0].append((4, 1, _box(5)))
    metrics = bench.mot_metrics(truth, tracked)
    # CLEAR: 8 TP, 1 FP, 0 FN, 1 switch: MOTA = (8 - 1 - 1) / 8.
    assert (metrics["CLR_TP"], metrics["CLR_FP"], metrics["CLR_FN"], metrics["IDSW"]) == (8, 1, 0, 1)
    assert metrics["MOTA"] == pytest.approx(0.75)
    # Identity: A<->1 (4 frames) and B<->2 (2): IDTP 6, IDFN 2, IDFP 2 + 1; IDF1 = 2*6 / (2*6 + 2 + 3).
    assert metrics["IDF1"] == pytest.approx(12 / 17)
    # HOTA: DetA = 8 / (8 + 0 + 1); AssA = mean over the 8 TPs of TPA / (TPA + FNA + FPA): A's 4 pairs 4/4, B's
    # 2 pairs with track 2 and 2 with track 3 each 2/4, so (4 + 1 + 1) / 8; HOTA = sqrt(DetA * AssA).
    assert metrics["DetA"] == pytest.approx(8 / 9)
    assert metrics["AssA"] == pytest.approx(0.75)
    assert metrics["HOTA"] == pytest.approx((8 / 9 * 0.75) ** 0.5)


def test_line_counts_and_their_error(bench):
    lines = bench.lines_of(200, 100)  # vertical lines at x=50, 100, 150, horizontal ones at y=25, 50, 75
    # Track 1 (a circle) walks right across the vertical line; track 2 (a square) stands still.
    frames = [[(1, 1, (60.0 + 10 * f, 10.0, 80.0 + 10 * f, 30.0)), (2, 2, (150.0, 60.0, 170.0, 80.0))]
              for f in range(8)]
    counts = bench.count_lines(frames, lines)
    # It crosses x=100 only (the right-hand side of a line walked top to bottom is the left).
    assert counts == {"vertical-2/4/out/circle": 1}
    truth = {"vertical-2/4/out/circle": 1, "horizontal-2/4/in/square": 1}
    assert bench.count_error(counts, truth) == pytest.approx(0.5)
    assert bench.count_error({"vertical/out/square": 1}, {"vertical/out/circle": 1}) == pytest.approx(2.0)
    assert bench.count_error({"vertical/out/square": 1}, {"vertical/out/circle": 1}, per_class=False) == 0.0


def test_sample_video_objects_leave_and_come_back_with_their_identity(tmp_path):
    video = write_sample_video(tmp_path / "clip.mp4", seconds=4.0, size=(96, 64), seed=1, fps=10, max_objects=4,
                               speed=3.0, margin=40)
    frames = json.loads(Path(f"{video}.gt.json").read_text())["frames"]
    visible = [{o["track"] for o in f["objects"]} for f in frames]
    tracks = set().union(*visible)
    returned = [t for t in tracks
                if any(t in a and t not in b and any(t in c for c in visible[i + 2:])
                       for i, (a, b) in enumerate(zip(visible, visible[1:])))]
    assert returned, "no object left the view and came back"
    # The whole shape's box reaches beyond the frame where the visible box is cut by its edge.
    boxes = [o["full_bbox"] for f in frames for o in f["objects"]]
    assert min(b[0] for b in boxes) < 0 or max(b[0] + b[2] for b in boxes) > 96
