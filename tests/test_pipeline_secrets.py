"""Camera passwords never rest in Redis (issue 17): a source URL names its password as `${NAME}`, which the decoder
fills in from its own environment when it opens the stream; `cdetr submit` refuses a password written into the URL;
the Redis ACL users of docs/security.md can each do their job and nothing else (a subscriber never reads the
control stream). The camera is an HTTP server on loopback that wants Basic auth."""
import base64
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest
import redis

from helpers import count_frames, encode_video, free_port, wait_for
from pipeline.cli import main
from pipeline.config import DecoderConfig, SourceConfig, load_config
from pipeline.decoder import StreamDecoder
from pipeline.redis_server import start_redis_server
from pipeline.schema import ControlMessage, Event, FrameResult
from pipeline.sink import RedisSink, connect
from pipeline.sources import MissingSecret, expand_secrets, inline_password, parse_source_url, redact

ROOT = Path(__file__).resolve().parent.parent
USER = "admin"
# `@`, `:`, `/` and `#` would each change the URL if the password were pasted in unencoded. SECRET is in every
# form of it (plain or percent-encoded): no text in Redis, output or logs may contain SECRET.
SECRET = "Pw7Qx"
PASSWORD = f"c@m:{SECRET}/z#1"
ENV_NAME = "CDETR_TEST_CAM_PASSWORD"
ACL_PASSWORD = "acl-user-pw-5c1e"
SIZE = {"shortest_edge": 32, "longest_edge": 48}


@pytest.fixture(scope="module")
def camera(tmp_path_factory) -> Iterator[dict]:
    """An HTTP "camera" on loopback serving one MPEG-TS video at every path, to Basic auth USER:PASSWORD only:
    {"host": "127.0.0.1:<port>", "frames": n}."""
    video = encode_video(tmp_path_factory.mktemp("camera") / "cam.ts", 12, (64, 48))
    payload = video.read_bytes()
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    class Camera(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="camera"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "video/mp2t")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):  # no request lines on the test's stderr
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Camera)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"host": f"127.0.0.1:{server.server_address[1]}", "frames": count_frames(video)}
    server.shutdown()
    server.server_close()


def documented_acl_users() -> dict[str, list[str]]:
    """The `ACL SETUSER` lines of docs/security.md (user -> rules), their `>PASSWORD` rules set to ACL_PASSWORD:
    the test sets up exactly the users the documentation gives."""
    users = {}
    for line in (ROOT / "docs" / "security.md").read_text().splitlines():
        if line.startswith("ACL SETUSER "):
            name, *rules = line.split()[2:]
            users[name] = [f">{ACL_PASSWORD}" if rule.startswith(">") else rule for rule in rules]
    return users


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory) -> Iterator[dict]:
    """A redis-server of this module's own (every key in it is ours to scan) with docs/security.md's ACL users;
    the `default` user stays the administrator. {"admin": client, "url": user -> URL}."""
    port = free_port()
    process = start_redis_server(port, tmp_path_factory.mktemp("acl-redis"))
    admin = connect(f"redis://127.0.0.1:{port}/0")
    for user, rules in documented_acl_users().items():
        admin.execute_command("ACL", "SETUSER", user, *rules)
    yield {"admin": admin, "url": lambda user: f"redis://{user}:{ACL_PASSWORD}@127.0.0.1:{port}/0"}
    process.terminate()
    process.wait(timeout=10)


def read_all(decoder: StreamDecoder) -> tuple[int, list[Event]]:
    """Frames decoded and events, until the decoder finishes."""
    frames, events = 0, []
    while True:
        info, _ = decoder.read(8, wait_s=1.0)
        frames, events = frames + len(info.frames), events + info.events
        if info.finished:
            return frames, events


