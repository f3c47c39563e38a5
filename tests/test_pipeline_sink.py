"""The Redis sink against a real redis-server: explicit IDs, idempotent retries, resume state, events."""
import json

import pytest

from helpers import free_port
from pipeline.redis_server import start_redis_server
from pipeline.schema import Event, FrameResult
from pipeline.sink import RedisSink, connect
from pipeline.wire import eos_entry_id, frame_entry_id, frame_index_of, frames_key


def result(source_id: str, index: int) -> FrameResult:
    return FrameResult(source_id=source_id, frame_index=index, pts=index / 10, captured_at=1.0, width=64,
                       height=48, model="test", detections=[])


@pytest.fixture
def sink(redis_client, request):
    return RedisSink(redis_client, prefix=f"sink-{request.node.name}", maxlen=1000)


def indices(sink, source_id):
    return [json.loads(f["json"])["frame_index"] for _, f in sink.client.xrange(sink.frames_key(source_id))
            if f["type"] == "frame"]


def test_entry_ids_follow_the_frame_index():
    assert (frame_entry_id(0), frame_entry_id(41), eos_entry_id(41), eos_entry_id(None)) == ("1-0", "42-0",
                                                                                               "42-1", "0-1")
    assert frame_index_of("42-0") == 41 and frame_index_of("42-1") == 41


def test_retried_writes_do_not_duplicate(sink):
    sink.write_frames([result("cam", i) for i in range(8)], after={"cam": None})
    # A retry after a lost reply: the stream already ends with the write's last entry.
    assert sink.write_frames([result("cam", i) for i in range(8)], after={"cam": None}) == {}
    assert indices(sink, "cam") == list(range(8))
    sink.write_eos("cam", 7, frames=8)
    sink.write_eos("cam", 7, frames=8)  # retried eos
    assert sink.client.xlen(sink.frames_key("cam")) == 9


def test_a_rejected_id_that_was_never_written_is_an_error(sink):
    sink.write_frames([result("cam", 0), result("cam", 2)])
    with pytest.raises(ValueError, match="in order"):
        sink.write_frames([result("cam", 1)])  # out of order: frame 1 would be lost, so say so


def test_state_is_the_resume_point(sink):
    assert (sink.state("cam").last_frame_index, sink.state("cam").finished) == (None, False)
    sink.write_frames([result("cam", i) for i in range(3)])
    assert (sink.state("cam").last_frame_index, sink.state("cam").finished) == (2, False)
    sink.write_eos("cam", 2, frames=3)
    assert (sink.state("cam").last_frame_index, sink.state("cam").finished) == (2, True)
    sink.write_eos("empty", None, frames=0)
    assert (sink.state("empty").last_frame_index, sink.state("empty").finished) == (None, True)


def test_events_and_retention(sink):
    sink.event(Event(type="reconnecting", source_id="cam", message="timeout", details={"attempt": 1}))
    [(_, fields)] = sink.client.xrange(sink.events_key)
    event = json.loads(fields["json"])
    assert fields["type"] == "reconnecting" and event["v"] == 1 and event["details"] == {"attempt": 1}
    sink.maxlen = 10
    sink.write_frames([result("long", i) for i in range(500)])
    # MAXLEN ~ trims whole macro nodes (100 entries): approximately, never below the limit.
    assert 10 <= sink.client.xlen(sink.frames_key("long")) <= 110


def test_connect_with_a_password_in_the_url(tmp_path):
    server = start_redis_server(free_port(), tmp_path)
    try:
        port = server.args[server.args.index("--port") + 1]
        connect(f"redis://127.0.0.1:{port}/0").config_set("requirepass", "s3cret")
        client = connect(f"redis://:s3cret@127.0.0.1:{port}/0")
        RedisSink(client, "auth").write_frames([result("cam", 0)])
        assert client.xlen(frames_key("auth", "cam")) == 1
        with pytest.raises(ConnectionError, match=r"redis://\*\*\*@127.0.0.1") as error:
            connect(f"redis://:wrong@127.0.0.1:{port}/0")
        assert "wrong" not in str(error.value)  # the password never appears in messages
    finally:
        server.terminate()
        server.wait()
