"""HTTP sources: a live HLS playlist (an ffmpeg writer, served by http.server) is a live source that reconnects,
with no hang when its writer dies; a finished (VOD) playlist and an HTTP file are read to their end, once."""
import subprocess
import time
from pathlib import Path

import pytest

from helpers import encode_video, wait_for
from pipeline.config import DecoderConfig, SourceConfig
from pipeline.decoder import StreamDecoder

SIZE = {"shortest_edge": 32, "longest_edge": 48}
LIVE = DecoderConfig(open_timeout_s=3, read_timeout_s=1.5, reconnect_initial_s=0.2, reconnect_max_s=0.5,
                     watchdog_s=3, buffer_size=8)


def hls_writer(directory: Path) -> subprocess.Popen:
    """A live HLS stream as a packager writes it: 1 s segments, the newest 4 in the playlist, older ones deleted."""
    return subprocess.Popen(["ffmpeg", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
                             "testsrc2=size=320x180:rate=10", "-c:v", "libx264", "-preset", "ultrafast", "-g", "10",
                             "-bf", "0", "-f", "hls", "-hls_time", "1", "-hls_list_size", "4", "-hls_flags",
                             "delete_segments", str(directory / "live.m3u8")])


def read_until(decoder: StreamDecoder, condition, timeout: float = 20.0) -> tuple[list, list]:
    """Events and frame metadata read until `condition(events, frames)` holds."""
    events, frames = [], []
    deadline = time.monotonic() + timeout
    while not condition(events, frames):
        assert time.monotonic() < deadline, f"timed out; events: {[(e.type, e.message) for e in events]}"
        info, _ = decoder.read(4, wait_s=0.2)
        events += info.events
        frames += info.frames
    return events, frames


def types(events) -> list[str]:
    return [e.type for e in events]


def test_a_live_playlist_is_live_and_a_dead_writer_ends_in_reconnecting(http_server):
    directory = http_server["dir"] / "live"
    directory.mkdir()
    writer = hls_writer(directory)
    source = SourceConfig(id="hls", url=f"{http_server['url']}/live/live.m3u8")
    assert source.live and source.backpressure == "drop_oldest"
    decoder = None
    try:
        wait_for(lambda: (directory / "live.m3u8").exists(), 20, "the first segment")
        decoder = StreamDecoder(source, SIZE, LIVE)
        events, frames = read_until(decoder, lambda events, frames: len(frames) >= 10)
        assert types(events) == ["started"] and events[0].details["duration_s"] is None
        writer.kill()  # SIGKILL: the playlist stays, without #EXT-X-ENDLIST, and never changes again
        writer.wait()
        killed = time.monotonic()
        events, _ = read_until(decoder, lambda events, frames: "reconnecting" in types(events))
        print(f"reconnecting {time.monotonic() - killed:.1f} s after the writer died")
        # It keeps trying (the stale playlist opens, plays its last segments, stalls again) rather than hang.
        events, stale = read_until(decoder, lambda events, frames: types(events).count("reconnecting") >= 2,
                                   timeout=30)
        print(f"while the writer was dead: {types(events)}, {len(stale)} frames")
        writer = hls_writer(directory)
        events, more = read_until(decoder, lambda events, frames: "recovered" in types(events) and len(frames) >= 10,
                                  timeout=30)
        assert more[0].frame_index > frames[-1].frame_index  # live numbering goes on
    finally:
        writer.kill()
        if decoder is not None:
            decoder.stop()


@pytest.mark.parametrize("kind", ["vod.m3u8", "file.mp4"])
def test_a_finished_playlist_and_an_http_file_are_read_to_their_end(http_server, tmp_path, kind):
    directory = http_server["dir"] / kind.replace(".", "-")
    directory.mkdir()
    video = encode_video(tmp_path / "v.ts", 30, (96, 64), fps=10)
    if kind == "file.mp4":
        encode_video(directory / kind, 30, (96, 64), fps=10)
    else:
        subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(video), "-c", "copy", "-f", "hls", "-hls_time",
                        "1", "-hls_playlist_type", "vod", str(directory / kind)], check=True)
    source = SourceConfig(id="http", url=f"{http_server['url']}/{directory.name}/{kind}")
    assert source.live == kind.endswith(".m3u8")
    decoder = StreamDecoder(source, SIZE, LIVE.model_copy(update={"buffer_size": 64}))
    try:
        events, frames = [], []
        info = None
        while info is None or not info.finished:
            info, _ = decoder.read(8, wait_s=1.0)
            events += info.events
            frames += info.frames
        assert types(events) == ["started"] and [m.frame_index for m in frames] == list(range(30))
    finally:
        decoder.stop()
