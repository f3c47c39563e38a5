"""CPU per stream of one StreamDecoder on 1080p30 (or `--size 720p`) H.264: the sizing input for decoder nodes (deploy/README.md).

Compared in one run, on the same file:
  baseline  PyAV decoding the file with the decoder's threading and no conversion
  decoder   pipeline.decoder.StreamDecoder (decode, swscale to model size, buffering), drained by read() as the
            runner drains it, without Ray
Each reports CPU-seconds per second of video (= cores one 30 fps stream keeps busy) and the decoder's ratio to
the baseline, i.e. what the resize, the RGB conversion and the buffering add.

The clip is a moving random texture with per-frame noise, encoded at about 8 Mbit/s like a 1080p30 camera, rather
than the shapes video: flat colours decode much faster than camera footage, and sizing should err on the
expensive side.

    python bench/bench_decoder.py [--seconds 6] [--repeats 3] [--size 1080p|720p]
"""
import argparse
import json
import platform
import resource
import tempfile
from pathlib import Path

import av
import numpy as np

from pipeline.config import DecoderConfig, SourceConfig
from pipeline.decoder import StreamDecoder

SIZES = {"1080p": (1920, 1080), "720p": (1280, 720)}  # width, height
FPS = 30
MODEL_SIZE = {"shortest_edge": 800, "longest_edge": 1333}  # the processor's default: 1080p becomes 750x1333


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads: PyAV's decode threads included
    return usage.ru_utime + usage.ru_stime


def write_clip(path: Path, seconds: int, size: tuple[int, int]) -> None:
    width, height = size
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.int16).repeat(8, axis=0).repeat(8, axis=1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"preset": "veryfast"})
        # 8 Mbit/s at 1080p, scaled by the pixel count (a 720p camera: about 3.6 Mbit/s).
        bit_rate = 8_000_000 * width * height // (1920 * 1080)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = width, height, "yuv420p", bit_rate
        for i in range(seconds * FPS):
            # Motion the encoder can predict, plus sensor-like noise it cannot: camera-like bitrate.
            image = np.roll(texture, 6 * i, axis=1) + rng.integers(-8, 9, texture.shape, dtype=np.int16)
            frame = av.VideoFrame.from_ndarray(np.clip(image, 0, 255).astype(np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def decode_only(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # what StreamDecoder uses for files
        return sum(1 for _ in container.decode(stream))


def stream_decoder(path: Path) -> int:
    decoder = StreamDecoder(SourceConfig(id="bench", url=str(path)), MODEL_SIZE, DecoderConfig())
    frames = 0
    while True:
        info, chunk = decoder.read(8)
        frames += len(info.frames)
        if info.finished:
            return frames


def cores_per_stream(function, path: Path, repeats: int) -> dict:
    function(path)  # warm-up: codec and swscale initialization
    best = float("inf")
    for _ in range(repeats):
        start = cpu_seconds()
        frames = function(path)
        best = min(best, cpu_seconds() - start)
    return {"frames": frames, "cpu_s": round(best, 3), "cores_per_stream": round(best / (frames / FPS), 3),
            "frames_per_core_s": round(frames / best, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", choices=list(SIZES), default="1080p")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        write_clip(path, args.seconds, SIZES[args.size])
        mbit_per_s = path.stat().st_size * 8 / 1e6 / args.seconds
        baseline = cores_per_stream(decode_only, path, args.repeats)
        decoder = cores_per_stream(stream_decoder, path, args.repeats)
    print(json.dumps({
        "bench": "decoder_cpu", "video": f"{args.size}{FPS} H.264, {args.seconds} s, {mbit_per_s:.1f} Mbit/s",
        "model_size": "750x1333", "cpu": platform.processor() or platform.machine(), "pyav": av.__version__,
        "baseline": baseline, "decoder": decoder,
        "ratio_vs_baseline": round(decoder["cpu_s"] / baseline["cpu_s"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
