"""Helpers the tests share (imported as `helpers`; fixtures stay in conftest.py): free loopback ports, PyAV-encoded
test videos, polling with a deadline, `cdetr detect` on one still."""
import socket
import time
from pathlib import Path

import numpy as np

# The tiny model's input size: frames are scaled to at most 96 px on the long side.
TINY_MODEL_SIZE = {"shortest_edge": 64, "longest_edge": 96}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
