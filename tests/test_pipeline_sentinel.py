"""Redis Sentinel (issue 17): `redis+sentinel://` URLs, and failovers on loopback with a primary, a replica and three
sentinels, all real redis-server processes (tests/redis_sentinel.py). The primary is killed with SIGKILL while a
file is being written, after the replica missed its last writes; the job goes on against the promoted replica and
ends with every frame exactly once. The time without writes is printed.
"""
import json
import signal
import time

import pytest
import redis
from redis_sentinel import PASSWORD, SERVICE, Tls, start_sentinel_group

from helpers import count_frames, encode_video, make_certificates, run_in_thread, wait_for
from pipeline.cli import main
from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.redis_url import parse_sentinel_url
from pipeline.runner import Job
from pipeline.sink import RedisSink, connect
from pipeline.sources import redact

PREFIX = "sentinel"


@pytest.fixture
def sentinel_group(tmp_path):
    group = start_sentinel_group(tmp_path / "redis")
    yield group
    group.stop()


def test_sentinel_urls_name_the_sentinels_the_service_and_the_options():
    url = parse_sentinel_url("redis+sentinel://cdetr:p%40ss@10.0.0.1:26380,[::1],sentinel-2/results/3")
    assert url.sentinels == [("10.0.0.1", 26380), ("::1", 26379), ("sentinel-2", 26379)]
    assert url.service == "results"
    assert url.options == {"username": "cdetr", "password": "p@ss", "db": 3}
    tls = parse_sentinel_url("rediss+sentinel://s1/cdetr?ssl_ca_certs=/etc/ca.pem")
    assert tls.options == {"ssl": True, "ssl_ca_certs": "/etc/ca.pem"} and tls.sentinels == [("s1", 26379)]

    config = load_config(env={"CDETR_REDIS__URL": "redis+sentinel://:secret@s1:26379,s2:26379/cdetr/0"})
    assert config.redis.url.startswith("redis+sentinel://")
    for bad in ("redis+sentinel://:secret@s1:26379", "redis+sentinel://:secret@s1:26379,/cdetr",
                "redis+sentinel://:secret@s1:port/cdetr", "redis+sentinel://:secret@s1/cdetr/zero",
                "sentinel://:secret@s1/cdetr"):
        with pytest.raises(ConfigError, match="redis.url") as refused:
            load_config(env={"CDETR_REDIS__URL": bad})
        assert "secret" not in str(refused.value)
    assert redact("redis+sentinel://cdetr:secret@s1:26379,s2:26379/cdetr/0") == \
        "redis+sentinel://***@s1:26379,s2:26379/cdetr/0"


def test_rediss_sentinel_urls_speak_tls_to_the_sentinels_and_the_nodes(tmp_path):
    """Every process listens on TLS only, so a client that reaches the primary spoke TLS to both."""
    ca = make_certificates(tmp_path, "server")
    group = start_sentinel_group(tmp_path / "redis", Tls(tmp_path / "server.crt", tmp_path / "server.key", ca))
    try:
        client = connect(group.url)
        client.set("over", "tls")
        assert group.client(group.primary_port()).get("over") == "tls"
        with pytest.raises(redis.ConnectionError):  # no plain text on a sentinel's port
            redis.Redis(port=next(iter(group.sentinels)), password=PASSWORD, socket_timeout=2).ping()
    finally:
        group.stop()


def test_a_client_from_connect_follows_a_failover(sentinel_group, capsys):
    client = connect(sentinel_group.url)
    client.set("before", "1")
    killed = sentinel_group.kill_primary()
    down = time.monotonic()
    attempts = 0
    while True:  # what the sink's retry loop does, bare: the next write goes to whichever node is primary then
        try:
            client.set("after", "1")
            break
        except redis.ConnectionError:  # refused by the dead primary, then MasterNotFoundError until one is promoted
            attempts += 1
            assert time.monotonic() - down < 60, "no primary after 60 s"
            time.sleep(0.05)
    gap = time.monotonic() - down
    promoted = sentinel_group.wait_for_failover()
    assert promoted != killed
    node = sentinel_group.client(promoted)
    assert node.info("replication")["role"] == "master"
    assert node.get("before") == "1" and node.get("after") == "1"  # replicated before the kill, written after

    # The other subcommands connect the same way.
    assert main(["submit", "http://cameras.example/lobby.mp4", "--source-id", "lobby",
                 "--redis-url", sentinel_group.url, "--prefix", PREFIX]) == 0
    [(_, fields)] = node.xrange(f"{PREFIX}:control")
    assert json.loads(fields["json"])["source"]["id"] == "lobby"
    assert PASSWORD not in capsys.readouterr().err
    print(f"\nplain client: first write {gap:.2f} s after the primary was killed ({attempts} failed tries)")


