"""Redis losing acknowledged writes (issue 17), with real redis-server processes killed with SIGKILL: an in-memory
server restarted empty, an AOF (`appendfsync everysec`) that lost its last writes, a stream deleted or trimmed by
someone else. Every frame of a file still ends up in Redis exactly once, in order, then eos; what a live source
lost is named by a `lost` event and counted in the summary. The tests print how soon the job noticed and repaired."""
import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers import encode_video, free_port, run_in_thread, stop_if_running, wait_for
from pipeline.config import PipelineConfig
from pipeline.redis_server import start_redis_server
from pipeline.runner import Job
from pipeline.schema import FrameResult
from pipeline.sink import RedisSink, StreamState, connect
from pipeline.wire import frame_entry_id, frame_index_of

FRAMES = 150


class Server:
    """A redis-server on a fixed port that can be killed (SIGKILL) and started again on the same directory."""

    def __init__(self, workdir: Path, extra: tuple[str, ...] = ()):
        self.port, self.workdir, self.extra = free_port(), workdir, extra
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = start_redis_server(self.port, workdir, extra=extra)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def start(self) -> float:
        """Start it again; returns the (unix) time it accepts connections."""
        self.process = start_redis_server(self.port, self.workdir, extra=self.extra)
        return time.time()


@pytest.fixture
def servers(tmp_path):
    started: list[Server] = []

    def server(name: str, *extra: str) -> Server:
        started.append(Server(tmp_path / name, extra))
        return started[-1]

    yield server
    for s in started:
        s.kill()


def result(source_id: str, index: int) -> FrameResult:
    return FrameResult(source_id=source_id, frame_index=index, pts=None, captured_at=0.0, width=8, height=8,
                       model="m", detections=[])


def frame_indices(sink: RedisSink, source_id: str) -> list[int]:
    return [json.loads(f["json"])["frame_index"] for _, f in sink.client.xrange(sink.frames_key(source_id))
            if f["type"] == "frame"]


def events(sink: RedisSink, source_id: str, kind: str) -> list[dict]:
    return [e for e in (json.loads(f["json"]) for _, f in sink.client.xrange(sink.events_key))
            if e["source_id"] == source_id and e["type"] == kind]


def has_frame(sink: RedisSink, source_id: str, index: int) -> bool:
    entry_id = frame_entry_id(index)
    return bool(sink.client.xrange(sink.frames_key(source_id), entry_id, entry_id))


def ends_with_every_frame_once(sink: RedisSink, source_id: str, frames: int = FRAMES) -> bool:
    entries = sink.client.xrange(sink.frames_key(source_id))
    return frame_indices(sink, source_id) == list(range(frames)) and entries[-1][1]["type"] == "eos"


# --- the sink's compare-and-append, on its own ---

@pytest.fixture
def sink(redis_client, request):
    return RedisSink(redis_client, prefix=f"loss-{request.node.name}")


def test_a_write_appends_only_where_the_stream_still_ends(sink):
    assert sink.write_frames([result("cam", i) for i in range(4)], after={"cam": None}) == {}
    # A retry after a lost reply finds the stream ending with its own last entry: written, not duplicated.
    assert sink.write_frames([result("cam", i) for i in range(4)], after={"cam": None}) == {}
    sink.client.delete(sink.frames_key("cam"))  # what an empty restart looks like to this stream
    lost = sink.write_frames([result("cam", 4), result("other", 0)], after={"cam": 3, "other": None})
    assert lost == {"cam": StreamState(None, False)}  # nothing of cam written; the other source was
    assert frame_indices(sink, "cam") == [] and frame_indices(sink, "other") == [0]
    sink.client.delete(sink.frames_key("cam"))
    assert sink.write_eos("cam", 3, frames=4) == StreamState(None, False)  # the eos is checked the same way
    assert sink.client.xlen(sink.events_key) == 0  # and its event logged only once it is written
    assert sink.write_frames([result("cam", i) for i in range(5)], after={"cam": None}) == {}  # the repair
    assert sink.write_eos("cam", 4, frames=5) is None and sink.state("cam") == StreamState(4, True)
    assert frame_indices(sink, "cam") == list(range(5))


def test_retention_by_someone_else_is_not_a_loss_and_another_writer_is_an_error(sink):
    sink.write_frames([result("cam", i) for i in range(6)])
    sink.client.xdel(sink.frames_key("cam"), frame_entry_id(5))  # a consumer deleting what it read
    sink.client.xtrim(sink.frames_key("cam"), maxlen=0)
    # Redis keeps a stream's last-generated ID through XDEL and XTRIM: the stream still ends after frame 5.
    assert sink.state("cam") == StreamState(5, False)
    assert sink.write_frames([result("cam", 6)], after={"cam": 5}) == {}
    assert frame_indices(sink, "cam") == [6]
    with pytest.raises(RuntimeError, match="another job"):
        sink.write_frames([result("cam", 3)], after={"cam": 2})  # the stream is ahead of what this writer wrote
    with pytest.raises(ValueError, match="in order"):
        sink.write_frames([result("cam", 8), result("cam", 7)], after={"cam": 6})


