"""The source allow-list: which URLs are accepted, which of them are live, and how each kind is opened (RTSP
transports, TLS verification)."""
import pytest

from pipeline.config import ConfigError, validate_config
from pipeline.sources import open_options, parse_source_url, transports


@pytest.mark.parametrize("url, scheme, live", [
    ("/data/video.mp4", "file", False), ("file:///data/video.mp4", "file", False),
    ("https://host/v.mp4", "https", False), ("rtsp://cam/stream", "rtsp", True),
    ("udp://239.0.0.1:1234", "udp", True), ("tcp://127.0.0.1:9000", "tcp", True),
    # HLS: a playlist is live (a finished one ends like a file, in the decoder); a segment or a query is not one.
    ("https://cdn/live/index.m3u8", "https", True), ("http://cdn/live/INDEX.M3U8?token=x", "http", True),
    ("http://cdn/live/segment0.ts", "http", False), ("/data/index.m3u8", "file", False),
])
def test_source_urls(url, scheme, live):
    source = parse_source_url(url)
    assert (source.scheme, source.live) == (scheme, live)


@pytest.mark.parametrize("url", ["ftp://host/v.mp4", "pipe:0", "rtsp:///nohost", ""])
def test_disallowed_source_urls(url):
    with pytest.raises(ValueError):
        parse_source_url(url)


@pytest.mark.parametrize("url, setting, expected", [
    ("rtsp://cam/s", "auto", ("tcp", "udp")),  # TCP first, UDP when the camera offers only that
    ("rtsp://cam/s", "udp", ("udp",)), ("rtsp://cam/s", "tcp", ("tcp",)),
    ("rtsps://cam/s", "auto", ("tcp",)),  # the media travel in the TLS connection
    ("udp://239.0.0.1:1234", "auto", (None,)), ("/data/v.mp4", "auto", (None,)),
])
def test_rtsp_transports(url, setting, expected):
    source = parse_source_url(url)
    assert transports(source, setting) == expected
    for transport in expected:
        assert open_options(source, transport).get("rtsp_transport") == transport


def test_tls_sources_verify_the_server_certificate():
    for url in ("https://host/v.mp4", "rtsps://cam/s"):
        assert open_options(parse_source_url(url))["tls_verify"] == "1"
        assert open_options(parse_source_url(url), ca_file="/etc/cam-ca.pem")["ca_file"] == "/etc/cam-ca.pem"
    assert "tls_verify" not in open_options(parse_source_url("http://host/v.mp4"))


@pytest.mark.parametrize("source, field", [
    ({"url": "udp://239.0.0.1:1234", "transport": "tcp"}, "transport"),
    ({"url": "rtsps://cam/s", "transport": "udp"}, "transport"),
    ({"url": "rtsp://cam/s", "ca_file": "/ca.pem"}, "ca_file"),
    ({"url": "rtsp://cam/s", "transport": "quic"}, "transport"),
])
def test_settings_that_do_not_apply_to_the_url_are_refused(source, field):
    with pytest.raises(ConfigError, match=field):
        validate_config({"sources": [{"id": "cam", **source}]})
    assert validate_config({"sources": [{"id": "cam", "url": "rtsp://cam/s", "transport": "udp"}]})
