"""Tracking in the pipeline (issue 19), with real Ray, redis-server and the bundled model on a shapes video: track
IDs, line counts, zone occupancy and events are written exactly once like the frames, the tracker's state with
them. A run disturbed by a driver killed (SIGKILL) and run again, a worker killed, and Redis restarted from an
older snapshot (losing its last writes) ends with the same track IDs, counts and events as an undisturbed run,
wherever the detections are the same; the test prints how often re-batching changed a detection."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import free_port, run_in_thread, stop_if_running, wait_for
from model.training.shapes import write_sample_video
from pipeline.cli import main
from pipeline.config import PipelineConfig
from pipeline.redis_server import start_redis_server
from pipeline.render import annotate, follow
from pipeline.runner import Job
from pipeline.schema import FrameResult, json_schema
from pipeline.sink import RedisSink, connect
from pipeline.source_tracking import restorable

FRAMES, FPS, SIZE = 100, 10, (256, 192)
LINES = [{"name": "middle", "points": [[128, 0], [128, 192]], "in_side": "right"},
         {"name": "across", "points": [[0, 100], [256, 100]], "in_side": "left"}]
ZONES = [{"name": "corner", "polygon": [[0, 96], [128, 96], [128, 192], [0, 192]]}]
THRESHOLD = 0.5  # model.threshold's default


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_sample_video(tmp_path_factory.mktemp("tracking") / "shapes.mp4", seconds=FRAMES / FPS, size=SIZE,
                              seed=5, fps=FPS)


def config(video: Path, redis_url: str, prefix: str, **extra) -> dict:
    return {"sources": [{"id": "shapes", "url": str(video), "lines": LINES, "zones": ZONES}],
            "batching": {"max_batch_size": 4, "max_in_flight_per_source": 8},
            "decoder": {"num_cpus": 0.1, "open_timeout_s": 5}, "workers": {"num_cpus": 0.5},
            "redis": {"url": redis_url, "prefix": prefix, "retry_initial_s": 0.05, "retry_max_s": 0.5}, **extra}


def results(sink: RedisSink, source_id: str) -> list[FrameResult]:
    return [FrameResult.model_validate_json(f["json"]) for _, f in sink.client.xrange(sink.frames_key(source_id))
            if f["type"] == "frame"]


def events(sink: RedisSink, source_id: str, kind: str) -> list[dict]:
    return [e for e in (json.loads(f["json"]) for _, f in sink.client.xrange(sink.events_key))
            if e["source_id"] == source_id and e["type"] == kind]


def frame(source_id: str, index: int) -> FrameResult:
    return FrameResult(source_id=source_id, frame_index=index, pts=index / FPS, captured_at=0.0, width=8, height=8,
                       model="m", detections=[])


@pytest.fixture(scope="module")
def undisturbed(video, redis_server, ray_session) -> RedisSink:
    """One run: the tracked source; the same video untracked, sampled at 1 frame/s; and the same again, resumed
    after a frame whose stored tracker state is of an unknown version."""
    data = config(video, redis_server["url"], "track-ref")
    data["sources"] += [{"id": "plain", "url": str(video), "fps": 1, "tracking": False},
                        {"id": "unknown", "url": str(video), "fps": 1}]
    sink = RedisSink(connect(redis_server["url"]), "track-ref")
    sink.write_frames([frame("unknown", 0)], after={"unknown": None}, snapshots={"unknown": {"v": 99}})
    summary = Job(PipelineConfig.model_validate(data), sink).process()
    assert summary["shapes"]["status"] == summary["plain"]["status"] == "eos"
    # A state this version cannot restore stops its source with an error naming the key; the others go on.
    assert summary["unknown"]["status"] == "error" and [r.frame_index for r in results(sink, "unknown")] == [0]
    [error] = events(sink, "unknown", "error")
    assert "cannot be restored" in error["message"] and sink.state_key("unknown") in error["message"]
    return sink


def test_tracks_counts_and_events_are_written_and_tracking_off_writes_none(undisturbed, video):
    tracked, plain = results(undisturbed, "shapes"), results(undisturbed, "plain")
    assert [r.frame_index for r in tracked] == list(range(FRAMES)) and len(plain) >= FRAMES // FPS - 1
    # Tracking off: no track IDs, no analytics, and only detections at model.threshold (the workers also send the
    # tracker's low-score candidates, which the job drops for untracked sources).
    assert all(r.analytics is None and all(d.track_id is None and d.score >= THRESHOLD for d in r.detections)
               for r in plain)
    assert any(r.detections for r in plain)
    ids = {d.track_id for r in tracked for d in r.detections} - {None}
    started = [e.track_id for r in tracked for e in r.analytics.events if e.type == "track_started"]
    assert ids and sorted(started) == sorted(ids) == list(range(1, len(ids) + 1))  # each ID started once, in order
    # The second stage: detections below model.threshold written only because they continue a track.
    bridged = [d for r in tracked for d in r.detections if d.score < THRESHOLD]
    assert bridged and all(d.track_id is not None for d in bridged)
    last = tracked[-1].analytics
    assert [line.name for line in last.lines] == ["middle", "across"] and [z.name for z in last.zones] == ["corner"]
    crossings = [e for r in tracked for e in r.analytics.events if e.type == "line_crossed"]
    assert crossings  # and the cumulative counts are the sum of the events
    for line in last.lines:
        for direction, counts in (("in", line.counts_in), ("out", line.counts_out)):
            assert sum(counts.values()) == sum(e.line == line.name and e.direction == direction for e in crossings)
    # A zone's occupancy is the objects that entered it and have not left.
    inside = 0
    for r in tracked:
        inside += sum((e.type == "zone_entered") - (e.type == "zone_left") for e in r.analytics.events)
        assert sum(r.analytics.zones[0].occupancy.values()) == inside
    assert any(e.type == "zone_left" and e.dwell_s > 0 for r in tracked for e in r.analytics.events)
    # Stuff classes (grass, sand, ...) are never tracked.
    assert all(d.track_id is None for r in tracked for d in r.detections if d.label_name in ("grass", "sand", "sky"))
    state = undisturbed.tracker_state("shapes")
    assert state["frame_index"] == FRAMES - 1 == state["snapshot"]["frame_index"]
    assert str(video) not in json.dumps(state)  # nothing of the source's URL (docs/security.md)
    print(f"\nundisturbed: {len(ids)} tracks, {len(crossings)} crossings, {len(bridged)} low-score detections "
          f"bridged, final counts {[(line.name, line.counts_in, line.counts_out) for line in last.lines]}")


def detections_close(a: FrameResult, b: FrameResult) -> bool:
    """The same detections up to float noise (boxes within 1e-2 px, scores within 1e-4)."""
    return len(a.detections) == len(b.detections) and all(
        x.label == y.label and abs(x.score - y.score) <= 1e-4 and max(abs(p - q) for p, q in zip(x.box, y.box)) <= 1e-2
        for x, y in zip(a.detections, b.detections))


def raw(r: FrameResult) -> list:
    return [(d.label, d.score, d.box) for d in r.detections]


def tracking_of(r: FrameResult) -> tuple:
    return [d.track_id for d in r.detections], r.analytics


def pid_of(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()))


def test_driver_worker_and_redis_failures_give_the_same_tracks_counts_and_events(video, undisturbed, tmp_path):
    import ray

    workdir = tmp_path / "redis"
    port = free_port()
    # Persistence by RDB snapshots only (Redis' default kind): a restart loses what was written after the last one.
    server = {"process": start_redis_server(port, workdir, extra=("--dbfilename", "dump.rdb"))}
    url = f"redis://127.0.0.1:{port}/0"
    data = config(video, url, "track-hit")
    sink = RedisSink.from_config(connect(url), PipelineConfig.model_validate(data).redis)
    written = lambda: sink.client.xlen(sink.frames_key("shapes"))  # noqa: E731

    def wait_for_frames(n: int, what: str) -> None:
        wait_for(lambda: written() >= n or not thread.is_alive(), what=what, interval=0.02)
        assert thread.is_alive(), f"the job ended early: {summary}, {events(sink, 'shapes', 'error')}"

    job = thread = None
    try:
        # 1. `cdetr run` in its own process, on this session's Ray, killed with SIGKILL mid-run.
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({**data, "ray_address": ray.get_runtime_context().gcs_address}))
        with open(tmp_path / "driver.log", "w") as log:
            driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--config", str(path)],
                                      stdout=log, stderr=log)
        try:
            wait_for(lambda: written() >= 15 or driver.poll() is not None, what="the first driver's frames",
                     interval=0.02)
        finally:
            driver.kill()
            driver.wait()
        killed_at = written()
        assert 15 <= killed_at < FRAMES, (tmp_path / "driver.log").read_text()[-3000:]
        # 2. Run again (resumes after the last frame in Redis, tracker from the state key); kill its worker.
        job = Job(PipelineConfig.model_validate(data), sink)
        thread, summary = run_in_thread(job)
        wait_for_frames(killed_at + 10, "the second run's frames")
        os.kill(pid_of(job.workers[0]), signal.SIGKILL)  # Ray restarts it; its batch runs again
        # 3. Redis snapshots, takes more frames, then dies and comes back from the snapshot: those frames are lost.
        wait_for_frames(killed_at + 20, "frames after the worker's restart")
        sink.client.save()
        saved_at = written()
        wait_for_frames(saved_at + 8, "frames after the snapshot")
        server["process"].kill()
        server["process"].wait()
        server["process"] = start_redis_server(port, workdir, extra=("--dbfilename", "dump.rdb"))
        thread.join(timeout=180)
        # What the faults left in Redis:
        assert not thread.is_alive() and summary["shapes"]["status"] == "eos"
        [lost] = events(sink, "shapes", "lost")
        assert lost["details"]["rewritten"] and lost["details"]["first_frame_index"] <= saved_at
        starts = [e["details"]["start_index"] for e in events(sink, "shapes", "started")]
        assert starts[0] == 0 and starts[1] == killed_at  # the rerun resumed where the killed driver left Redis
        reference, disturbed = results(undisturbed, "shapes"), results(sink, "shapes")
        assert [r.frame_index for r in disturbed] == list(range(FRAMES))  # every frame once, in order
        changed = sum(raw(a) != raw(b) for a, b in zip(reference, disturbed))
        same = next((i for i, (a, b) in enumerate(zip(reference, disturbed)) if not detections_close(a, b)), FRAMES)
        print(f"\ndriver killed after frame {killed_at - 1}, worker killed, Redis restarted from its snapshot of "
              f"frame {saved_at - 1} (frames {lost['details']['first_frame_index']}-"
              f"{lost['details']['last_frame_index']} lost, written again); re-batching changed the detections of "
              f"{changed} of {FRAMES} frames (bit for bit); same detections (to float noise) in frames 0-{same - 1}")
        assert same > 0
        assert [tracking_of(r) for r in disturbed[:same]] == [tracking_of(r) for r in reference[:same]]
        if same == FRAMES:  # the tracker's state in Redis ends the same too: next ID, counts, tracks inside zones
            ours, theirs = (s.tracker_state("shapes")["snapshot"] for s in (sink, undisturbed))
            assert (ours["tracker"]["next_id"], ours["lines"], ours["zones"], ours["label_names"]) == \
                (theirs["tracker"]["next_id"], theirs["lines"], theirs["zones"], theirs["label_names"])
    finally:
        if job is not None:
            stop_if_running(job, thread)
        server["process"].kill()
        server["process"].wait()


def test_the_state_key_is_written_with_its_frames_and_only_with_them(tmp_path):
    port = free_port()
    process = start_redis_server(port, tmp_path, extra=("--appendonly", "yes", "--appendfsync", "always"))
    try:
        sink = RedisSink(connect(f"redis://127.0.0.1:{port}/0"), "state")
        assert sink.tracker_state("cam") is None
        assert sink.write_frames([frame("cam", 0), frame("cam", 1)], after={"cam": None},
                                 snapshots={"cam": {"n": 1}}) == {}
        assert sink.tracker_state("cam") == {"frame_index": 1, "snapshot": {"n": 1}}
        # One MULTI/EXEC block in the AOF (what a restart or a replica replays) holds the frames and their state.
        [aof] = (tmp_path / "appendonlydir").glob("*.incr.aof")
        block = aof.read_bytes().split(b"MULTI")[-1]
        assert block.index(b"2-0") < block.index(b"state:cam") < block.index(b"EXEC")
        # A write that finds frames lost writes nothing: no state without its frames.
        sink.client.delete(sink.frames_key("cam"))
        assert sink.write_frames([frame("cam", 2)], after={"cam": 1}, snapshots={"cam": {"n": 2}})
        assert sink.tracker_state("cam") == {"frame_index": 1, "snapshot": {"n": 1}}
        # Frames of an untracked source leave the state as it is.
        assert sink.write_frames([frame("cam", 0)], after={"cam": None}) == {}
        assert sink.tracker_state("cam")["frame_index"] == 1
    finally:
        process.kill()
        process.wait()
    # Which stored snapshot a resumed source's tracker starts from (pipeline/source_tracking.py).
    assert restorable({"frame_index": 5, "snapshot": {"n": 5}}, 5) == {"n": 5}
    assert restorable({"frame_index": 3, "snapshot": {"n": 3}}, 5) == {"n": 3}  # tracking was off after frame 3
    assert restorable({"frame_index": 7, "snapshot": {"n": 7}}, 5) is None  # the stream was cut by someone
    assert restorable(None, 5) is None and restorable({"frame_index": 0, "snapshot": {}}, None) is None


def test_the_tracker_follows_the_stream_wherever_the_job_resumes_it():
    """TrackedSource on its own, the state key played by a dict set as the sink sets it: a new run, and frames
    that Redis lost (a live source goes on after them), both continue from the state of the stream's last frame."""
    from pipeline.config import SourceConfig, TrackingConfig
    from pipeline.schema import Detection
    from pipeline.source_tracking import TrackedSource

    def moving(i: int) -> FrameResult:  # two squares crossing x = 50 in opposite directions
        boxes = [(10 + 4 * i, 20, 30 + 4 * i, 40), (90 - 4 * i, 60, 110 - 4 * i, 80)]
        return frame("cam", i).model_copy(update={"detections": [
            Detection(label=2, label_name="square", score=0.9, box=box) for box in boxes]})

    source = SourceConfig(id="cam", url="x.mp4", lines=[{"name": "gate", "points": [[50, 0], [50, 100]],
                                                         "in_side": "right"}])
    new = lambda: TrackedSource(TrackingConfig(), source, THRESHOLD, frozenset())  # noqa: E731
    states: dict[int, dict] = {}  # frame index -> the state key's value after a write that ended there

    def write(tracked: TrackedSource, indices: range, last_written: int | None) -> list[FrameResult]:
        results, snapshot = tracked.track([moving(i) for i in indices], last_written,
                                          lambda: states.get(last_written))
        states[indices[-1]] = {"frame_index": indices[-1], "snapshot": snapshot}
        return results

    def tracking(results: list[FrameResult]) -> list:
        return [tracking_of(r) for r in results]

    once = new()
    undisturbed = tracking(write(once, range(0, 8), None) + write(once, range(8, 20), 7))
    # A new run after the driver died with frames 0-7 in Redis.
    first, rerun = new(), new()
    assert tracking(write(first, range(0, 8), None) + write(rerun, range(8, 20), 7)) == undisturbed
    # Redis lost frames 8-13 after the tracker had seen them: the next write (a live source's frames 14-19) goes
    # after frame 7, from the state kept with it, as if frames 8-13 had been dropped.
    lossy = new()
    write(lossy, range(0, 8), None), write(lossy, range(8, 14), 7)
    skipped = new()
    write(skipped, range(0, 8), None)
    assert tracking(write(lossy, range(14, 20), 7)) == tracking(write(skipped, range(14, 20), 7))
    assert sum(e.type == "line_crossed" for _, a in undisturbed for e in a.events) == 2  # the test crosses


