"""StreamDecoder on its own (a plain object here; the runner makes it a Ray actor): model-sized frames, YUV
output, backpressure policies, fps sampling, and a live MPEG-TS/UDP source (ffmpeg) that stops and comes back."""
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import encode_video, free_port
from model.image_size import get_resize_output_size
from model.yuv import yuv420_to_rgb
from pipeline.config import DecoderConfig, SourceConfig
from pipeline.decoder import StreamDecoder
from pipeline.frames import FrameFormat
from pipeline.worker import to_rgb

SIZE = {"shortest_edge": 32, "longest_edge": 48}
LIVE = DecoderConfig(open_timeout_s=2, read_timeout_s=1, reconnect_initial_s=0.2, reconnect_max_s=0.5,
                     watchdog_s=2, buffer_size=8)


def read_all(decoder: StreamDecoder, max_frames: int = 4, pause_s: float = 0.0):
    """Frame metadata, arrays and events of every chunk, and the last chunk's info (`formats`: of the chunks
    with frames)."""
    metas, arrays, events, formats = [], [], [], set()
    while True:
        info, frames = decoder.read(max_frames, wait_s=1.0)
        metas += info.frames
        arrays += list(frames)
        events += info.events
        formats |= {info.format} if info.frames else set()
        if info.finished:
            info.formats = formats
            return metas, arrays, events, info
        time.sleep(pause_s)


def test_file_frames_are_model_sized_and_never_dropped(tmp_path):
    video = encode_video(tmp_path / "v.mp4", 30, (160, 90))
    decoder = StreamDecoder(SourceConfig(id="v", url=str(video)), SIZE, DecoderConfig(buffer_size=3))
    metas, arrays, events, info = read_all(decoder, max_frames=2, pause_s=0.01)  # a slow consumer
    assert [m.frame_index for m in metas] == list(range(30)) and info.dropped == 0
    height, width = get_resize_output_size(90, 160, SIZE)
    assert {a.shape for a in arrays} == {(height, width, 3)} and (height, width) == (27, 48)
    assert {(m.width, m.height) for m in metas} == {(160, 90)}  # metadata keeps the source size
    assert [e.type for e in events] == ["started"] and events[0].details["frames"] == 30
    assert info.formats == {FrameFormat()}  # rgb24 by default (CPU workers)


@pytest.mark.parametrize("size, planes", [
    # Source no bigger than twice the model input: the decoder's planes as they are, 1.5 bytes a pixel.
    ({"shortest_edge": 64, "longest_edge": 120}, (135, 160)),
    # A much larger source: scaled to model size (27x48) by swscale, rounded down to even sizes for 4:2:0.
    (SIZE, (39, 48)),
])
def test_yuv420_output_sends_the_planes_and_converts_like_rgb(tmp_path, size, planes):
    video = encode_video(tmp_path / "v.mp4", 6, (160, 90))
    source = SourceConfig(id="v", url=str(video))
    metas, arrays, _, info = read_all(StreamDecoder(source, size, DecoderConfig(output="yuv420")))
    assert info.formats == {FrameFormat("yuv420p", "bt601", full_range=False)} and len(metas) == 6
    assert {a.shape for a in arrays} == {planes} and {(m.width, m.height) for m in metas} == {(160, 90)}
    # Converted on the worker's side, the native planes are the RGB frames the rgb output gives at that size.
    if planes == (135, 160):
        rgb = read_all(StreamDecoder(source, {"height": 90, "width": 160}, DecoderConfig(output="rgb")))[1]
        converted = yuv420_to_rgb(torch.from_numpy(np.stack(arrays))).numpy().astype(int)
        assert np.abs(converted - np.stack(rgb)).max() <= 3


def test_yuv420_output_converts_other_layouts_to_420_and_keeps_the_range(tmp_path):
    """MJPEG decodes to 4:2:2 tagged full range (yuvj422p): swscale makes yuv420p planes of it, still full range,
    and the worker's conversion gives the rgb output's frame, but for the halved chroma detail."""
    video = encode_video(tmp_path / "v.avi", 4, (96, 64), codec="mjpeg", pix_fmt="yuvj422p")
    source, size = SourceConfig(id="v", url=str(video)), {"height": 64, "width": 96}
    _, planes, _, info = read_all(StreamDecoder(source, size, DecoderConfig(output="yuv420")))
    assert info.formats == {FrameFormat("yuv420p", "bt601", full_range=True)}
    assert {p.shape for p in planes} == {(96, 96)}
    rgb = np.stack(read_all(StreamDecoder(source, size, DecoderConfig(output="rgb")))[1]).astype(int)
    [fmt] = info.formats
    difference = np.abs(to_rgb(torch.from_numpy(np.stack(planes)), fmt).numpy().astype(int) - rgb)
    assert difference.mean() < 2 and np.percentile(difference, 90) <= 3