def every_text(client: redis.Redis) -> Iterator[str]:
    """Every key name and every value in the database, whatever the key's type."""
    for key in client.scan_iter(count=1000):
        yield key
        kind = client.type(key)
        if kind == "stream":
            for entry_id, fields in client.xrange(key):
                yield entry_id
                yield from (text for item in fields.items() for text in item)
        elif kind == "string":
            yield client.get(key)
        elif kind == "hash":
            yield from (text for item in client.hgetall(key).items() for text in item)
        elif kind == "list":
            yield from client.lrange(key, 0, -1)
        elif kind in ("set", "zset"):
            yield from (client.smembers(key) if kind == "set" else client.zrange(key, 0, -1))
        else:
            raise AssertionError(f"{key}: a {kind} key, which this scan cannot read")


def test_a_secret_reference_stands_only_for_the_user_or_password():
    url = "rtsp://admin:${CAM7_PASSWORD}@10.0.0.7:554/stream"
    assert SourceConfig(id="cam7", url=url).url == url  # validated, stored and sent as the reference
    for misplaced in ("rtsp://${CAM_HOST}/stream", "rtsp://admin@10.0.0.7/${STREAM}", "http://cam/v.ts?t=${TOKEN}",
                      "/videos/${NAME}.mp4", "rtsp://admin:${not-a-name}@cam/live", "rtsp://admin:${OPEN@cam/live"):
        with pytest.raises(ValueError, match=r"\$\{NAME\}"):
            parse_source_url(misplaced)
    # The value is percent-encoded into the user info: whatever it holds, the host, port and path stay.
    hostile = "x@evil.example:80/#"
    expanded = expand_secrets(url, {"CAM7_PASSWORD": hostile})
    assert expanded == "rtsp://admin:x%40evil.example%3A80%2F%23@10.0.0.7:554/stream"
    parts = urlsplit(expanded)
    assert (parts.hostname, parts.port, parts.path, unquote(parts.password)) == ("10.0.0.7", 554, "/stream", hostile)
    with pytest.raises(MissingSecret, match="CAM7_PASSWORD"):
        expand_secrets(url, {})


def test_inline_passwords_are_told_from_references_and_redacted_whole():
    assert inline_password("rtsp://admin:hunter2@cam/live")
    for no_password in ("rtsp://admin:${CAM_PASSWORD}@cam/live", "rtsp://${CAM_USER}:${CAM_PASSWORD}@cam/live",
                        "rtsp://admin@cam/live", "rtsp://cam/live", "/videos/a:b@c.mp4"):
        assert not inline_password(no_password), no_password
    # A password with an `@` in it (written unencoded) is hidden up to the host's `@`, not the first one.
    assert redact("can't open 'rtsp://admin:p@ss@cam/live' (401)") == "can't open 'rtsp://***@cam/live' (401)"
    assert redact("http://cam/v.ts?user=a@b") == "http://cam/v.ts?user=a@b"  # an `@` after the host is no password
    with pytest.raises(ValueError) as error:  # errors quote the URL: redacted
        load_config(env={}, overrides={"sources": [{"id": "c", "url": "rtsp://admin:hunter2@/live"}]})
    assert "hunter2" not in str(error.value) and "***@" in str(error.value)


def test_the_decoder_fills_in_the_password_from_its_environment(camera, monkeypatch):
    url = f"http://{USER}:${{{ENV_NAME}}}@{camera['host']}/cam.ts"
    source = SourceConfig(id="cam", url=url)
    monkeypatch.setenv(ENV_NAME, PASSWORD)
    frames, events = read_all(StreamDecoder(source, SIZE, DecoderConfig()))
    assert frames == camera["frames"] and [e.type for e in events] == ["started"]
    assert events[0].details["url"] == f"http://***@{camera['host']}/cam.ts"
    monkeypatch.setenv(ENV_NAME, "wrong-a81f")  # the camera refuses it; the event does not show it
    frames, [error] = read_all(StreamDecoder(source, SIZE, DecoderConfig()))
    assert frames == 0 and error.type == "error" and "401" in error.message and "a81f" not in error.model_dump_json()
    monkeypatch.delenv(ENV_NAME)  # an unset variable: an error naming it, for this source only
    frames, [error] = read_all(StreamDecoder(source, SIZE, DecoderConfig()))
    assert frames == 0 and error.type == "error" and f"{ENV_NAME} " in error.message and "not set" in error.message


