"""Helpers the tests share (imported as `helpers`; fixtures stay in conftest.py): free loopback ports, PyAV-encoded
test videos, polling with a deadline, `cdetr detect` on one still."""
import socket
import subprocess
import threading
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


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path, name: str) -> Path:
    """A CA, and a server certificate for 127.0.0.1 signed by it; returns the CA certificate."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name} test CA",
            "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.crt", cwd=directory)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", cwd=directory)
    (directory / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{name}-ca.crt", "-CAkey", f"{name}-ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", f"{name}.crt", cwd=directory)
    return directory / f"{name}-ca.crt"


def run_in_thread(job) -> tuple[threading.Thread, dict]:
    """Start `job.process()` in a daemon thread; the returned dict receives the job's summary when it ends."""
    summary: dict = {}
    thread = threading.Thread(target=lambda: summary.update(job.process()), daemon=True)
    thread.start()
    return thread, summary


def stop_if_running(job, thread: threading.Thread, timeout: float = 60.0) -> None:
    """After a failed assertion, stop a job that still runs and wait for it (a test's `finally`)."""
    if thread.is_alive():
        job.stop()
        thread.join(timeout=timeout)