def test_a_client_follows_a_primary_demoted_by_a_manual_failover(sentinel_group):
    """`SENTINEL FAILOVER` promotes the replica while the primary still runs; seconds later the sentinels make the
    old primary a replica and close its clients' connections, and the client reconnects through the sentinels to
    the new primary (a client that still reached the demoted node would get READONLY, on which redis-py asks the
    sentinels again). Writes the old primary acknowledged in between are lost; the count is printed."""
    client = connect(sentinel_group.url)
    old = sentinel_group.primary_port()
    old_node = sentinel_group.client(old)
    assert sentinel_group.client(next(iter(sentinel_group.sentinels))).sentinel_failover(SERVICE)
    acknowledged, started = 0, time.monotonic()
    while old_node.info("replication")["role"] == "master":
        assert time.monotonic() - started < 60, "the old primary was not demoted within 60 s"
        try:
            client.xadd("writes", {"n": str(acknowledged)})
            acknowledged += 1
        except redis.ConnectionError:
            time.sleep(0.05)
    demoted = time.monotonic() - started
    client.xadd("writes", {"n": "after"})
    new = sentinel_group.wait_for_failover()
    assert new != old
    new_node = sentinel_group.client(new)
    assert new_node.xrevrange("writes", count=1)[0][1] == {"n": "after"}
    lost = acknowledged - (new_node.xlen("writes") - 1)
    print(f"\nmanual failover: old primary demoted after {demoted:.2f} s; {lost} of {acknowledged} acknowledged "
          "writes lost")


def test_a_sentinel_failover_mid_run_ends_with_every_frame_exactly_once(tmp_path, sentinel_group, ray_session,
                                                                       tiny_model, capsys):
    """The replica is cut off for a few frames before the primary is killed (frozen with SIGSTOP, its replication
    link closed by the primary), so the replica promoted in its place lacks the last frames the primary
    acknowledged, as asynchronous replication allows; the job writes them again (a `lost` event) and the stream
    ends with every frame exactly once."""
    frames = 150
    video = encode_video(tmp_path / "file.mp4", frames, (64, 48))
    config = PipelineConfig.model_validate({
        "sources": [{"id": "file", "url": str(video)}],
        "batching": {"max_batch_size": 4, "max_in_flight_per_source": 8},
        "decoder": {"num_cpus": 0.1, "buffer_size": 8}, "model": {"path": str(tiny_model)},
        "redis": {"url": sentinel_group.url, "prefix": PREFIX, "retry_initial_s": 0.05, "retry_max_s": 0.5}})
    sink = RedisSink.from_config(connect(config.redis.url), config.redis)  # as `cdetr run` connects (run_job)
    job = Job(config, sink)
    thread, summary = run_in_thread(job)
    key = sink.frames_key("file")
    wait_for(lambda: sink.client.xlen(key) >= 30)
    primary = sentinel_group.client(sentinel_group.primary_port())
    [replica] = [process for port, process in sentinel_group.nodes.items() if port != sentinel_group.primary_port()]
    # Frozen, the replica cannot reconnect; what the primary had sent before the kill still arrives (the socket's
    # buffer), nothing after. About a second: the sentinels still count it as a candidate for promotion.
    replica.send_signal(signal.SIGSTOP)
    try:
        primary.client_kill_filter(_type="replica")
        acknowledged = sink.client.xlen(key)
        wait_for(lambda: sink.client.xlen(key) >= acknowledged + 8, 30, "frames the replica does not have")
        acknowledged = sink.client.xlen(key)
        killed = sentinel_group.kill_primary()  # mid-run: frames in flight, writes going on
    finally:
        replica.send_signal(signal.SIGCONT)
    down = time.monotonic()
    promoted = sentinel_group.wait_for_failover()
    promoted_after = time.monotonic() - down
    thread.join(timeout=300)
    assert not thread.is_alive() and summary["file"]["status"] == "eos"
    assert sink.outages, "the sink never saw the primary go"

    # Read from the promoted replica itself: the job finished there.
    node = sentinel_group.client(promoted)
    assert promoted != killed and node.info("replication")["role"] == "master"
    entries = node.xrange(key)
    assert [json.loads(f["json"])["frame_index"] for _, f in entries[:-1]] == list(range(frames))
    assert [f["type"] for _, f in entries].count("frame") == frames and entries[-1][1]["type"] == "eos"
    lost = [e for e in (json.loads(f["json"]) for _, f in node.xrange(sink.events_key)) if e["type"] == "lost"]
    assert lost and all(e["details"]["rewritten"] for e in lost)

    # `cdetr subscribe` and `cdetr render` read the stream through the sentinels too.
    capsys.readouterr()
    assert main(["subscribe", "file", "--redis-url", sentinel_group.url, "--prefix", PREFIX]) == 0
    assert main(["render", "file", str(tmp_path / "annotated.mp4"), "--video", str(video),
                 "--redis-url", sentinel_group.url, "--prefix", PREFIX]) == 0
    output = capsys.readouterr()
    assert [json.loads(line)["frame_index"] for line in output.out.splitlines() if line.startswith("{")] == \
        list(range(frames))
    assert count_frames(tmp_path / "annotated.mp4") == frames
    assert PASSWORD not in output.out + output.err
    print(f"\nsentinel failover: promoted {promoted_after:.2f} s after the kill; the sink went "
          f"{max(sink.outages):.2f} s without a successful write ({len(sink.outages)} outage(s)); "
          f"{sum(e['details']['frames'] for e in lost)} of the {acknowledged} frames acknowledged before the kill "
          "were not on the replica and were written again")