def test_cdetr_submit_refuses_an_inline_password_and_says_how_to_pass_it(redis_server, redis_client, capsys):
    sink = RedisSink(redis_client, "secrets-submit")
    redis_args = ["--redis-url", redis_server["url"], "--prefix", "secrets-submit"]
    inline = f"rtsp://{USER}:{quote(PASSWORD, safe='')}@10.0.0.7/stream"
    assert main(["submit", inline, "--source-id", "cam7", *redis_args]) == 2
    err = capsys.readouterr().err
    assert "rtsp://admin:${CAM7_PASSWORD}@10.0.0.7/stream" in err and "--allow-inline-password" in err
    assert SECRET not in err and not redis_client.exists(sink.control_key)
    by_reference = "rtsp://admin:${CAM7_PASSWORD}@10.0.0.7/stream"
    assert main(["submit", by_reference, "--source-id", "cam7", *redis_args]) == 0
    assert main(["submit", inline, "--source-id", "cam8", "--allow-inline-password", *redis_args]) == 0
    assert "plain text" in capsys.readouterr().err
    sent = [ControlMessage.validate_json(fields["json"]).source for _, fields in redis_client.xrange(sink.control_key)]
    assert [(s.id, s.url) for s in sent] == [("cam7", by_reference), ("cam8", inline)]


def test_no_key_in_redis_holds_a_camera_password_after_cdetr_run_and_submit(tmp_path, acl_redis, camera, tiny_model,
                                                                              capsys):
    """`cdetr run` (as the documented pipeline user) with the password inline in a URL without a path (its id is
    derived from the URL), by reference, and by a reference to an unset variable; then `cdetr submit` (as the
    submitting user) adds a source by reference and is refused one with the password inline."""
    host = camera["host"]
    inline = f"http://{USER}:{quote(PASSWORD, safe='')}@{host}/"
    by_reference = f"http://{USER}:${{{ENV_NAME}}}@{host}/ref.ts"
    unset = f"http://{USER}:${{CDETR_TEST_UNSET_PASSWORD}}@{host}/unset.ts"
    ray_dir = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": str(ray_dir), "CDETR_KEEP_RUNNING": "true",
           "CDETR_REDIS__URL": acl_redis["url"]("cdetr"), "CDETR_DECODER__NUM_CPUS": "0.1", ENV_NAME: PASSWORD}
    env.pop("CDETR_TEST_UNSET_PASSWORD", None)
    admin = acl_redis["admin"]
    sink = RedisSink(admin)  # the default prefix, which the documented ACL rules name
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", inline, by_reference, unset, "--model",
                               str(tiny_model), "--batch-size", "4"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sink.state("ref").finished or driver.poll() is not None, 300, "the source by reference")
        submit_url = acl_redis["url"]("cdetr-submit")
        assert main(["submit", by_reference.replace("ref.ts", "late.ts"), "--source-id", "late", "--redis-url",
                     submit_url]) == 0
        assert main(["submit", inline, "--source-id", "refused", "--redis-url", submit_url]) == 2
        wait_for(lambda: sink.state("late").finished or driver.poll() is not None, 120, "the submitted source")
        admin.xadd(sink.control_key, {"json": json.dumps({"op": "stop"})})
        out, err = driver.communicate(timeout=120)
        logs = [p for p in ray_dir.rglob("*") if p.is_file() and not p.is_socket()]
        leaked_to_logs = [str(p) for p in logs if SECRET.encode() in p.read_bytes()]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert driver.returncode == 1, err[-3000:]  # the unset variable's source ended in error
    streams = {key.rsplit(":", 1)[1]: admin.xrange(key) for key in admin.scan_iter(f"{sink.prefix}:frames:*")}
    assert len(streams) == 3 and {"ref", "late"} < set(streams)  # the unset one wrote nothing
    assert all([f["type"] for _, f in s] == ["frame"] * camera["frames"] + ["eos"] for s in streams.values())
    events = [Event.model_validate_json(f["json"]) for _, f in admin.xrange(sink.events_key)]
    [missing] = [e for e in events if e.type == "error"]
    assert "CDETR_TEST_UNSET_PASSWORD" in missing.message and "unset" not in streams
    assert {e.details["url"] for e in events if e.type == "started"} >= {f"http://***@{host}/", f"http://***@{host}/ref.ts"}
    # The control stream holds the submitted reference (and a stop), never the password.
    assert [ControlMessage.validate_json(f["json"]).op for _, f in admin.xrange(sink.control_key)] == ["add", "stop"]
    assert set(admin.info("keyspace")) == {"db0"}  # one database to scan
    texts = list(every_text(admin))
    assert f"${{{ENV_NAME}}}" in " ".join(texts)
    assert not [t for t in texts if SECRET in t]
    assert SECRET not in out + err + capsys.readouterr().err
    assert logs and not leaked_to_logs, leaked_to_logs


