"""Shared fixtures: a real redis-server on a free loopback port, one local Ray per session, PyAV-encoded videos,
and a tiny random-weights detector saved with `save_pretrained`."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.redis_server import is_listening, start_redis_server

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray cluster needs no auth tokens
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The tiny model's input size: frames are scaled to at most 96 px on the long side.
TINY_MODEL_SIZE = {"shortest_edge": 64, "longest_edge": 96}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> dict:
    """A redis-server on a free loopback port, in memory only: {"url", "port"}."""
    port = free_port()
    process = start_redis_server(port, tmp_path_factory.mktemp("redis"))
    yield {"url": f"redis://127.0.0.1:{port}/0", "port": port}
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_client(redis_server):
    from pipeline.sink import connect

    return connect(redis_server["url"])


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from pipeline.demo import save_random_tiny_model

    return save_random_tiny_model(tmp_path_factory.mktemp("tiny-model"), TINY_MODEL_SIZE)


@pytest.fixture(scope="session")
def tiny_panoptic_model(tmp_path_factory) -> Path:
    from pipeline.demo import save_random_tiny_model

    return save_random_tiny_model(tmp_path_factory.mktemp("tiny-panoptic"), TINY_MODEL_SIZE, panoptic=True)


def encode_video(path: Path, frames: int, size: tuple[int, int], fps: int = 10, codec: str = "libx264",
                 options: dict | None = None, pix_fmt: str = "yuv420p") -> Path:
    """A video of a white square moving over a coloured background; the container comes from the suffix
    (`.mp4` with faststart, `.ts` for MPEG-TS)."""
    import av

    width, height = size
    with av.open(str(path), mode="w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for i in range(frames):
            image = np.full((height, width, 3), (40, 90 + 5 * (i % 20), 160), np.uint8)
            x = (i * 7) % max(1, width - height // 3)
            image[height // 3: 2 * height // 3, x: x + height // 3] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def wait_for(condition, timeout: float = 120.0, what: str = "condition", interval: float = 0.1) -> None:
    """Poll `condition()` until it is true; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)


def detect_still(tmp_path: Path, pixels: np.ndarray, model: Path, *flags: str):
    """`cdetr detect` on one image written from `pixels`, threshold 0 (an untrained model still reports
    detections), output under `tmp_path/out`: the image's FrameResult."""
    from PIL import Image

    from pipeline.cli import main
    from pipeline.schema import FrameResult

    image, out = tmp_path / "still.png", tmp_path / "out"
    Image.fromarray(pixels).save(image)
    assert main(["detect", str(image), "--model", str(model), *flags, "--threshold", "0", "--out", str(out)]) == 0
    return FrameResult.model_validate_json((out / "still.json").read_text())


def count_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    """`python -m http.server` serving a directory on loopback: {"dir", "url"}."""
    directory = tmp_path_factory.mktemp("http")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                "--directory", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: is_listening("127.0.0.1", port), 10, "http.server to listen", 0.05)
    yield {"dir": directory, "url": f"http://127.0.0.1:{port}"}
    process.terminate()
    process.wait(timeout=10)
