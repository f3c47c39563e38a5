"""CPU per stream of one StreamDecoder on 1080p30 (or `--size 720p`) H.264: the sizing input for decoder nodes
(deploy/README.md).

Compared in one run, on the same file:
  baseline        PyAV decoding the file with the decoder's threading and no conversion
  decoder_rgb     pipeline.decoder.StreamDecoder with `decoder.output: rgb` (decode, swscale to RGB at model size,
                  buffering), drained by read() as the runner drains it, without Ray
  decoder_yuv420  the same with `decoder.output: yuv420` (the decoder's YUV 4:2:0 planes; the GPU workers' default)
Each reports CPU-seconds per second of video (= cores one 30 fps stream keeps busy), frames per core-second, the
bytes a frame puts into the object store, and the decoder's ratio to the baseline, i.e. what the conversion and
the buffering add.

The clip is a moving random texture with per-frame noise, encoded at about 8 Mbit/s like a 1080p30 camera, rather
than the shapes video: flat colours decode much faster than camera footage, and sizing should err on the
expensive side.

    python bench/bench_decoder.py [--seconds 6] [--repeats 3] [--size 1080p|720p] [--short-side 800]
"""
import argparse
import json
import resource
import tempfile
from pathlib import Path

import av
import numpy as np
from machine import cpu_model

from model.image_size import get_resize_output_size
from pipeline.config import DecoderConfig, SourceConfig
from pipeline.decoder import StreamDecoder

SIZES = {"1080p": (1920, 1080), "720p": (1280, 720)}  # width, height
FPS = 30


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


def decode_only(path: Path) -> tuple[int, int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # what StreamDecoder uses for files
        return sum(1 for _ in container.decode(stream)), 0


def stream_decoder(size: dict[str, int], output: str):
    def drain(path: Path) -> tuple[int, int]:
        decoder = StreamDecoder(SourceConfig(id="bench", url=str(path)), size, DecoderConfig(output=output))
        frames = nbytes = 0
        while True:
            info, chunk = decoder.read(8)
            frames, nbytes = frames + len(info.frames), nbytes + chunk.nbytes
            if info.finished:
                return frames, nbytes
    return drain


def cores_per_stream(function, path: Path, repeats: int) -> dict:
    function(path)  # warm-up: codec and swscale initialization
    best = float("inf")
    for _ in range(repeats):
        start = cpu_seconds()
        frames, nbytes = function(path)
        best = min(best, cpu_seconds() - start)
    return {"frames": frames, "cpu_s": round(best, 3), "cores_per_stream": round(best / (frames / FPS), 3),
            "frames_per_core_s": round(frames / best, 1), "bytes_per_frame": nbytes // frames}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", choices=list(SIZES), default="1080p")
    parser.add_argument("--short-side", type=int, default=800,
                        help="model input short side (the long side at most short * 1333 / 800)")
    args = parser.parse_args()
    model_size = {"shortest_edge": args.short_side, "longest_edge": args.short_side * 1333 // 800}
    width, height = SIZES[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        write_clip(path, args.seconds, (width, height))
        mbit_per_s = path.stat().st_size * 8 / 1e6 / args.seconds
        baseline = cores_per_stream(decode_only, path, args.repeats)
        decoders = {f"decoder_{output}": cores_per_stream(stream_decoder(model_size, output), path, args.repeats)
                    for output in ("rgb", "yuv420")}
    model_height, model_width = get_resize_output_size(height, width, model_size)
    print(json.dumps({
        "bench": "decoder_cpu", "video": f"{args.size}{FPS} H.264, {args.seconds} s, {mbit_per_s:.1f} Mbit/s",
        "model_size": f"{model_height}x{model_width}", "cpu": cpu_model(),
        "pyav": av.__version__, "baseline": baseline, **decoders,
        "ratio_vs_baseline": {name: round(d["cpu_s"] / baseline["cpu_s"], 2) for name, d in decoders.items()},
        "yuv420_speedup_vs_rgb": round(decoders["decoder_rgb"]["cpu_s"] / decoders["decoder_yuv420"]["cpu_s"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