def test_fps_sampling_and_resume(tmp_path):
    video = encode_video(tmp_path / "v.mp4", 30, (64, 48), fps=10)
    sampled = StreamDecoder(SourceConfig(id="v", url=str(video), fps=4), SIZE, DecoderConfig())
    # 4 fps on a 10 fps grid: t = 0, 0.3 (first >= 0.25), 0.5, 0.8 (>= 0.75), 1.0, ...
    assert [m.frame_index for m in read_all(sampled)[0]] == [0, 3, 5, 8, 10, 13, 15, 18, 20, 23, 25, 28]
    resumed = StreamDecoder(SourceConfig(id="v", url=str(video)), SIZE, DecoderConfig(), start_index=25)
    assert [m.frame_index for m in read_all(resumed)[0]] == [25, 26, 27, 28, 29]


def test_bad_file_reports_an_error_and_finishes(tmp_path):
    decoder = StreamDecoder(SourceConfig(id="x", url=str(tmp_path / "missing.mp4")), SIZE, DecoderConfig())
    metas, _, events, _ = read_all(decoder)
    assert not metas and [e.type for e in events] == ["error"] and "missing.mp4" in events[0].message


def stream_udp(video, port: int) -> subprocess.Popen:
    return subprocess.Popen(["ffmpeg", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(video),
                             "-c", "copy", "-f", "mpegts", f"udp://127.0.0.1:{port}?pkt_size=1316"])


def wait_for_event(decoder: StreamDecoder, kind: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    seen, metas = [], []
    while time.monotonic() < deadline:
        info, _ = decoder.read(4, wait_s=0.5)
        metas += info.frames
        seen += info.events
        if any(e.type == kind for e in seen):
            return seen, metas, info
    pytest.fail(f"no {kind!r} event within {timeout} s; saw {[e.type for e in seen]}")


def test_live_udp_source_reconnects_and_drops_oldest(tmp_path):
    video = encode_video(tmp_path / "live.ts", 50, (96, 64), fps=25)
    port = free_port()
    decoder = StreamDecoder(SourceConfig(id="live", url=f"udp://127.0.0.1:{port}"), SIZE, LIVE, start_index=100)
    sender = stream_udp(video, port)
    try:
        events, metas, _ = wait_for_event(decoder, "started")
        time.sleep(1.5)  # nobody reads: the 8-frame buffer overflows and drops its oldest frames
        info, frames = decoder.read(4, wait_s=0.5)
        assert info.dropped > 0 and len(info.frames) == 4
        newest = [m.frame_index for m in info.frames]
        assert newest == list(range(newest[0], newest[0] + 4)) and newest[0] >= 100  # live: numbering continues
        sender.kill()
        sender.wait()
        events, _, _ = wait_for_event(decoder, "reconnecting")
        assert "timed out" in next(e for e in events if e.type == "reconnecting").message
        sender = stream_udp(video, port)
        _, metas, _ = wait_for_event(decoder, "recovered")
        deadline = time.monotonic() + 10
        while not metas and time.monotonic() < deadline:
            metas += decoder.read(4, wait_s=0.5)[0].frames
        assert metas and metas[0].frame_index > newest[-1]  # IDs keep growing after a reconnect
    finally:
        sender.kill()
        decoder.stop()


def test_live_tcp_source_reports_the_lost_connection(tmp_path):
    video = encode_video(tmp_path / "live.ts", 50, (96, 64), fps=25)
    port = free_port()
    sender = subprocess.Popen(["ffmpeg", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(video),
                               "-c", "copy", "-f", "mpegts", f"tcp://127.0.0.1:{port}?listen=1"])
    # ffmpeg serves one connection, so no probing: until it listens the decoder's own retries are refused.
    decoder = StreamDecoder(SourceConfig(id="tcp", url=f"tcp://127.0.0.1:{port}"), SIZE, LIVE)
    try:
        _, metas, _ = wait_for_event(decoder, "started")
        deadline = time.monotonic() + 10
        while len(metas) < 10 and time.monotonic() < deadline:
            metas += decoder.read(4, wait_s=0.5)[0].frames
        assert len(metas) >= 10
        sender.kill()
        events, _, _ = wait_for_event(decoder, "reconnecting")
        attempts = [e for e in events if e.type == "reconnecting"]
        assert attempts[0].details == {"attempt": 1, "delay_s": LIVE.reconnect_initial_s}
    finally:
        sender.kill()
        decoder.stop()


def test_decoder_module_does_not_import_torch():
    """Decoder actors only need the resize rule; torch would cost ~290 MiB per camera process."""
    code = "import sys, pipeline.decoder; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
