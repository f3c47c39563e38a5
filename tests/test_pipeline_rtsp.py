"""RTSP cameras against a real RTSP server (GStreamer's, tests/rtsp_server.py): TCP and UDP transport, Basic and
Digest auth, a wrong password, an unreachable host, RTSPS with a test CA, a reboot, a stall, a new resolution.
Each test reads a StreamDecoder (a plain object here; the runner makes it a Ray actor) and checks the events and
frames a user gets, and that no event holds the password."""
import json
import time

import pytest
from rtsp_server import RtspCamera

from helpers import free_port, make_certificates, run_in_thread, stop_if_running, wait_for
from pipeline.cli import main
from pipeline.config import DecoderConfig, PipelineConfig, SourceConfig
from pipeline.decoder import StreamDecoder
from pipeline.runner import Job
from pipeline.sink import RedisSink, connect

SIZE = {"shortest_edge": 32, "longest_edge": 48}
LIVE = DecoderConfig(open_timeout_s=3, read_timeout_s=1.5, reconnect_initial_s=0.2, reconnect_max_s=0.5,
                     watchdog_s=2, buffer_size=8, auth_retry_s=1.5)
PASSWORD = "s3cret-Pa55"


@pytest.fixture
def cameras():
    """Start cameras with `cameras(**RtspCamera options)`; every one is killed at the end."""
    started: list[RtspCamera] = []

    def start(**options) -> RtspCamera:
        started.append(RtspCamera(free_port(), **options).start())
        return started[-1]

    yield start
    for camera in started:
        camera.stop()


