"""Preprocessing throughput for 1280x720 uint8 RGB frames -> (B,3,750,1333) model inputs. Prints JSON.

Compared in one run, on the same frames:
  baseline      transformers' fastest processor (5.24 default: torchvision backend), fed uint8 CHW tensors
  hf_pil        transformers' PIL backend (the numbers we reproduce)
  ours_pil      our `preprocess` on numpy frames (PIL resize)
  ours_frames   our `preprocess_frames` on a uint8 (B,H,W,3) tensor (torch resize), on CPU and, if present, CUDA
  ours_frames_model_size  the same for frames the decoder already scaled to 750x1333 (`decoder.output: rgb`)
  ours_yuv420   the 1280x720 frames as YUV 4:2:0 planes (`decoder.output: yuv420`): `yuv420_to_rgb`, then
                `preprocess_frames` (torch resize); the worker's share of the GPU workers' default
Each entry reports images/s (best of `--repeats` timed calls) and its ratio to the baseline at the same batch size.

    python bench/bench_preprocess.py [--repeats 5] [--threads 2]
"""
import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import cpu_model  # noqa: E402

from model.image_processor import ConditionalDetrImageProcessor, get_resize_output_size  # noqa: E402
from model.yuv import yuv420_to_rgb  # noqa: E402

WIDTH, HEIGHT = 1280, 720


def best_images_per_second(function, batch_size: int, repeats: int, synchronize=lambda: None) -> float:
    function()  # warm-up: allocations, kernel selection
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return batch_size / best


def frames(batch_size: int, height: int, width: int) -> np.ndarray:
    """Smooth gradients plus noise: compresses like video, exercises every pixel."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
    return np.stack([np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
                     for _ in range(batch_size)])


def run(repeats: int) -> dict:
    from transformers import ConditionalDetrImageProcessor as HFProcessor
    from transformers.models.conditional_detr.image_processing_pil_conditional_detr import (
        ConditionalDetrImageProcessorPil as HFPilProcessor,
    )

    ours = ConditionalDetrImageProcessor()
    baseline_processor, hf_pil = HFProcessor(), HFPilProcessor()
    model_height, model_width = get_resize_output_size(HEIGHT, WIDTH, ours.size)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {}
    for batch_size in (1, 8):
        images = frames(batch_size, HEIGHT, WIDTH)
        chw = [torch.from_numpy(image).permute(2, 0, 1).contiguous() for image in images]
        entries = {
            "baseline": best_images_per_second(lambda: baseline_processor(chw, return_tensors="pt"), batch_size,
                                               repeats),
            "hf_pil": best_images_per_second(lambda: hf_pil(list(images), return_tensors="pt"), batch_size, repeats),
            "ours_pil": best_images_per_second(lambda: ours(list(images), return_tensors="pt"), batch_size, repeats),
        }
        scaled = frames(batch_size, model_height, model_width)
        planes = np.stack([av.VideoFrame.from_ndarray(image, format="rgb24").to_ndarray(format="yuv420p")
                           for image in images])
        for device in devices:
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            full = torch.from_numpy(images).to(device)
            at_model_size = torch.from_numpy(scaled).to(device)
            entries[f"ours_frames_{device}"] = best_images_per_second(lambda: ours.preprocess_frames(full),
                                                                      batch_size, repeats, sync)
            entries[f"ours_frames_model_size_{device}"] = best_images_per_second(
                lambda: ours.preprocess_frames(at_model_size), batch_size, repeats, sync)
            yuv = torch.from_numpy(planes).to(device)
            entries[f"ours_yuv420_{device}"] = best_images_per_second(
                lambda: ours.preprocess_frames(yuv420_to_rgb(yuv)), batch_size, repeats, sync)
        baseline = entries["baseline"]
        results[f"batch_{batch_size}"] = {name: {"images_per_s": round(value, 1),
                                                 "ratio_vs_baseline": round(value / baseline, 2)}
                                          for name, value in entries.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"benchmark": "preprocess", "input": f"{WIDTH}x{HEIGHT} uint8 RGB",
              "output": "1333x750 float32 (shortest_edge 800, longest_edge 1333)",
              "baseline": "transformers ConditionalDetrImageProcessor (torchvision backend, uint8 CHW tensors)",
              "torch": torch.__version__, "threads": args.threads, "cpu": cpu_model(),
              "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "repeats": args.repeats, "results": run(args.repeats)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
