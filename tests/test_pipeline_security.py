"""Security (issue 7): `cdetr run` against a redis-server that accepts only TLS (a CA and server certificate made
here with openssl) and only an ACL user with a password; the password appears in no output, event or Ray log.
Nothing read from Redis, a control message or the environment is unpickled or evaluated."""
import ast
import base64
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import redis

from helpers import encode_video, free_port, make_certificates
from pipeline.cli import main
from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.redis_server import start_redis_server
from pipeline.runner import Job
from pipeline.schema import ControlMessage
from pipeline.sink import RedisSink, connect
from pipeline.sources import redact
from pipeline.subscriber import Subscriber
from pipeline.wire import events_key, frames_key

PASSWORD = "pw-7f3a9c2e51d8"
PREFIX = "sec"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory):
    """TLS only (no plain port), the default user disabled, user `cdetr` limited to the `sec:` keys."""
    directory = tmp_path_factory.mktemp("tls")
    ca = make_certificates(directory, "server")
    port = free_port()
    process = start_redis_server(port, directory, extra=(
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(directory / "server.crt"),
        "--tls-key-file", str(directory / "server.key"), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"))
    admin = connect(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}")
    admin.acl_setuser("cdetr", enabled=True, passwords=[f"+{PASSWORD}"], keys=[f"{PREFIX}:*"],
                      commands=["+@all", "-@dangerous"])
    admin.acl_setuser("default", enabled=False)
    yield {"url": f"rediss://cdetr:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}", "port": port,
           "dir": directory}
    process.terminate()
    process.wait(timeout=10)


def test_cdetr_run_over_tls_as_an_acl_user_never_shows_the_password(tmp_path, secure_redis, tiny_model):
    video = encode_video(tmp_path / "secure.mp4", 12, (64, 48))
    ray_dir = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": str(ray_dir), "CDETR_REDIS__PREFIX": PREFIX}
    try:
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(video), "--model", str(tiny_model),
                               "--redis-url", secure_redis["url"], "--batch-size", "4"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        client = connect(secure_redis["url"])
        assert [r.frame_index for r in Subscriber(client, "secure", PREFIX)] == list(range(12))
        events = [f["json"] for _, f in client.xrange(events_key(PREFIX))]
        assert events and PASSWORD not in " ".join(events)
        assert PASSWORD not in done.stdout + done.stderr
        logs = [p for p in ray_dir.rglob("*") if p.is_file() and not p.is_socket()]
        assert any("raylet" in p.name for p in logs)  # the session's logs are there to search
        leaked = [str(p) for p in logs if PASSWORD.encode() in p.read_bytes()]
        assert not leaked, leaked
        assert PASSWORD.encode() not in (secure_redis["dir"] / "redis.log").read_bytes()
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_tls_and_acl_are_enforced(tmp_path, secure_redis):
    port, url = secure_redis["port"], secure_redis["url"]
    other_ca = make_certificates(tmp_path, "other")  # a CA that did not sign the server's certificate
    with pytest.raises(ConnectionError, match="certificate verify failed") as error:
        connect(url.replace(str(secure_redis["dir"] / "server-ca.crt"), str(other_ca)))
    assert PASSWORD not in str(error.value) and "rediss://***@127.0.0.1" in str(error.value)
    with pytest.raises(ConnectionError, match="refused us") as error:
        connect(url.replace(PASSWORD, "wrong"))
    assert "wrong" not in str(error.value)
    with pytest.raises(ConnectionError):
        connect(f"redis://127.0.0.1:{port}/0")  # plain text on the TLS port: no answer
    client = connect(url)
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.xadd(events_key("elsewhere"), {"type": "x"})  # the ACL keeps this user to `sec:*`
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.config_set("appendonly", "no")  # -@dangerous


class Exploit:
    """Unpickling this runs a shell command."""
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


HOSTILE = {
    "pickle": lambda cmd: pickle.dumps(Exploit(cmd), protocol=0).decode("latin-1"),
    "base64 pickle": lambda cmd: base64.b64encode(pickle.dumps(Exploit(cmd))).decode("ascii"),
    "python expression": lambda cmd: f"__import__('os').system({cmd!r})",
    "yaml tag": lambda cmd: f"!!python/object/apply:os.system [{cmd!r}]",
    "extra field": lambda cmd: json.dumps({"op": "stop", "eval": f"__import__('os').system({cmd!r})"}),
    "nested extra field": lambda cmd: json.dumps({"op": "add", "source": {"id": "x", "url": "x.mp4",
                                                                          "__reduce__": cmd}}),
}


@pytest.mark.parametrize("kind", HOSTILE)
def test_control_messages_are_json_and_schema_only(tmp_path, redis_client, ray_session, tiny_model, kind):
    marker = tmp_path / "marker"
    raw = HOSTILE[kind](f"touch {marker}")
    with pytest.raises(ValueError):
        ControlMessage.validate_json(raw)
    sink = RedisSink(redis_client, f"hostile-control-{kind.replace(' ', '-')}")
    job = Job(PipelineConfig.model_validate({"model": {"path": str(tiny_model)}}), sink)
    job._on_control(raw)  # what the loop does with each entry of the control stream
    [(_, fields)] = redis_client.xrange(sink.events_key)
    assert fields["type"] == "error" and "invalid control message" in json.loads(fields["json"])["message"]
    assert not marker.exists() and not job.stopping and not job.sources


def test_an_invalid_control_message_is_logged_without_its_password(redis_client, ray_session, tiny_model):
    # Readers of the events stream may not read the control stream (docs/security.md): an invalid message quoted
    # into an `error` event must not carry a camera password there.
    raw = json.dumps({"op": "add", "source": {"id": "cam7", "url": "rtsp://admin:hunter2@10.0.0.7/s", "fps": -1}})
    sink = RedisSink(redis_client, "hostile-control-password")
    job = Job(PipelineConfig.model_validate({"model": {"path": str(tiny_model)}}), sink)
    job._on_control(raw)
    [(_, fields)] = redis_client.xrange(sink.events_key)
    event = json.loads(fields["json"])
    assert fields["type"] == "error" and "10.0.0.7" in event["details"]["raw"]
    assert "hunter2" not in fields["json"]


def test_config_values_from_the_environment_are_not_constructed(tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(ConfigError):
        load_config(env={"CDETR_KEEP_RUNNING": f"!!python/object/apply:os.system ['touch {marker}']"})
    assert not marker.exists()


def test_a_hostile_redis_entry_is_only_parsed_as_json(redis_client):
    redis_client.xadd(frames_key("evil", "cam"), {"type": "frame", "json": "cos\nsystem\n(S'true'\ntR."}, id="1-0")
    with pytest.raises(ValueError, match="Invalid JSON"):
        next(iter(Subscriber(redis_client, "cam", "evil")))


def test_no_pickle_or_eval_in_the_pipeline():
    """What the pipeline reads from outside goes through JSON / pydantic / yaml.safe_load only."""
    forbidden_modules = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}
    forbidden_calls = {"eval", "exec", "compile", "__import__"}
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & forbidden_modules, path
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in forbidden_modules, path
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in forbidden_calls, (path, node.lineno)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "yaml":
                assert node.attr in ("safe_load", "safe_dump", "YAMLError"), (path, node.lineno)


def test_credentials_are_redacted_from_messages():
    assert redact("can't open 'rtsp://admin:hunter2@cam/live' (timeout)") == "can't open 'rtsp://***@cam/live' " \
                                                                              "(timeout)"
    with pytest.raises(ConfigError) as error:
        load_config(env={}, overrides={"redis": {"url": f"http://user:{PASSWORD}@redis:6379"}})
    assert PASSWORD not in str(error.value) and "http://***@redis" in str(error.value)


def test_cdetr_run_with_a_wrong_password_says_so_without_it(tmp_path, secure_redis, tiny_model, capsys):
    video = encode_video(tmp_path / "v.mp4", 2, (64, 48))
    wrong = secure_redis["url"].replace(PASSWORD, "not-the-pw-41d2")
    assert main(["run", str(video), "--model", str(tiny_model), "--redis-url", wrong]) == 1
    out = capsys.readouterr()
    assert "refused us" in out.err and "not-the-pw-41d2" not in out.out + out.err