class Reader:
    """Reads a decoder, keeping every event and frame's metadata it has handed out."""

    def __init__(self, decoder: StreamDecoder):
        self.decoder, self.events, self.frames = decoder, [], []

    def until(self, condition, timeout: float = 20.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"no {what} within {timeout} s; events: {self.types()}"
            info, _ = self.decoder.read(4, wait_s=0.2)
            self.events += info.events
            self.frames += info.frames

    def until_event(self, kind: str, timeout: float = 20.0):
        self.until(lambda: kind in self.types(), timeout, f"{kind!r} event")
        return [e for e in self.events if e.type == kind][-1]

    def until_frames(self, n: int, timeout: float = 20.0) -> None:
        start = len(self.frames)
        self.until(lambda: len(self.frames) >= start + n, timeout, f"{n} frames")

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def no_secret(self) -> bool:
        return not any(PASSWORD in event.model_dump_json() for event in self.events)


def read(url: str, cfg: DecoderConfig = LIVE, **source) -> Reader:
    return Reader(StreamDecoder(SourceConfig(id="cam", url=url, **source), SIZE, cfg))


@pytest.mark.parametrize("offered, transport, used", [
    ("udp", "auto", "udp"),  # a UDP-only camera works with the default
    ("tcp", "auto", "tcp"),
    ("all", "auto", "tcp"),  # TCP first: no packet loss, passes NATs
    ("all", "udp", "udp"),
])
def test_transport(cameras, offered, transport, used):
    camera = cameras(protocols=offered)
    reader = read(camera.url, transport=transport)
    try:
        started = reader.until_event("started")
        reader.until_frames(5)
        assert started.details["transport"] == used and started.details["codec"] == "h264"
        assert (started.details["width"], started.details["height"], started.details["fps"]) == (320, 180, 10)
        indexes = [m.frame_index for m in reader.frames]
        assert indexes == sorted(indexes) and {(m.width, m.height) for m in reader.frames} == {(320, 180)}
        assert reader.types() == ["started"], reader.events
    finally:
        reader.decoder.stop()


def test_a_transport_the_camera_does_not_offer_is_reported_on_every_attempt(cameras):
    camera = cameras(protocols="udp")
    reader = read(camera.url, transport="tcp")
    try:
        reader.until(lambda: reader.types().count("reconnecting") >= 2, what="2 reconnecting events")
        assert "the camera does not offer RTSP over TCP" in reader.events[0].message and not reader.frames
    finally:
        reader.decoder.stop()


@pytest.mark.parametrize("method", ["basic", "digest"])
def test_credentials_by_reference_and_a_wrong_password(cameras, monkeypatch, method):
    """The right password: frames. A wrong one: one `auth_failed` event naming the failure, no password, no
    reconnect storm; it is tried again after `auth_retry_s`, and once fixed the camera starts."""
    camera = cameras(auth=method, password=PASSWORD)
    monkeypatch.setenv("CAM_PASSWORD", PASSWORD)
    good = read(camera.url_with("viewer", "${CAM_PASSWORD}"))
    monkeypatch.setenv("CAM_WRONG", "not-" + PASSWORD)
    wrong = read(camera.url_with("viewer", "${CAM_WRONG}"))
    try:
        good.until_frames(5)
        assert good.types() == ["started"] and good.no_secret()
        failed = wrong.until_event("auth_failed")
        assert "authentication failed" in failed.message and "401" in failed.message
        assert "rtsp://***@127.0.0.1" in failed.message and failed.details == {"retry_s": LIVE.auth_retry_s}
        time.sleep(2 * LIVE.auth_retry_s)  # one more attempt or two, each refused again
        monkeypatch.setenv("CAM_WRONG", PASSWORD)  # the operator fixes the password
        wrong.until_frames(3)
        assert wrong.types() == ["auth_failed", "started"] and wrong.no_secret()
    finally:
        good.decoder.stop()
        wrong.decoder.stop()


@pytest.mark.parametrize("host, why", [
    (f"127.0.0.1:{free_port()}", "Connection refused"),  # nothing listens: a camera that is off
    ("camera.invalid", "cannot resolve host 'camera.invalid'"),  # a typo in the name (.invalid never resolves)
])
def test_an_unreachable_camera_is_retried_with_backoff(host, why):
    reader = read(f"rtsp://viewer:{PASSWORD}@{host}/cam")
    try:
        reader.until(lambda: reader.types().count("reconnecting") >= 3, what="3 reconnecting events")
        attempts = [e.details for e in reader.events]
        assert [a["attempt"] for a in attempts[:3]] == [1, 2, 3] and attempts[0]["delay_s"] == LIVE.reconnect_initial_s
        assert why in reader.events[0].message and not reader.frames and reader.no_secret()
    finally:
        reader.decoder.stop()


def test_rtsps_with_a_test_ca(cameras, tmp_path):
    ca = make_certificates(tmp_path, "camera")
    other_ca = make_certificates(tmp_path, "other")
    camera = cameras(tls=(tmp_path / "camera.crt", tmp_path / "camera.key"))
    trusted = read(camera.url, ca_file=str(ca))
    untrusted = read(camera.url, ca_file=str(other_ca))
    try:
        started = trusted.until_event("started")
        trusted.until_frames(5)
        assert started.details["transport"] == "tcp"
        refused = untrusted.until_event("reconnecting")
        assert not untrusted.frames and "started" not in untrusted.types() and "ca_file" in refused.message
    finally:
        trusted.decoder.stop()
        untrusted.decoder.stop()


def test_camera_reboots_and_comes_back_at_another_resolution(cameras):
    camera = cameras()
    reader = read(camera.url)
    try:
        reader.until_frames(5)
        camera.kill()  # power cut: the RTSP session just ends
        assert reader.until_event("reconnecting").message == "StalledError: live stream ended"
        camera.start()
        reader.until_event("recovered")
        reader.until_frames(5)
        camera.kill()
        camera.start(size="160x90")  # reconfigured while it was down
        reader.until(lambda: reader.types().count("recovered") == 2, what="the second recovery")
        assert reader.events[-1].details["width"] == 160
        reader.until_frames(5)
        sizes = [(m.width, m.height) for m in reader.frames]
        assert sizes[0] == (320, 180) and sizes[-1] == (160, 90)
        assert sizes == sorted(sizes, reverse=True)  # one switch, no frame of the old size after it
        indexes = [m.frame_index for m in reader.frames]
        assert indexes == sorted(set(indexes))  # numbering only grows across reboots
    finally:
        reader.decoder.stop()


def test_a_stalled_camera_is_reconnected(cameras):
    camera = cameras()
    reader = read(camera.url)
    try:
        reader.until_frames(5)
        camera.pause()  # the connection stays open, nothing comes
        stalled = reader.until_event("reconnecting")
        assert "timed out" in stalled.message or "no frame" in stalled.message
        time.sleep(2)  # stalled attempts: the server accepts connections but answers nothing
        camera.resume()
        reader.until_event("recovered", timeout=30)
        before = len(reader.frames)
        reader.until_frames(5)
        assert reader.frames[-1].frame_index > reader.frames[before - 1].frame_index
    finally:
        reader.decoder.stop()


def test_a_job_shows_the_refused_camera_and_runs_the_others(cameras, redis_server, ray_session, tiny_model, caplog):
    """Through Ray and Redis, as `cdetr run` sees it: the camera with the right password writes frames; the one
    with the wrong password gets one `auth_failed` event in Redis, an error line in the log and `auth_failed` in
    the summary; the password is nowhere."""
    camera = cameras(auth="digest", password=PASSWORD)
    config = PipelineConfig.model_validate({
        "sources": [{"id": "good", "url": camera.url_with("viewer", PASSWORD)},
                    {"id": "wrong", "url": camera.url_with("viewer", "not-" + PASSWORD)}],
        "batching": {"max_batch_size": 4}, "decoder": {"num_cpus": 0.1, "buffer_size": 8},
        "model": {"path": str(tiny_model)}, "redis": {"url": redis_server["url"], "prefix": "rtsp"}})
    sink = RedisSink.from_config(connect(redis_server["url"]), config.redis)
    job = Job(config, sink)
    thread, summary = run_in_thread(job)
    try:
        wait_for(lambda: sink.client.xlen(sink.frames_key("good")) >= 10, 60, "frames of the good camera")
        stop = {"json": '{"op": "stop"}'}
        sink.client.xadd(sink.control_key, stop)
        thread.join(timeout=60)
    finally:
        stop_if_running(job, thread)
    events = [json.loads(f["json"]) for _, f in sink.client.xrange(sink.events_key)]
    assert [e["type"] for e in events if e["source_id"] == "wrong"] == ["auth_failed"]
    assert summary["wrong"]["status"] == "auth_failed" and summary["wrong"]["frames"] == 0
    assert summary["good"]["status"] == "stopped" and summary["good"]["frames"] >= 10
    assert any("authentication failed" in r.getMessage() for r in caplog.records)
    assert PASSWORD not in json.dumps(events) + caplog.text


def test_cdetr_probe_reports_what_the_decoder_finds(cameras, monkeypatch, capsys):
    camera = cameras(protocols="udp", auth="digest", password=PASSWORD)
    monkeypatch.setenv("CAM_PASSWORD", PASSWORD)
    assert main(["probe", camera.url_with("viewer", "${CAM_PASSWORD}"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reachable"] and report["error"] is None and report["live"]
    assert (report["codec"], report["width"], report["height"], report["fps"]) == ("h264", 320, 180, 10.0)
    assert report["transport"] == "udp" and 0 < report["open_s"] <= report["first_frame_s"]
    print(f"open {report['open_s']} s, first frame {report['first_frame_s']} s")
    assert main(["probe", camera.url_with("viewer", "wrong-" + PASSWORD)]) == 1
    out = capsys.readouterr().out
    assert "reachable:       False" in out and "auth_failed:     True" in out and "authentication failed" in out
    assert PASSWORD not in out
    assert main(["probe", camera.url_with("viewer", "${CAM_PASSWORD}"), "--transport", "tcp", "--json"]) == 1
    assert "does not offer RTSP over TCP" in json.loads(capsys.readouterr().out)["error"]
