"""A running job: resume from the last frame in Redis, sources added/removed via the control stream, stop; and
`cdetr run` from the command line (all on the session's local Ray)."""
import base64
import json

import numpy as np

from helpers import count_frames, encode_video, run_in_thread, stop_if_running, wait_for
from model.coco_format import decode_id_png
from pipeline.cli import main
from pipeline.config import PipelineConfig
from pipeline.runner import Job
from pipeline.schema import FrameResult
from pipeline.sink import RedisSink

PREFIX = "ctl"


def stream(sink: RedisSink, source_id: str) -> list[tuple[str, dict]]:
    return [(f["type"], json.loads(f["json"])) for _, f in sink.client.xrange(sink.frames_key(source_id))]


def ended(sink: RedisSink, source_id: str) -> bool:
    return sink.state(source_id).finished


def send(sink: RedisSink, message: dict | str) -> None:
    sink.client.xadd(sink.control_key, {"json": message if isinstance(message, str) else json.dumps(message)})


def test_resume_and_control_stream(tmp_path, redis_server, redis_client, ray_session, tiny_model):
    resumed = encode_video(tmp_path / "resumed.mp4", 20, (96, 64))
    late = encode_video(tmp_path / "late.mp4", 12, (64, 64))
    long = encode_video(tmp_path / "long.mp4", 300, (64, 48))
    sink = RedisSink(redis_client, PREFIX)
    # A previous run wrote frames 0-9 of "resumed", then died before the rest.
    sink.write_frames([FrameResult(source_id="resumed", frame_index=i, pts=i / 10, captured_at=0.0, width=96,
                                   height=64, model="previous-run", detections=[]) for i in range(10)])
    config = PipelineConfig.model_validate({
        "sources": [{"id": "resumed", "url": str(resumed)}], "keep_running": True,
        "batching": {"max_batch_size": 4}, "decoder": {"num_cpus": 0.1},
        "model": {"path": str(tiny_model)}, "redis": {"url": redis_server["url"], "prefix": PREFIX}})
    job = Job(config, sink)
    thread, summary = run_in_thread(job)
    try:
        wait_for(lambda: ended(sink, "resumed"))
        entries = stream(sink, "resumed")
        assert [r["frame_index"] for t, r in entries if t == "frame"] == list(range(count_frames(resumed)))
        assert [r["model"] for _, r in entries[:10]] == ["previous-run"] * 10  # not reprocessed
        assert {r["model"] for _, r in entries[10:-1]} == {tiny_model.name}

        send(sink, {"op": "add", "source": {"id": "late", "url": str(late)}})
        send(sink, {"op": "add", "source": {"id": "long", "url": str(long)}})
        send(sink, '{"op": "explode"}')
        send(sink, "not json")
        wait_for(lambda: ended(sink, "late"))
        assert [r["frame_index"] for t, r in stream(sink, "late") if t == "frame"] == list(range(12))
        wait_for(lambda: sink.client.xlen(sink.frames_key("long")) > 0)
        send(sink, {"op": "remove", "source_id": "long"})
        wait_for(lambda: ended(sink, "long"))
        send(sink, {"op": "stop"})
        thread.join(timeout=60)
    finally:
        stop_if_running(job, thread)
    assert not thread.is_alive()
    # The removed source ends with eos after a contiguous run of frames (whatever it had decoded).
    removed = stream(sink, "long")
    assert removed[-1][0] == "eos"
    assert [r["frame_index"] for t, r in removed[:-1]] == list(range(len(removed) - 1))
    assert summary["long"]["status"] == "removed" and summary["late"]["status"] == "eos"
    errors = [json.loads(f["json"]) for _, f in sink.client.xrange(sink.events_key) if f["type"] == "error"]
    assert len(errors) == 2 and all(e["message"].startswith("invalid control message") for e in errors)


