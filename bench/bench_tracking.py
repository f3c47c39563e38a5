"""Our tracker (pipeline/tracking.py) against the `trackers` package's ByteTrack and OC-SORT, on the same detections.

Shapes videos with ground-truth identities (`write_sample_video` with more objects, faster motion, and walls
outside the frame, so shapes occlude each other, cross paths, leave the view and come back) go through the bundled
model once, at a low threshold; the same detections then feed every tracker. Scored with the `trackers` package's
TrackEval-derived metrics (HOTA, IDF1, MOTA, ID switches; tests/test_tracking_eval.py checks them on a hand-computed
case), plus the error of the counts on a grid of lines across the frame against the true crossings (ours: the counts
its analytics report; a peer's: our LineCounter over its tracks), and each tracker's CPU time per frame
(time.process_time around its updates only). Prints one JSON object.

    .venv/bin/python bench/bench_tracking.py [--videos 3] [--seconds 10] [--size 426x240]

Peers run twice: with their defaults, and with their thresholds set to ours (model.threshold 0.5 to start and
match first, detections down to tracking.low_threshold 0.1 in the second stage, 1 s lost buffer).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import av  # noqa: E402
import numpy as np  # noqa: E402
import supervision as sv  # noqa: E402
import torch  # noqa: E402
import trackers  # noqa: E402
from trackers.eval import box_iou, compute_clear_metrics, compute_hota_metrics, compute_identity_metrics  # noqa: E402

from model.training.shapes import CATEGORIES, write_sample_video  # noqa: E402
from pipeline.analytics import LineCounter  # noqa: E402
from pipeline.config import LineConfig, ModelSettings, SourceConfig, TrackingConfig, ZoneConfig  # noqa: E402
from pipeline.sample_video import parse_size  # noqa: E402
from pipeline.schema import Detection, FrameResult  # noqa: E402
from pipeline.tracking import SourceTracker  # noqa: E402
from pipeline.worker import Detector  # noqa: E402

NAMES = {c["id"]: c["name"] for c in CATEGORIES}
MODEL_THRESHOLD = 0.5  # ModelSettings' default output threshold
# A tracked box: (track ID, label id, [x0, y0, x1, y1]).
Tracked = tuple[int, int, tuple[float, float, float, float]]


def make_videos(folder: Path, args: argparse.Namespace) -> list[Path]:
    return [write_sample_video(folder / f"seed{seed}.mp4", seconds=args.seconds, size=args.size, seed=seed,
                               fps=args.fps, max_objects=args.max_objects, speed=args.speed,
                               margin=args.margin * min(args.size)) for seed in range(args.videos)]


def detect(detector: Detector, video: Path, batch: int = 8) -> list[FrameResult]:
    """The model's detections (down to its threshold) of every frame, as the pipeline's workers give them."""
    with av.open(str(video)) as container:
        frames = [(f.to_ndarray(format="rgb24"), f.time) for f in container.decode(video=0)]
    results = []
    for start in range(0, len(frames), batch):
        chunk = frames[start:start + batch]
        outputs, _ = detector([torch.from_numpy(rgb) for rgb, _ in chunk], [rgb.shape[:2] for rgb, _ in chunk])
        for k, ((rgb, pts), (detections, _)) in enumerate(zip(chunk, outputs)):
            results.append(FrameResult(source_id=video.stem, frame_index=start + k, pts=pts, captured_at=0.0,
                                       width=rgb.shape[1], height=rgb.shape[0], model="shapes-tiny",
                                       detections=detections))
    return results


def ground_truth(video: Path, box: str = "bbox") -> list[list[Tracked]]:
    """The visible objects of each frame with their true identity; `box`: "bbox" (the visible part's box) or
    "full_bbox" (the whole shape's, occluded and off-frame parts included)."""
    gt = json.loads(Path(f"{video}.gt.json").read_text())
    return [[(o["track"], o["category_id"], (o[box][0], o[box][1], o[box][0] + o[box][2], o[box][1] + o[box][3]))
             for o in f["objects"]] for f in gt["frames"]]


def lines_of(width: int, height: int) -> list[LineConfig]:
    """A grid of lines across the frame (at a quarter, half and three quarters of each side): more crossings to
    count per video than one line gives, at no extra detection cost."""
    return [LineConfig(name=f"{name}-{k}/4", points=points, in_side="right") for k in (1, 2, 3)
            for name, points in (("vertical", ((width * k / 4, 0), (width * k / 4, height))),
                                 ("horizontal", ((0, height * k / 4), (width, height * k / 4))))]


def run_ours(results: list[FrameResult], lines: list[LineConfig], stuff: set[int],
             zones: list[ZoneConfig] = ()) -> tuple[list[list[Tracked]], float, dict[str, int]]:
    """Our tracks, CPU seconds, and our own line counts (as count_lines keys) after the last frame."""
    source = SourceConfig(id="bench", url="bench.mp4", lines=lines, zones=list(zones))
    tracker = SourceTracker(TrackingConfig(), source, MODEL_THRESHOLD, stuff_labels=stuff)
    out, cpu, tracked = [], 0.0, None
    for result in results:
        started = time.process_time()
        tracked = tracker.update(result)
        cpu += time.process_time() - started
        out.append([(d.track_id, d.label, d.box) for d in tracked.detections if d.track_id is not None])
    counts = {} if tracked is None else {
        f"{line.name}/{direction}/{name}": n for line in tracked.analytics.lines
        for direction, by_class in (("in", line.counts_in), ("out", line.counts_out)) for name, n in by_class.items()}
    return out, cpu, counts


def run_peer(tracker, results: list[FrameResult], stuff: set[int]) -> tuple[list[list[Tracked]], float]:
    out, cpu = [], 0.0
    for result in results:
        dets = [d for d in result.detections if d.label not in stuff]  # as ours: "grass" is not tracked
        detections = sv.Detections(xyxy=np.array([d.box for d in dets], dtype=np.float32).reshape(-1, 4),
                                   confidence=np.array([d.score for d in dets], dtype=np.float32),
                                   class_id=np.array([d.label for d in dets], dtype=int))
        started = time.process_time()
        tracked = tracker.update(detections)
        cpu += time.process_time() - started
        out.append([(int(t), int(c), tuple(b)) for t, c, b in zip(tracked.tracker_id.tolist(),
                                                                 tracked.class_id.tolist(), tracked.xyxy.tolist())
                    if t >= 0])
    return out, cpu


def peers(fps: int) -> dict:
    """The `trackers` trackers, with their defaults and with our thresholds (see the module docstring)."""
    ours = TrackingConfig()
    aligned = {"frame_rate": fps, "lost_track_buffer": round(30 * ours.max_lost_s),
               "high_conf_det_threshold": MODEL_THRESHOLD}
    return {
        "bytetrack": lambda: trackers.ByteTrackTracker(frame_rate=fps),
        "bytetrack_aligned": lambda: trackers.ByteTrackTracker(track_activation_threshold=MODEL_THRESHOLD,
                                                               **aligned),
        "ocsort": lambda: trackers.OCSORTTracker(frame_rate=fps),
        "ocsort_aligned": lambda: trackers.OCSORTTracker(**aligned),
    }


def synthetic_frames(objects: int = 20, frames: int = 500) -> list[FrameResult]:
    """`objects` boxes a frame moving at constant speeds across a 1280x720 frame, scores spread over 0.3-0.9."""
    rng = np.random.default_rng(0)
    start, speed = rng.uniform(50, 1200, (objects, 2)), rng.uniform(-5, 5, (objects, 2))
    out = []
    for i in range(frames):
        detections = [Detection(label=1 + k % 6, label_name=NAMES[1 + k % 6],
                                score=0.3 + 0.6 * ((7 * k + i) % 10) / 10, box=(x - 20, y - 20, x + 20, y + 20))
                      for k, (x, y) in enumerate((start + speed * i).tolist())]
        out.append(FrameResult(source_id="synthetic", frame_index=i, pts=i / 25, captured_at=0.0, width=1280,
                               height=720, model="synthetic", detections=detections))
    return out


def synthetic_cost(fps: int, repeats: int = 3) -> dict[str, float]:
    """CPU ms per frame of each tracker with 20 detections a frame (the issue's cost target is for ours), the
    best of `repeats` runs, interleaved: the load of a shared machine varies from second to second."""
    frames = synthetic_frames()
    line = LineConfig(name="gate", points=((640, 0), (640, 720)), in_side="right")
    zone = ZoneConfig(name="dock", polygon=[(100, 100), (600, 100), (600, 600), (100, 600)])
    runs = {"ours": lambda: run_ours(frames, [], set())[1],
            "ours_1_line_1_zone": lambda: run_ours(frames, [line], set(), [zone])[1],
            **{name: (lambda make=make: run_peer(make(), frames, set())[1]) for name, make in peers(fps).items()}}
    costs: dict[str, float] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            costs[name] = min(costs.get(name, float("inf")), run())
    return {name: round(seconds / len(frames) * 1e3, 4) for name, seconds in costs.items()}


def count_lines(frames: list[list[Tracked]], lines: list[LineConfig]) -> dict[str, int]:
    """Crossings per line, direction and class, counted by our LineCounter over any tracker's tracks."""
    counters = [LineCounter(line) for line in lines]
    for tracked in frames:
        tracked = sorted(tracked)
        boxes = np.array([box for _, _, box in tracked], dtype=np.float64).reshape(-1, 4)
        for counter in counters:
            counter.observe([track_id for track_id, _, _ in tracked], [NAMES[label] for _, label, _ in tracked],
                            boxes)
    return {f"{c.line.name}/{direction}/{name}": n for c in counters
            for direction, counts in (("in", c.counts_in), ("out", c.counts_out)) for name, n in counts.items()}


def count_error(counts: dict[str, int], truth: dict[str, int], per_class: bool = True) -> float:
    """Sum over lines, directions (and classes) of |counted - true|, over the true total."""
    if not per_class:
        counts, truth = _classless(counts), _classless(truth)
    keys = set(counts) | set(truth)
    return sum(abs(counts.get(k, 0) - truth.get(k, 0)) for k in keys) / max(1, sum(truth.values()))


def _classless(counts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, n in counts.items():
        line_direction = key.rsplit("/", 1)[0]
        out[line_direction] = out.get(line_direction, 0) + n
    return out


def mot_metrics(truth: list[list[Tracked]], tracked: list[list[Tracked]]) -> dict[str, float]:
    """HOTA, IDF1, MOTA and ID switches of one sequence, class-agnostic, by `trackers.eval` (IoU similarity)."""
    gt_map, hyp_map = {}, {}  # the metrics want IDs 0..n-1
    gt_ids, hyp_ids, similarity = [], [], []
    for gt, hyp in zip(truth, tracked):
        gt_ids.append(np.array([gt_map.setdefault(t, len(gt_map)) for t, _, _ in gt], dtype=int))
        hyp_ids.append(np.array([hyp_map.setdefault(t, len(hyp_map)) for t, _, _ in hyp], dtype=int))
        similarity.append(box_iou(np.array([b for _, _, b in gt], dtype=float).reshape(-1, 4),
                                  np.array([b for _, _, b in hyp], dtype=float).reshape(-1, 4)))
    hota = compute_hota_metrics(gt_ids, hyp_ids, similarity)
    identity = compute_identity_metrics(gt_ids, hyp_ids, similarity)
    clear = compute_clear_metrics(gt_ids, hyp_ids, similarity)
    return {"HOTA": hota["HOTA"], "DetA": hota["DetA"], "AssA": hota["AssA"], "IDF1": identity["IDF1"],
            "MOTA": clear["MOTA"], "IDSW": clear["IDSW"], "IDTP": identity["IDTP"], "IDFN": identity["IDFN"],
            "IDFP": identity["IDFP"], "CLR_TP": clear["CLR_TP"], "CLR_FN": clear["CLR_FN"],
            "CLR_FP": clear["CLR_FP"]}


def pooled(per_video: list[dict[str, float]]) -> dict[str, float]:
    """Metrics over all videos: counts summed, IDF1 and MOTA from the sums, HOTA weighted by ground-truth boxes."""
    total = {k: sum(m[k] for m in per_video) for k in ("IDTP", "IDFN", "IDFP", "CLR_TP", "CLR_FN", "CLR_FP",
                                                       "IDSW")}
    gt_boxes = [m["CLR_TP"] + m["CLR_FN"] for m in per_video]
    weighted = {k: sum(m[k] * w for m, w in zip(per_video, gt_boxes)) / sum(gt_boxes) for k in ("HOTA", "DetA",
                                                                                               "AssA")}
    idf1 = 2 * total["IDTP"] / max(1, 2 * total["IDTP"] + total["IDFN"] + total["IDFP"])
    mota = 1 - (total["CLR_FN"] + total["CLR_FP"] + total["IDSW"]) / max(1, total["CLR_TP"] + total["CLR_FN"])
    return {**{k: round(v, 4) for k, v in weighted.items()}, "IDF1": round(idf1, 4), "MOTA": round(mota, 4),
            "IDSW": total["IDSW"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--size", type=parse_size, default=(426, 240), metavar="WxH")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--max-objects", type=int, default=10, help="shapes per video: 1 to this many")
    parser.add_argument("--speed", type=float, default=1.5, help="factor on the sample video's speed")
    parser.add_argument("--margin", type=float, default=0.3,
                        help="walls this far outside the frame (x its shorter side): shapes leave and come back")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the detector")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    detector = Detector(ModelSettings(threshold=TrackingConfig().low_threshold))
    makers = {"ours": None, **peers(args.fps)}
    per_video: dict[str, list[dict]] = {name: [] for name in makers}
    counts: dict[str, dict[str, int]] = {name: {} for name in ["truth", *makers]}
    cpu = {name: 0.0 for name in makers}
    frames = detections = 0
    with tempfile.TemporaryDirectory() as folder:
        for video in make_videos(Path(folder), args):
            results, truth = detect(detector, video), ground_truth(video)
            frames += len(results)
            detections += sum(len(r.detections) for r in results)
            lines = lines_of(*args.size)
            # True crossings: the whole shape's anchor crossing, as long as some of it is visible; the visible
            # part's box would "cross" a line wherever an occluder or the frame edge cuts it.
            _add(counts["truth"], count_lines(ground_truth(video, "full_bbox"), lines))
            for name, make in makers.items():
                if make is None:  # ours: the counts its own analytics report (track class by vote)
                    tracked, seconds, counted = run_ours(results, lines, detector.stuff)
                else:  # a peer: our LineCounter over its tracks
                    tracked, seconds = run_peer(make(), results, detector.stuff)
                    counted = count_lines(tracked, lines)
                cpu[name] += seconds
                per_video[name].append(mot_metrics(truth, tracked))
                _add(counts[name], counted)
    report = {name: {**pooled(per_video[name]),
                     "line_count_error": round(count_error(counts[name], counts["truth"]), 4),
                     "line_count_error_any_class": round(count_error(counts[name], counts["truth"], False), 4),
                     "cpu_ms_per_frame": round(cpu[name] / frames * 1e3, 4)} for name in makers}
    print(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load": os.getloadavg()},
        "videos": args.videos, "frames": frames, "size": list(args.size), "fps": args.fps,
        "detections_per_frame": round(detections / frames, 1), "truth_crossings": sum(counts["truth"].values()),
        "trackers": report, "cpu_ms_per_frame_20_detections": synthetic_cost(args.fps),
        "wall_s": round(time.time() - started, 1)}, indent=2))


def _add(into: dict[str, int], more: dict[str, int]) -> None:
    for key, n in more.items():
        into[key] = into.get(key, 0) + n


if __name__ == "__main__":
    main()
