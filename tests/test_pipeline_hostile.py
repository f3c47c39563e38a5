"""Hostile input (issue 7): broken, refused and malicious sources run in one job next to a good one. Each gets a clear
event, the good source still finishes exactly once, and nothing crashes. Plus absurd configuration and oversized
results, which need no job."""
import http.server
import json
import threading

import av
import numpy as np
import pytest

from helpers import count_frames, encode_video
from pipeline.cli import main
from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.runner import run_job
from pipeline.schema import Detection, FrameResult
from pipeline.sink import RedisSink
from pipeline.sources import open_options, parse_source_url
from pipeline.wire import events_key, frames_key

PREFIX = "hostile"
MAX_PIXELS = 100_000  # see `wide` below


class RedirectToLocalFiles(http.server.BaseHTTPRequestHandler):
    """An attacker's web server: a redirect to a local file, and a playlist whose segment is a local file."""
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"

    def do_GET(self):
        if self.path.endswith(".m3u8"):
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.apple.mpegurl")
            self.send_header("Content-Length", str(len(self.playlist)))
            self.end_headers()
            self.wfile.write(self.playlist)
        else:
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def attacker():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RedirectToLocalFiles)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def write_audio_only(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


def corrupt_middle(source, path):
    """Overwrite 2 KB in the middle of the file: the container's index stays valid, the packets there do not."""
    data = bytearray(source.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 2048] = bytes((b * 7 + 13) % 256 for b in data[middle:middle + 2048])
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, redis_server, redis_client, ray_session, tiny_model, attacker):
    d = tmp_path_factory.mktemp("hostile")
    good = encode_video(d / "good.mp4", 20, (96, 64))
    whole = encode_video(d / "whole.mp4", 60, (96, 64), options={"movflags": "+faststart"})
    (d / "truncated.mp4").write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n" * 100)
    sources = {
        "good": good,
        "truncated": d / "truncated.mp4",
        "corrupt": corrupt_middle(whole, d / "corrupt.mp4"),
        "empty": d / "empty.mp4",
        "text": d / "text.mp4",
        "ffv1": encode_video(d / "lossless.mkv", 5, (64, 48), codec="ffv1"),  # FFmpeg decodes it; we refuse it
        "audio": write_audio_only(d / "audio.wav"),
        # 16384x16: the header states 262144 pixels, over the test's limit of 100000. The check reads the header
        # before any packet is decoded, so a 16384x16384 stream fails the default 8K limit the same way, without
        # this test having to encode 400 MB frames.
        "wide": encode_video(d / "wide.mp4", 2, (16384, 16)),
        "redirect": f"{attacker}/video.mp4",
        "playlist": f"{attacker}/list.m3u8",
    }
    config = PipelineConfig.model_validate({
        "sources": [{"id": i, "url": str(url)} for i, url in sources.items()],
        "batching": {"max_batch_size": 4}, "decoder": {"num_cpus": 0.05, "max_pixels": MAX_PIXELS},
        "model": {"path": str(tiny_model)}, "redis": {"url": redis_server["url"], "prefix": PREFIX}})
    summary = run_job(config)
    events = [json.loads(f["json"]) for _, f in redis_client.xrange(events_key(PREFIX))]
    return {"summary": summary, "events": events, "good_frames": count_frames(good)}


def frames_of(client, source_id):
    return [(f["type"], json.loads(f["json"])) for _, f in client.xrange(frames_key(PREFIX, source_id))]


def events_of(run, source_id):
    return [(e["type"], e["message"]) for e in run["events"] if e["source_id"] == source_id]


def test_the_good_source_is_unaffected(run, redis_client):
    entries = frames_of(redis_client, "good")
    assert [r["frame_index"] for t, r in entries if t == "frame"] == list(range(run["good_frames"]))
    assert entries[-1][0] == "eos" and [t for t, _ in events_of(run, "good")] == ["started", "eos"]