# --- the job ---

def start_job(server: Server, prefix: str, sources: list[dict], model: Path
              ) -> tuple[Job, RedisSink, threading.Thread, dict]:
    """A job in a thread; returns it, its sink, the thread, and the summary it fills when it ends."""
    config = PipelineConfig.model_validate({
        "sources": sources, "batching": {"max_batch_size": 4, "max_in_flight_per_source": 8},
        "decoder": {"num_cpus": 0.1, "buffer_size": 8, "open_timeout_s": 5}, "model": {"path": str(model)},
        "redis": {"url": server.url, "prefix": prefix, "retry_initial_s": 0.05, "retry_max_s": 0.5}})
    sink = RedisSink.from_config(connect(config.redis.url), config.redis)
    job = Job(config, sink)
    thread, summary = run_in_thread(job)
    return job, sink, thread, summary


def send(sink: RedisSink, message: dict) -> None:
    sink.client.xadd(sink.control_key, {"json": json.dumps(message)})


def stream_live(video: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(["ffmpeg", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(video),
                             "-c", "copy", "-f", "mpegts", f"udp://127.0.0.1:{port}?pkt_size=1316"])


def run_through_a_loss(tmp_path: Path, server: Server, prefix: str, tiny_model: Path, lose) -> dict:
    """A live source, then a file added by a control message once the live one writes; `lose()` (Redis killed,
    something lost, started again; returns when it is back) once 30 frames of the file are in Redis; then the file
    runs to its end, the live source writes again, and a `stop` message sent after the loss ends the job."""
    video = encode_video(tmp_path / "file.mp4", FRAMES, (64, 48))
    live_port = free_port()
    sender = stream_live(encode_video(tmp_path / "live.ts", 50, (64, 48), fps=25), live_port)
    job, sink, thread, summary = start_job(server, prefix, [{"id": "live", "url": f"udp://127.0.0.1:{live_port}"}],
                                           tiny_model)
    try:
        wait_for(lambda: sink.client.xlen(sink.frames_key("live")) >= 5, what="the live source")
        send(sink, {"op": "add", "source": {"id": "file", "url": str(video)}})
        wait_for(lambda: sink.client.xlen(sink.frames_key("file")) >= 30, interval=0.02, what="30 file frames")
        live_entries = sink.client.xlen(sink.frames_key("live"))
        wait_for(lambda: sink.client.xlen(sink.frames_key("live")) > live_entries, interval=0.02,
                 what="a live write after the file's 30th frame")  # so the live source loses frames too
        back = lose()
        wait_for(lambda: events(sink, "file", "lost"), what="the file's lost event")
        [file_lost] = events(sink, "file", "lost")
        wait_for(lambda: has_frame(sink, "file", file_lost["details"]["last_frame_index"]), interval=0.02,
                 what="the lost frames written again")
        repaired = time.time()
        wait_for(lambda: sink.state("file").finished, what="the file's eos")
        wait_for(lambda: events(sink, "live", "lost"), what="the live source's lost event")
        live_entries = sink.client.xlen(sink.frames_key("live"))
        wait_for(lambda: sink.client.xlen(sink.frames_key("live")) > live_entries, what="the live source again")
        send(sink, {"op": "stop"})  # sent after the loss: the job still reads the control stream
        thread.join(timeout=60)
    finally:
        sender.kill()
        stop_if_running(job, thread)
    assert not thread.is_alive()
    [live_lost] = events(sink, "live", "lost")
    return {"sink": sink, "summary": summary, "file_lost": file_lost, "live_lost": live_lost, "back": back,
            "repaired": repaired}


def check_and_report(run: dict, what: str) -> None:
    sink, summary, file_lost, live_lost = run["sink"], run["summary"], run["file_lost"], run["live_lost"]
    # The file: every frame exactly once, in order, then eos, and the summary counts each frame once.
    assert ends_with_every_frame_once(sink, "file")
    assert summary["file"]["status"] == "eos" and summary["file"]["frames"] == FRAMES
    assert summary["file"]["lost"] == 0 and file_lost["details"]["rewritten"] is True
    eos = json.loads(sink.client.xrevrange(sink.frames_key("file"), count=1)[0][1]["json"])
    assert eos["details"] == {"frames": FRAMES, "last_frame_index": FRAMES - 1}
    # The live source: its lost frames are named and counted; it went on after them, with no duplicate.
    details = live_lost["details"]
    assert details["rewritten"] is False and 0 < details["frames"] == summary["live"]["lost"]
    assert details["first_frame_index"] <= details["last_frame_index"]
    live = frame_indices(sink, "live")
    assert live == sorted(set(live)) and not [i for i in live if details["first_frame_index"] <= i
                                              <= details["last_frame_index"]]
    assert live[-1] > details["last_frame_index"] and summary["live"]["status"] == "stopped"
    f, back = file_lost["details"], run["back"]
    print(f"\n{what}: file frames {f['first_frame_index']}-{f['last_frame_index']} lost, noticed "
          f"{file_lost['at'] - back:.2f} s after Redis was back, all written again {run['repaired'] - back:.2f} s "
          f"after; live frames {details['first_frame_index']}-{details['last_frame_index']} lost "
          f"({details['frames']} frames), noticed {live_lost['at'] - back:.2f} s after; outages the sink waited "
          f"through (none when redis-py reconnected on its own): {[round(s, 2) for s in sink.outages]}")


def test_an_empty_restart_mid_run_rewrites_the_files_lost_frames_and_reports_the_live_ones(
        tmp_path, servers, ray_session, tiny_model):
    server = servers("memory")  # the embedded default's settings: no RDB, no AOF

    def restart_empty() -> float:
        server.kill()
        return server.start()

    run = run_through_a_loss(tmp_path, server, "loss-empty", tiny_model, restart_empty)
    assert run["file_lost"]["details"]["first_frame_index"] == 0  # everything was gone
    assert run["file_lost"]["details"]["last_frame_index"] >= 29
    check_and_report(run, "empty restart")


def truncate_aof_before(server: Server, key: str, entry_id: str) -> None:
    """Cut the AOF right before the write (a MULTI block: one sink round trip) that added `entry_id` to `key`: what
    `appendfsync everysec` loses of its last second when the machine, not just redis-server, goes down."""
    [incr] = (server.workdir / "appendonlydir").glob("*.incr.aof")
    data = incr.read_bytes()
    xadd = re.search(rb"\r\n" + re.escape(key.encode()) + rb"\r\n\$6\r\nMAXLEN\r\n\$1\r\n=\r\n\$\d+\r\n\d+\r\n\$\d+\r\n"
                     + re.escape(entry_id.encode()) + rb"\r\n", data)
    assert xadd is not None, f"no XADD of {entry_id} to {key} in {incr}"
    incr.write_bytes(data[:data.rindex(b"*1\r\n$5\r\nMULTI\r\n", 0, xadd.start())])


def test_an_everysec_aof_that_lost_its_last_writes_is_repaired(tmp_path, servers, ray_session, tiny_model):
    server = servers("aof", "--appendonly", "yes", "--appendfsync", "everysec")
    prefix = "loss-aof"

    def crash() -> float:
        server.kill()  # SIGKILL: the kernel still has what redis-server wrote, so the cut is made by hand
        truncate_aof_before(server, f"{prefix}:frames:file", frame_entry_id(20))
        return server.start()

    run = run_through_a_loss(tmp_path, server, prefix, tiny_model, crash)
    # The write that held frame 20 (with up to 8 frames) and everything after it were lost.
    assert 12 <= run["file_lost"]["details"]["first_frame_index"] <= 20
    assert run["file_lost"]["details"]["last_frame_index"] >= 29
    check_and_report(run, "everysec AOF cut")


def test_a_stream_deleted_or_trimmed_by_someone_else(tmp_path, servers, ray_session, tiny_model):
    server = servers("others")
    deleted, trimmed = (encode_video(tmp_path / f"{name}.mp4", FRAMES, (64, 48)) for name in ("deleted", "trimmed"))
    job, sink, thread, summary = start_job(server, "loss-others", [{"id": "deleted", "url": str(deleted)},
                                                                   {"id": "trimmed", "url": str(trimmed)}], tiny_model)
    try:
        wait_for(lambda: sink.client.xlen(sink.frames_key("deleted")) >= 30, interval=0.02)
        sink.client.delete(sink.frames_key("deleted"))
        deleted_at = time.time()
        wait_for(lambda: sink.client.xlen(sink.frames_key("trimmed")) >= 30, interval=0.02)
        trim = sink.client.pipeline(transaction=True)  # trim, and read where the stream ends, at one moment
        trim.xtrim(sink.frames_key("trimmed"), maxlen=0).xinfo_stream(sink.frames_key("trimmed"))
        trimmed_from = frame_index_of(trim.execute()[1]["last-generated-id"]) + 1
        assert trimmed_from < FRAMES  # trimmed mid-run
        thread.join(timeout=120)
    finally:
        stop_if_running(job, thread)
    assert not thread.is_alive()
    # A deleted stream is an empty server for that source: its frames are written again, once each.
    assert ends_with_every_frame_once(sink, "deleted") and summary["deleted"]["status"] == "eos"
    [lost] = events(sink, "deleted", "lost")
    assert lost["details"]["first_frame_index"] == 0 and lost["details"]["rewritten"] is True
    # Trimming keeps the stream's last-generated ID: retention, not loss. The job goes on where it was.
    assert events(sink, "trimmed", "lost") == [] and summary["trimmed"]["status"] == "eos"
    assert frame_indices(sink, "trimmed") == list(range(trimmed_from, FRAMES))
    assert summary["trimmed"]["frames"] == summary["deleted"]["frames"] == FRAMES
    print(f"\nstream deleted: frames 0-{lost['details']['last_frame_index']} noticed {lost['at'] - deleted_at:.2f} s "
          f"after the DEL; trimmed stream went on from frame {trimmed_from}")
