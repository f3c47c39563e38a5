"""Where one end-to-end batch's time goes, stage by stage, and how far each stage is from the hardware limit.

Our default model (`optimize` defaults, random R50 weights, optionally under autocast) on 1280x720 uint8 frames in
host memory, split into the stages the worker runs one after the other:

  preprocess   frames_to_device (pinned on a GPU) + preprocess_frames (resize, normalize, pad)
  backbone     ConditionalDetrModel.extract_features (ResNet, input projection, position embeddings)
  encoder      ConditionalDetrModel.encode
  decoder      ConditionalDetrModel.decode
  heads        ConditionalDetrForObjectDetection.detection_output (classifier, box MLP)
  postprocess  post_process_object_detection (top-k, boxes to frame pixels)

Each stage is timed alone (the device synchronized before and after it, so its kernels are not overlapped with the
next stage's launches: the sum is a little above the end-to-end time, which is reported too), best of `--repeats`;
its FLOPs are counted by torch.utils.flop_counter (1 MAC = 2 FLOPs), giving achieved TFLOP/s per stage to set
against the device's peak (`--peak-tflops`, e.g. 989 for an H100's dense bf16, or bench_peak.py's figure on a CPU).
Prints JSON.

    python bench/bench_stages.py [--device cuda] [--batch-size 8] [--autocast bfloat16] [--short-side 800]
                                 [--repeats 5] [--peak-tflops N]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from typing import Callable

import torch
from bench_preprocess import HEIGHT, WIDTH, frames
from machine import cpu_model
from torch.utils.flop_counter import FlopCounterMode

from model.conditional_detr import ConditionalDetrForObjectDetection
from model.config import ConditionalDetrConfig
from model.image_processor import ConditionalDetrImageProcessor
from model.optimize import frames_to_device, optimize


def stage_functions(model, processor, images, device: torch.device) -> dict[str, Callable[[dict], None]]:
    """The stages in order; each reads what the previous one left in `state` and adds its own result."""
    sizes = [(HEIGHT, WIDTH)] * len(images)
    detr = model.model

    def preprocess(state: dict) -> None:
        state["inputs"] = processor.preprocess_frames(frames_to_device(images, device))

    def backbone(state: dict) -> None:
        # Frames of one size: no mask, as the pipeline's Detector calls the model.
        state["features"] = detr.extract_features(state["inputs"]["pixel_values"])

    def encoder(state: dict) -> None:
        state["memory"] = detr.encode(state["features"])

    def decoder(state: dict) -> None:
        state["decoded"] = detr.decode(state["memory"], state["features"])

    def heads(state: dict) -> None:
        state["outputs"] = model.detection_output(*state["decoded"], state["memory"])

    def postprocess(state: dict) -> None:
        outputs = state["outputs"]
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=sizes)

    return {"preprocess": preprocess, "backbone": backbone, "encoder": encoder, "decoder": decoder,
            "heads": heads, "postprocess": postprocess}


def run_stages(stages: dict[str, Callable[[dict], None]], device: torch.device, autocast,
               timings: dict[str, list[float]] | None = None, counters: dict[str, FlopCounterMode] | None = None
               ) -> None:
    """One pass through every stage, timing each (into `timings`) or counting its FLOPs (into `counters`)."""
    state: dict = {}
    with torch.inference_mode(), autocast():
        for name, stage in stages.items():
            counter = counters[name] if counters is not None else contextlib.nullcontext()
            synchronize(device)
            started = time.perf_counter()
            with counter:
                stage(state)
            synchronize(device)
            if timings is not None:
                timings[name].append((time.perf_counter() - started) * 1e3)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--autocast", choices=["bfloat16", "float16"])
    parser.add_argument("--short-side", type=int, default=800,
                        help="model input short side (the long side at most short * 1333 / 800)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, to report each stage's fraction of it")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = optimize(ConditionalDetrForObjectDetection(ConditionalDetrConfig(num_labels=91)).to(device))
    processor = ConditionalDetrImageProcessor(
        size={"shortest_edge": args.short_side, "longest_edge": args.short_side * 1333 // 800})
    stages = stage_functions(model, processor, frames(args.batch_size, HEIGHT, WIDTH), device)
    dtype = getattr(torch, args.autocast) if args.autocast else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    counters = {name: FlopCounterMode(display=False) for name in stages}
    run_stages(stages, device, autocast, counters=counters)  # also the warm-up
    timings: dict[str, list[float]] = {name: [] for name in stages}
    end_to_end = []
    for _ in range(args.repeats):
        run_stages(stages, device, autocast, timings=timings)
        state: dict = {}
        synchronize(device)
        started = time.perf_counter()
        with torch.inference_mode(), autocast():
            for stage in stages.values():
                stage(state)
        synchronize(device)
        end_to_end.append((time.perf_counter() - started) * 1e3)

    best = {name: min(values) for name, values in timings.items()}
    total = sum(best.values())
    report = {}
    for name, ms in best.items():
        gflop = counters[name].get_total_flops() / 1e9
        tflops = gflop / ms if ms else 0.0  # GFLOP per ms = TFLOP/s
        report[name] = {"ms": round(ms, 2), "share": round(ms / total, 3),
                        "gflop_per_frame": round(gflop / args.batch_size, 2), "tflop_per_s": round(tflops, 3),
                        **({"fraction_of_peak": round(tflops / args.peak_tflops, 4)} if args.peak_tflops else {})}
    flops = sum(counter.get_total_flops() for counter in counters.values())
    print(json.dumps({
        "benchmark": "stages", "input": f"{args.batch_size} x {WIDTH}x{HEIGHT} uint8 RGB frames (host memory)",
        "model_input": list(processor.preprocess_frames(torch.zeros(1, HEIGHT, WIDTH, 3, dtype=torch.uint8))[
            "pixel_values"].shape[-2:]),
        "autocast": args.autocast, "stages": report,
        "sum_of_stages_ms": round(total, 2), "end_to_end_ms": round(min(end_to_end), 2),
        "frames_per_s": round(args.batch_size * 1e3 / min(end_to_end), 2),
        "gflop_per_frame": round(flops / 1e9 / args.batch_size, 1),
        "tflop_per_s_end_to_end": round(flops / 1e9 / min(end_to_end), 3),
        "peak_tflops": args.peak_tflops,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
    }, indent=2))


if __name__ == "__main__":
    main()