def test_cli_run(tmp_path, redis_server, redis_client, ray_session, tiny_model, capsys):
    video = encode_video(tmp_path / "clip.mp4", 15, (80, 60), fps=10)
    code = main(["run", str(video), "--model", str(tiny_model), "--redis-url", redis_server["url"],
                 "--batch-size", "2", "--fps", "5"])
    out = capsys.readouterr().out
    assert code == 0
    summary_line = next(line for line in out.splitlines() if line.startswith("clip "))
    # --fps 5 on a 10 fps video keeps every other frame, on the pts grid.
    entries = stream(RedisSink(redis_client), "clip")
    assert [r["frame_index"] for t, r in entries if t == "frame"] == list(range(0, 15, 2))
    assert summary_line.split()[1:3] == ["eos", "8"]
    # A second run finds the source complete in Redis and does not write it again.
    assert main(["run", str(video), "--model", str(tiny_model), "--redis-url", redis_server["url"]]) == 0
    assert len(stream(RedisSink(redis_client), "clip")) == 9


def test_cli_run_with_the_panoptic_head(tmp_path, redis_server, redis_client, ray_session, tiny_panoptic_model):
    video = encode_video(tmp_path / "pan.mp4", 6, (96, 72))
    assert main(["run", str(video), "--model", str(tiny_panoptic_model), "--panoptic",
                 "--redis-url", redis_server["url"]]) == 0
    frames = [r for t, r in stream(RedisSink(redis_client), "pan") if t == "frame"]
    assert len(frames) == 6
    for frame in frames:
        ids = decode_id_png(base64.b64decode(frame["panoptic"]["png"]))
        assert ids.shape == (64, 85)  # model input size of a 96x72 frame (shortest edge 64)
        assert {s["id"] for s in frame["panoptic"]["segments"]} == set(np.unique(ids)) - {0}


def start_file_job(video, source_id: str, redis_server, redis_client, tiny_model):
    """A Job on one file source, running in a thread until it has written 8 frames.

    Returns its config, sink, job, thread and the dict its summary lands in."""
    sink = RedisSink(redis_client, PREFIX)
    config = PipelineConfig.model_validate({
        "sources": [{"id": source_id, "url": str(video)}], "batching": {"max_batch_size": 4},
        "decoder": {"num_cpus": 0.1}, "model": {"path": str(tiny_model)},
        "redis": {"url": redis_server["url"], "prefix": PREFIX}})
    job = Job(config, sink)
    thread, summary = run_in_thread(job)
    wait_for(lambda: sink.client.xlen(sink.frames_key(source_id)) >= 8)
    return config, sink, job, thread, summary


def test_stop_mid_run_flushes_in_order_and_the_next_run_resumes(tmp_path, redis_server, redis_client, ray_session,
                                                                tiny_model):
    video = encode_video(tmp_path / "interrupted.mp4", 150, (64, 48))
    config, sink, job, thread, summary = start_file_job(video, "interrupted", redis_server, redis_client, tiny_model)
    send(sink, {"op": "stop"})  # what Ctrl-C does: stop reading, finish the batches in flight, write them in order
    thread.join(timeout=60)
    assert not thread.is_alive() and summary["interrupted"]["status"] == "stopped"
    first = [r["frame_index"] for t, r in stream(sink, "interrupted")]
    assert first == list(range(len(first))) and len(first) < 150  # a prefix, no eos
    assert Job(config, sink).process()["interrupted"]["status"] == "eos"
    entries = stream(sink, "interrupted")
    assert [r["frame_index"] for t, r in entries if t == "frame"] == list(range(150)) and entries[-1][0] == "eos"


def test_a_killed_worker_is_restarted_and_no_frame_is_lost_or_repeated(tmp_path, redis_server, redis_client,
                                                                       ray_session, tiny_model):
    video = encode_video(tmp_path / "crash.mp4", 120, (64, 48))
    _, sink, job, thread, summary = start_file_job(video, "crash", redis_server, redis_client, tiny_model)
    # The worker process dies with batches in flight; Ray restarts it (max_restarts) and retries them
    # (max_task_retries); explicit entry IDs keep the retried writes idempotent.
    ray_session.kill(job.workers[0], no_restart=False)
    thread.join(timeout=180)
    assert not thread.is_alive() and summary["crash"]["status"] == "eos"
    entries = stream(sink, "crash")
    assert [r["frame_index"] for t, r in entries if t == "frame"] == list(range(120)) and entries[-1][0] == "eos"