def test_the_documented_acl_users_can_do_their_job_and_nothing_else(acl_redis, capsys):
    assert set(documented_acl_users()) == {"cdetr", "cdetr-submit", "cdetr-read"}
    admin, url = acl_redis["admin"], acl_redis["url"]
    sink = RedisSink(admin)
    sink.write_frames([FrameResult(source_id="acl-cam", frame_index=0, pts=0.0, captured_at=time.time(), width=64,
                                   height=48, model="m", detections=[])])
    sink.write_eos("acl-cam", 0, 1)
    sink.event(Event(type="started", source_id="acl-cam"))

    # cdetr-read: `cdetr subscribe`, plainly and in a consumer group, and the events stream.
    for group in ([], ["--group", "g", "--consumer", "c1"]):
        assert main(["subscribe", "acl-cam", "--redis-url", url("cdetr-read"), *group]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [FrameResult.model_validate_json(line).frame_index for line in lines] == [0]
    reader = connect(url("cdetr-read"))
    assert reader.xrevrange(sink.events_key, count=1)
    # cdetr-submit: `cdetr submit`.
    assert main(["submit", "/videos/cam.mp4", "--source-id", "acl-submitted", "--redis-url", url("cdetr-submit")]) == 0
    [(_, fields)] = admin.xrevrange(sink.control_key, count=1)
    assert ControlMessage.validate_json(fields["json"]).source.id == "acl-submitted"
    submitter = connect(url("cdetr-submit"))

    frames = sink.frames_key("acl-cam")
    forbidden = {
        "reader: read the control stream": lambda: reader.xrange(sink.control_key),
        "reader: wait on the control stream": lambda: reader.xread({sink.control_key: "0-0"}),
        "reader: consume the control stream": lambda: reader.xreadgroup("g", "c1", {sink.control_key: ">"}),
        "reader: write to the control stream": lambda: reader.xadd(sink.control_key, {"json": "{}"}),
        "reader: add a frame": lambda: reader.xadd(frames, {"json": "{}"}, id="5-0"),
        "reader: delete a frame": lambda: reader.xdel(frames, "1-0"),
        "reader: delete a stream": lambda: reader.delete(frames),
        "reader: add an event": lambda: reader.xadd(sink.events_key, {"json": "{}"}),
        "reader: read another prefix": lambda: reader.xrange("other:frames:acl-cam"),
        "reader: list the keys": lambda: reader.keys(),
        "submitter: read the control stream": lambda: submitter.xrange(sink.control_key),
        "submitter: delete control entries": lambda: submitter.xtrim(sink.control_key, maxlen=0),
        "submitter: read frames": lambda: submitter.xread({frames: "0-0"}),
        "submitter: read events": lambda: submitter.xrange(sink.events_key),
    }
    allowed = []
    for what, action in forbidden.items():
        try:
            action()
            allowed.append(what)
        except redis.exceptions.NoPermissionError:
            pass
    assert not allowed, allowed
    assert [entry_id for entry_id, _ in admin.xrange(frames)] == ["1-0", "1-1"]  # untouched
