"""The source allow-list: which URLs are accepted, and which of them are live."""
import pytest

from pipeline.sources import parse_source_url


@pytest.mark.parametrize("url, scheme, live", [
    ("/data/video.mp4", "file", False), ("file:///data/video.mp4", "file", False),
    ("https://host/v.mp4", "https", False), ("rtsp://cam/stream", "rtsp", True),
    ("udp://239.0.0.1:1234", "udp", True), ("tcp://127.0.0.1:9000", "tcp", True),
])
def test_source_urls(url, scheme, live):
    source = parse_source_url(url)
    assert (source.scheme, source.live) == (scheme, live)


@pytest.mark.parametrize("url", ["ftp://host/v.mp4", "pipe:0", "rtsp:///nohost", ""])
def test_disallowed_source_urls(url):
    with pytest.raises(ValueError):
        parse_source_url(url)
