"""One real pipeline run (local Ray, real redis-server, PyAV-encoded videos, a tiny random detector) over two
file sources, an HTTP source and three bad sources; the tests below check what it left in Redis."""
import json
import subprocess

import pytest
import redis

from helpers import count_frames, encode_video, free_port
from pipeline.config import PipelineConfig
from pipeline.render import render_video
from pipeline.runner import run_job
from pipeline.schema import FrameResult
from pipeline.sink import RedisSink
from pipeline.subscriber import Subscriber
from pipeline.wire import events_key, frames_key

PREFIX = "e2e"
GOOD = ("cam-a", "cam-b", "cam-http")
BAD = ("missing", "notvideo", "unreachable")


@pytest.fixture(scope="module")
def run(tmp_path_factory, redis_server, ray_session, tiny_model, http_server):
    videos = tmp_path_factory.mktemp("videos")
    a = encode_video(videos / "a.mp4", 24, (160, 96), options={"movflags": "+faststart"})
    b = encode_video(videos / "b.mp4", 18, (96, 128))
    c = encode_video(http_server["dir"] / "c.ts", 15, (128, 72))
    (videos / "notvideo.mp4").write_text("this is not a video")
    config = PipelineConfig.model_validate({
        "sources": [{"id": "cam-a", "url": str(a)}, {"id": "cam-b", "url": str(b)},
                    {"id": "cam-http", "url": f"{http_server['url']}/c.ts"},
                    {"id": "missing", "url": str(videos / "missing.mp4")},
                    {"id": "notvideo", "url": str(videos / "notvideo.mp4")},
                    {"id": "unreachable", "url": f"http://127.0.0.1:{free_port()}/x.ts"}],
        "batching": {"max_batch_size": 4, "max_in_flight_per_source": 8},
        "decoder": {"num_cpus": 0.1, "open_timeout_s": 5},
        # Threshold 0 keeps the top-3 boxes of the random model, so every frame carries detections to check.
        "model": {"path": str(tiny_model), "threshold": 0.0, "top_k": 3},
        "redis": {"url": redis_server["url"], "prefix": PREFIX},
    })
    summary = run_job(config)
    frames = {"cam-a": count_frames(a), "cam-b": count_frames(b), "cam-http": count_frames(c)}
    sizes = {"cam-a": (160, 96), "cam-b": (96, 128), "cam-http": (128, 72)}
    return {"summary": summary, "frames": frames, "sizes": sizes}


def entries(client, source_id):
    return client.xrange(frames_key(PREFIX, source_id))


@pytest.mark.parametrize("source_id", GOOD)
def test_every_frame_exactly_once_in_order_then_eos(run, redis_client, source_id):
    stream = entries(redis_client, source_id)
    n = run["frames"][source_id]
    assert n > 10
    assert [fields["type"] for _, fields in stream] == ["frame"] * n + ["eos"]
    indices = [json.loads(fields["json"])["frame_index"] for _, fields in stream[:-1]]
    assert indices == list(range(n))
    assert [entry_id for entry_id, _ in stream] == [f"{i + 1}-0" for i in range(n)] + [f"{n}-1"]
    assert json.loads(stream[-1][1]["json"])["details"]["frames"] == n


@pytest.mark.parametrize("source_id", GOOD)
def test_frame_results_have_the_documented_fields(run, redis_client, source_id):
    width, height = run["sizes"][source_id]
    previous_pts = -1.0
    for _, fields in entries(redis_client, source_id)[:-1]:
        raw = json.loads(fields["json"])
        assert {"v", "source_id", "frame_index", "pts", "captured_at", "width", "height", "model", "detections",
                "panoptic", "timings_ms"} <= raw.keys()
        result = FrameResult.model_validate(raw)
        assert (result.v, result.source_id, result.width, result.height) == (1, source_id, width, height)
        assert result.panoptic is None and result.model.startswith("tiny-model")
        assert result.pts > previous_pts
        previous_pts = result.pts
        assert {"decode", "queue", "inference", "postprocess"} <= result.timings_ms.keys()
        assert len(result.detections) == 3
        for d in result.detections:
            x0, y0, x1, y1 = d.box
            # Boxes are in source pixels: the model input is at most 96 px, the sources up to 160 px wide.
            assert 0 <= (x0 + x1) / 2 <= width and 0 <= (y0 + y1) / 2 <= height
            assert d.label_name and 0 <= d.score <= 1