def test_lines_zones_and_the_switch_from_the_command_line(tmp_path, redis_server, capsys):
    import argparse

    from pipeline.config import load_config
    from pipeline.run_command import _overrides, add_arguments, with_analytics

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def run_config(*flags: str) -> PipelineConfig:
        args = parser.parse_args(["clip.mp4", "--source-id", "cam", *flags])
        return with_analytics(load_config(env={}, overrides=_overrides(args)), args.line, args.zone)

    cam = run_config("--line", "cam:gate:0,100,256,100:left", "--zone", "cam:dock:0,0;40,0;40,30").sources[0]
    assert cam.lines[0].points == ((0, 100), (256, 100)) and cam.lines[0].in_side == "left"
    assert cam.zones[0].polygon == [(0, 0), (40, 0), (40, 30)]
    assert not run_config("--no-tracking").tracks(cam)
    for flags, message in ((("--line", "cam:gate:0,100,0,100:left"), "sources.0.lines.0.points"),
                           (("--line", "nosuch:gate:0,1,2,3:left"), "no source 'nosuch'"),
                           (("--line", "cam:gate:0,1,2,3:left", "--no-tracking"), "need tracking")):
        with pytest.raises(ValueError, match=message):
            run_config(*flags)
    with pytest.raises(SystemExit):
        main(["run", "clip.mp4", "--line", "cam:gate:0,1:left"])  # bad syntax: argparse says why
    assert "--line gate: '0,1' needs 4 numbers" in capsys.readouterr().err
    # `cdetr submit` sends them in the add message.
    prefix = "track-submit"
    assert main(["submit", str(tmp_path / "v.mp4"), "--source-id", "cam9", "--redis-url", redis_server["url"],
                 "--prefix", prefix, "--line", "gate:0,100,256,100:right", "--zone", "dock:0,0;40,0;40,30"]) == 0
    [(_, fields)] = connect(redis_server["url"]).xrange(f"{prefix}:control")
    source = json.loads(fields["json"])["source"]
    assert source["lines"][0]["name"] == "gate" and source["zones"][0]["polygon"][2] == [40.0, 30.0]
    # `cdetr schema` says it all.
    frame = json_schema("frame")
    assert "track_id" in frame["$defs"]["Detection"]["properties"] and "analytics" in frame["properties"]


def test_render_draws_tracks_trails_lines_and_zones(undisturbed, tmp_path, redis_server):
    from PIL import Image

    from pipeline.config import LineConfig, ZoneConfig

    tracked = results(undisturbed, "shapes")
    trails: dict = {}
    for r in tracked[:30]:
        follow(trails, r)
    frame = tracked[29]
    image = annotate(Image.new("RGB", SIZE), frame, trails, [LineConfig(**line) for line in LINES],
                     [ZoneConfig(**zone) for zone in ZONES])
    pixels = image.load()
    assert pixels[128, 50] == (255, 255, 255) and pixels[200, 100] == (255, 255, 255)  # the two lines
    assert pixels[64, 96] == (255, 255, 255)  # the zone's top edge
    assert any(len(trail) > 1 for trail in trails.values())
    # The command line: lines and zones from the flags, over the source video.
    out = tmp_path / "tracks.mp4"
    assert main(["render", "shapes", str(out), "--redis-url", redis_server["url"], "--prefix", "track-ref",
                 "--line", "middle:128,0,128,192:right", "--zone", "corner:0,96;128,96;128,192;0,192"]) == 0
    assert out.stat().st_size > 0