@pytest.mark.parametrize("source_id, message", [("truncated", "ended after"), ("corrupt", "undecodable packets")])
def test_damaged_files_skip_what_is_broken_and_finish(run, redis_client, source_id, message):
    entries = frames_of(redis_client, source_id)
    indices = [r["frame_index"] for t, r in entries if t == "frame"]
    assert 10 <= len(indices) < 60 and indices == list(range(len(indices)))  # what decodes, in order, no gap
    assert entries[-1][0] == "eos" and run["summary"][source_id]["status"] == "eos"
    types = [t for t, _ in events_of(run, source_id)]
    assert types[0] == "started" and types[-1] == "eos" and "corrupt" in types and "error" not in types
    messages = " ".join(m for t, m in events_of(run, source_id) if t == "corrupt")
    assert message in messages and "of the 60 frames its header states" in messages


@pytest.mark.parametrize("source_id, message", [
    ("empty", "InvalidDataError"),
    ("text", "InvalidDataError"),
    ("ffv1", "video codec 'ffv1' is not allowed"),
    ("audio", "no video stream"),
    ("wide", f"frame size 16384x16 exceeds decoder.max_pixels = {MAX_PIXELS}"),
    # FFmpeg is told which protocols each scheme may use (`protocol_whitelist`), so nothing reads local files.
    ("redirect", "http://127.0.0.1"),
    ("playlist", "http://127.0.0.1"),
])
def test_refused_sources_get_one_error_event_and_no_entries(run, redis_client, source_id, message):
    events = events_of(run, source_id)
    assert [t for t, _ in events] == ["error"] and message in events[0][1], events
    assert run["summary"][source_id]["status"] == "error" and not frames_of(redis_client, source_id)


def test_every_source_kind_gets_a_protocol_whitelist():
    assert open_options(parse_source_url("/videos/a.mp4"))["protocol_whitelist"] == "file"
    assert open_options(parse_source_url("http://host/a.mp4"))["protocol_whitelist"] == "http,tcp"
    assert "file" not in open_options(parse_source_url("rtsp://cam/stream"))["protocol_whitelist"]
    with pytest.raises(ValueError, match="'concat' is not allowed"):
        parse_source_url("concat:/etc/passwd|/videos/a.mp4")


@pytest.mark.parametrize("overrides, field", [
    ({"batching": {"max_batch_size": 0}}, "batching.max_batch_size"),
    ({"sources": [{"id": "a", "url": "a.mp4", "fps": -5}]}, "sources.0.fps"),
    ({"decoder": {"buffer_size": 0}}, "decoder.buffer_size"),
    ({"decoder": {"max_pixels": 0}}, "decoder.max_pixels"),
    ({"decoder": {"allowed_codecs": []}}, "decoder.allowed_codecs"),
    ({"redis": {"max_result_bytes": 10}}, "redis.max_result_bytes"),
    ({"redis": {"retry_initial_s": -1}}, "redis.retry_initial_s"),
])
def test_absurd_config_is_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(env={}, overrides=overrides)


def test_cdetr_run_refuses_a_negative_fps(capsys):
    assert main(["run", "video.mp4", "--fps", "-1"]) == 2
    assert "sources.0.fps" in capsys.readouterr().err


def test_an_oversized_result_is_written_without_its_detections(redis_client):
    sink = RedisSink(redis_client, "oversized", max_result_bytes=2048)
    many = [Detection(label=1, label_name="circle", score=0.9, box=(0, 0, 1, 1))] * 100
    results = [FrameResult(source_id=s, frame_index=i, pts=None, captured_at=0.0, width=8, height=8, model="m",
                           detections=many if (s, i) == ("big", 1) else many[:2])
               for s in ("big", "small") for i in range(3)]
    sink.write_frames(results)
    big = [json.loads(f["json"]) for _, f in redis_client.xrange(sink.frames_key("big"))]
    assert [r["frame_index"] for r in big] == [0, 1, 2]  # the frame keeps its place: no gap, no duplicate
    assert big[1]["detections"] == [] and big[1]["panoptic"] is None
    assert "exceeds redis.max_result_bytes = 2048" in big[1]["error"]
    assert len(big[0]["detections"]) == 2 and big[0]["error"] is None
    small = [json.loads(f["json"]) for _, f in redis_client.xrange(sink.frames_key("small"))]
    assert [len(r["detections"]) for r in small] == [2, 2, 2]
    [(_, event)] = redis_client.xrange(sink.events_key)
    assert event["type"] == "error" and json.loads(event["json"])["details"]["frame_index"] == 1