def test_bad_sources_give_error_events_while_the_others_finish(run, redis_client):
    events = [json.loads(fields["json"]) for _, fields in redis_client.xrange(events_key(PREFIX))]
    for source_id in BAD:
        errors = [e for e in events if e["source_id"] == source_id and e["type"] == "error"]
        assert len(errors) == 1 and errors[0]["message"], source_id
        assert run["summary"][source_id]["status"] == "error"
        assert not entries(redis_client, source_id)  # no eos: the source did not finish
    for source_id in GOOD:
        types = [e["type"] for e in events if e["source_id"] == source_id]
        assert types == ["started", "eos"], source_id
        summary = run["summary"][source_id]
        assert summary["status"] == "eos" and summary["frames"] == run["frames"][source_id]
        assert summary["fps"] > 0 and 0 < summary["p50_ms"] <= summary["p95_ms"] and summary["dropped"] == 0


def test_redis_cli_reads_the_entries(run, redis_server):
    """A non-Python reader: the entries are plain fields with JSON text."""
    out = subprocess.run(["redis-cli", "-p", str(redis_server["port"]), "--raw", "XRANGE",
                          frames_key(PREFIX, "cam-a"), "-", "+", "COUNT", "2"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "1-0" and out[1:3] == ["type", "frame"] and out[3] == "json"
    first = json.loads(out[4])
    assert first["v"] == 1 and first["source_id"] == "cam-a" and first["frame_index"] == 0
    assert out[5] == "2-0" and json.loads(out[9])["frame_index"] == 1


def test_plain_subscriber_reads_all_frames_and_stops_at_eos(run, redis_client):
    got = [r.frame_index for r in Subscriber(redis_client, "cam-a", PREFIX)]
    assert got == list(range(run["frames"]["cam-a"]))


def test_consumer_group_resumes_after_restart_without_loss(run, redis_client):
    key, n = frames_key(PREFIX, "cam-b"), run["frames"]["cam-b"]
    first = []
    for result in Subscriber(redis_client, "cam-b", PREFIX, group="g1", consumer="c1"):
        first.append(result.frame_index)
        if len(first) == 5:
            break  # the consumer "crashes" while handling frame 4
    # Frames 0-3 are acknowledged; frame 4 and the rest of the read-ahead batch (with eos) stay pending for c1.
    assert redis_client.xpending(key, "g1")["pending"] == n + 1 - 4
    second = [r.frame_index for r in Subscriber(redis_client, "cam-b", PREFIX, group="g1", consumer="c1")]
    assert second[0] == 4 and first[:4] + second == list(range(n))
    assert redis_client.xpending(key, "g1")["pending"] == 0


def test_another_consumer_reclaims_stale_pending_entries(run, redis_client):
    n = run["frames"]["cam-http"]
    first = []
    for result in Subscriber(redis_client, "cam-http", PREFIX, group="g2", consumer="dead"):
        first.append(result.frame_index)
        if len(first) == 3:
            break
    rest = [r.frame_index for r in Subscriber(redis_client, "cam-http", PREFIX, group="g2", consumer="alive",
                                              claim_idle_ms=0)]
    assert rest == list(range(2, n))  # frame 2 claimed from "dead" (XAUTOCLAIM), then the new ones
    consumers = {c["name"]: c["pending"] for c in redis_client.xinfo_consumers(frames_key(PREFIX, "cam-http"), "g2")}
    assert consumers == {"dead": 0, "alive": 0}


def test_subscriber_with_timeout_ends_on_an_unfinished_stream(redis_client):
    redis_client.xadd(frames_key(PREFIX, "open"), {"type": "frame", "json": FrameResult(
        source_id="open", frame_index=0, pts=0.0, captured_at=0.0, width=2, height=2, model="m",
        detections=[]).model_dump_json()}, id="1-0")
    assert [r.frame_index for r in Subscriber(redis_client, "open", PREFIX, block_ms=100)] == [0]
    with pytest.raises(ValueError, match="both group and consumer"):
        Subscriber(redis_client, "open", PREFIX, group="g")
    with pytest.raises(redis.ResponseError):
        redis_client.xadd(frames_key(PREFIX, "open"), {"type": "frame"}, id="1-0")  # explicit IDs never repeat


def test_render_draws_results_on_the_source_video(run, redis_client, tmp_path):
    import av

    out = render_video(RedisSink(redis_client, PREFIX), "cam-a", tmp_path / "a-annotated.mp4")
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == run["frames"]["cam-a"] and frames[0].shape == (96, 160, 3)
    with pytest.raises(LookupError, match="no results"):
        render_video(RedisSink(redis_client, PREFIX), "missing", tmp_path / "none.mp4")
