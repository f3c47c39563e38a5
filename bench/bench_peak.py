"""How far the model is from the CPU's limit: FLOPs per frame against the practical peak. Prints one JSON object.

  peak     GFLOP/s on `--threads` threads of a large square matmul (`--matmul-size`, fp32 and bf16; MKL) and of a
           3x3 convolution (256 channels, 128x128, channels-last, fp32 and bf16; oneDNN). The faster fp32 one is the
           practical peak, not the datasheet figure; likewise for bf16, which runs on AMX tiles where the CPU has
           them (`cpu_kind`: amx, avx512_bf16 or none, model/precision.py). They differ on AMD CPUs: MKL's GEMM
           may take an AVX2 path there, while oneDNN's convolutions (most of the model's FLOPs) use the full
           AVX-512 width.
  model    FLOPs of one forward of Conditional DETR-R50 (default config, random weights, `optimize` defaults) at
           `--height` x `--width` (default 750x1333, a 1280x720 frame at the model's size), counted by
           torch.utils.flop_counter (convolutions, matmuls, attention; 1 MAC = 2 FLOPs), the backbone's share,
           and the best process CPU time of `--repeats` forwards: achieved GFLOP/s, its fraction of the peak and
           the frames/s the peak would allow

    .venv/bin/python bench/bench_peak.py [--threads 1] [--repeats 2] [--height 750 --width 1333]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from machine import cpu_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model.conditional_detr import ConditionalDetrForObjectDetection
from model.config import ConditionalDetrConfig
from model.optimize import optimize
from model.precision import detect_hardware


def best_cpu_seconds(function, repeats: int) -> float:
    """Best process CPU time of `repeats` calls after one warm-up."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        function()
        best = min(best, time.process_time() - start)
    return best


def matmul_gflops(size: int, dtype: torch.dtype, repeats: int) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / best_cpu_seconds(lambda: a @ b, repeats) / 1e9


def conv3x3_gflops(dtype: torch.dtype, repeats: int) -> float:
    conv = nn.Conv2d(256, 256, 3, padding=1, bias=False).eval().to(dtype, memory_format=torch.channels_last)
    x = torch.randn(1, 256, 128, 128, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return 2 * 256 * 256 * 9 * 128 * 128 / best_cpu_seconds(lambda: conv(x), repeats) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--height", type=int, default=750)
    parser.add_argument("--width", type=int, default=1333)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    peak = {f"matmul_{str(dtype).removeprefix('torch.')}": round(matmul_gflops(args.matmul_size, dtype,
                                                                               args.repeats), 1)
            for dtype in (torch.float32, torch.bfloat16)}
    for dtype in (torch.float32, torch.bfloat16):
        peak[f"conv3x3_{str(dtype).removeprefix('torch.')}"] = round(conv3x3_gflops(dtype, args.repeats), 1)
    fp32_peak = max(peak["matmul_float32"], peak["conv3x3_float32"])
    bf16_peak = max(peak["matmul_bfloat16"], peak["conv3x3_bfloat16"])
    torch.manual_seed(0)
    model = optimize(ConditionalDetrForObjectDetection(ConditionalDetrConfig(num_labels=91)))
    pixel_values = torch.randn(1, 3, args.height, args.width)
    pixel_mask = torch.ones(1, args.height, args.width, dtype=torch.int64)
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            model(pixel_values, pixel_mask)
        seconds = best_cpu_seconds(lambda: model(pixel_values, pixel_mask), args.repeats)
    flops = counter.get_total_flops()
    backbone = sum(count for name, counts in counter.get_flop_counts().items() if name.endswith("conv_encoder")
                   for count in counts.values())
    achieved = flops / seconds / 1e9
    print(json.dumps({
        "benchmark": "hardware_limit",
        "peak_gflops_per_s": peak, "matmul_size": args.matmul_size, "fp32_peak_gflops_per_s": fp32_peak,
        "bf16_peak_gflops_per_s": bf16_peak, "cpu_kind": detect_hardware("cpu").cpu_kind,
        "model_input": [1, 3, args.height, args.width],
        "model_gflops_per_frame": round(flops / 1e9, 1), "model_gmacs_per_frame": round(flops / 2e9, 1),
        "backbone_share_of_flops": round(backbone / flops, 3),
        "forward_cpu_s": round(seconds, 3), "achieved_gflops_per_s": round(achieved, 1),
        "fraction_of_fp32_peak": round(achieved / fp32_peak, 3),
        "frames_per_s_at_fp32_peak": round(fp32_peak * 1e9 / flops, 3),
        "frames_per_s_achieved": round(1 / seconds, 3),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_1min_at_end": os.getloadavg()[0]},
    }, indent=2))


if __name__ == "__main__":
    main()
