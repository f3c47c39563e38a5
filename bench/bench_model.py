"""Conditional DETR-R50 (default config: 6+6 layers, 300 queries, 91 labels), ours vs `transformers` on the same
random weights, fp32. Prints one JSON object. Two modes:

  forward (default)  model forward on a 1x3x800x1066 tensor (`--height`, `--width`)
  --end-to-end       1280x720 uint8 RGB frames -> preprocess -> forward -> post-process (boxes in frame pixels),
                     at batch 1 and 4 (`--batch-sizes`), starting from host memory: ours = `frames_to_device`
                     (pinned on a GPU) + `preprocess_frames` + model + `post_process_object_detection`;
                     transformers = its default (torchvision) processor on uint8 CHW tensors, run on the device,
                     + model + its post-processing; `_yuv420`: ours from the frames' YUV 4:2:0 planes
                     (`decoder.output: yuv420`: `yuv420_to_rgb` on the device before `preprocess_frames`)

    .venv/bin/python bench/bench_model.py [--end-to-end] [--repeats 3] [--threads 1] [--compile]
                                          [--autocast bfloat16 [float16]] [--device cpu] [--variants NAME...]
                                          [--runtimes onnxruntime_fp32 openvino_fp32 openvino_bf16]

Our model runs in the variants of `model.optimize.optimize` (VARIANTS; `--compile` and `--autocast` add one
each), so every switch is measured against the same baseline. `transformers` is measured with its default SDPA
attention (and, in forward mode, its eager attention). Each ratio = best transformers time / our time (> 1: we are
faster), for wall time and for process CPU time. `--runtimes` adds our exported graph (model/export.py: the
detector with its pixel_mask input, fed a mask of ones, as the pipeline's workers run it with `model.runtime`) in
ONNX Runtime and OpenVINO (`model/runtime.py`; OpenVINO at INFERENCE_PRECISION_HINT f32 or bf16), CPU only. On
a shared machine the CPU time with `--threads 1` is the clean measure (waiting for a core counts in wall time
only). The logits are compared, so all compute the same thing.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import ConditionalDetrConfig as HFConfig  # noqa: E402
from transformers import ConditionalDetrForObjectDetection as HFDetection  # noqa: E402
from transformers import ConditionalDetrImageProcessor as HFProcessor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_preprocess import HEIGHT, WIDTH, frames  # noqa: E402
from machine import cpu_model  # noqa: E402

from model.conditional_detr import ConditionalDetrForObjectDetection  # noqa: E402
from model.export import export_detector  # noqa: E402
from model.image_processor import ConditionalDetrImageProcessor  # noqa: E402
from model.optimize import InferenceOptions, frames_to_device, optimize  # noqa: E402
from model.runtime import ExportedDetector  # noqa: E402
from model.yuv import yuv420_to_rgb  # noqa: E402

VARIANTS = {
    "ours": InferenceOptions(fold_batch_norm=False, channels_last=False),
    "ours_fold_bn": InferenceOptions(fold_batch_norm=True, channels_last=False),
    "ours_fold_bn_channels_last": InferenceOptions(fold_batch_norm=True, channels_last=True),  # the default
}
DEFAULT_VARIANT = "ours_fold_bn_channels_last"
# --runtimes: name -> (model.runtime, precision)
RUNTIME_VARIANTS = {"onnxruntime_fp32": ("onnxruntime", "fp32"), "openvino_fp32": ("openvino", "fp32"),
                    "openvino_bf16": ("openvino", "bf16")}


def timed(function: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def best_times(functions: dict[str, Callable[[], object]], repeats: int, device: torch.device
               ) -> dict[str, dict[str, float]]:
    """Best wall and CPU time of `repeats` calls per function after one warm-up each. The functions take turns
    within every round, so load from other processes on a shared machine hits all of them alike."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in functions}
    with torch.inference_mode():
        for round_index in range(repeats + 1):
            for name, function in functions.items():
                elapsed = timed(function, device)
                if round_index:
                    times[name].append(elapsed)
    return {name: {"wall_ms": round(min(w for w, _ in values), 1), "cpu_ms": round(min(c for _, c in values), 1)}
            for name, values in times.items()}


def ratios(results: dict[str, dict[str, float]], baselines: list[str]) -> dict[str, dict[str, float]]:
    """Each of our entries' ratio to the best baseline, for wall and CPU time."""
    return {name: {kind: round(min(results[b][kind] for b in baselines) / results[name][kind], 3)
                   for kind in ("wall_ms", "cpu_ms")}
            for name in results if name.startswith("ours")}


def variant_options(args: argparse.Namespace) -> dict[str, InferenceOptions]:
    variants = dict(VARIANTS)
    if args.compile:
        variants["ours_compiled"] = InferenceOptions(compile=True)
    for dtype in args.autocast:
        variants[f"ours_autocast_{dtype}"] = InferenceOptions(dtype=getattr(torch, dtype))
        if args.compile:
            variants[f"ours_compiled_autocast_{dtype}"] = InferenceOptions(compile=True, dtype=getattr(torch, dtype))
    # The default is always kept: the pageable-copy and YUV variants run it.
    return {name: options for name, options in variants.items()
            if not args.variants or name in args.variants or name == DEFAULT_VARIANT}


def build_models(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Callable], HFDetection,
                                                                           HFDetection]:
    """Our variants (and exported runtimes) and transformers (SDPA, eager), all with the same random R50 weights."""
    torch.manual_seed(0)
    hf = HFDetection(HFConfig(num_labels=91, use_pretrained_backbone=False)).eval()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        loaded = ConditionalDetrForObjectDetection.from_pretrained(directory).to(device)
        hf_eager = HFDetection.from_pretrained(directory, attn_implementation="eager").eval().to(device)
        ours = {name: optimize(copy.deepcopy(loaded), options) for name, options in variant_options(args).items()}
        if args.runtimes:
            # Both runtimes read the file when the model is made: it may go with the directory afterwards.
            graph = export_detector(loaded, Path(directory) / "detector.onnx").path
            for name in args.runtimes:
                runtime, precision = RUNTIME_VARIANTS[name]
                ours[f"ours_{name}"] = ExportedDetector(graph, loaded.config, runtime, precision,
                                                        torch.get_num_threads())
    return ours, hf.to(device), hf_eager


def logits_of(outputs) -> torch.Tensor:
    """Our torch models return an output object, the exported runtimes a dict."""
    return outputs["logits"] if isinstance(outputs, dict) else outputs.logits


def max_logit_diffs(ours: dict[str, torch.nn.Module], hf: HFDetection, inputs: dict) -> dict[str, float]:
    """Largest logit difference to transformers on an unpadded batch (ours gets no mask, as it runs here: a mask
    would also make a compiled variant compile again)."""
    with torch.inference_mode():
        expected = hf(**inputs).logits
        return {name: (logits_of(model(inputs["pixel_values"])).float() - expected).abs().max().item()
                for name, model in ours.items()}


def forward_benchmark(args: argparse.Namespace, device: torch.device) -> dict:
    ours, hf, hf_eager = build_models(args, device)
    # No padding, so no pixel_mask for either model (transformers then makes one of ones itself).
    inputs = {"pixel_values": torch.randn(1, 3, args.height, args.width, device=device)}
    diffs = max_logit_diffs(ours, hf, inputs)
    models = {**ours, "transformers_sdpa": hf, "transformers_eager": hf_eager}
    results = best_times({name: (lambda m=m: m(**inputs)) for name, m in models.items()}, args.repeats, device)
    return {"benchmark": "conditional_detr_r50_forward", "input": [1, 3, args.height, args.width], **results,
            "ratio_vs_best_transformers": ratios(results, ["transformers_sdpa", "transformers_eager"]),
            "max_abs_logit_diff_vs_transformers": diffs}


def end_to_end_benchmark(args: argparse.Namespace, device: torch.device) -> dict:
    ours, hf, _ = build_models(args, device)
    processor, hf_processor = ConditionalDetrImageProcessor(), HFProcessor()
    report = {"benchmark": "conditional_detr_r50_end_to_end", "input": f"{WIDTH}x{HEIGHT} uint8 RGB frames",
              "steps": "preprocess (resize to 750x1333, normalize, pad) + forward + post_process_object_detection"}
    for batch_size in args.batch_sizes:
        images = frames(batch_size, HEIGHT, WIDTH)  # (B, H, W, 3) host uint8, as the pipeline's workers receive
        planes = np.stack([av.VideoFrame.from_ndarray(image, format="rgb24").to_ndarray(format="yuv420p")
                           for image in images])
        chw = [frame.permute(2, 0, 1).contiguous() for frame in torch.from_numpy(images)]  # HF's fastest input
        sizes = [(HEIGHT, WIDTH)] * batch_size

        def run_ours(model: torch.nn.Module, pin_memory: bool = True) -> list[dict]:
            inputs = processor.preprocess_frames(frames_to_device(images, device, pin_memory))
            # Frames of one size are not padded: no mask, as the pipeline's Detector calls the model (no host sync).
            outputs = model(inputs["pixel_values"])
            return processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=sizes)

        def run_ours_yuv420(model: torch.nn.Module) -> list[dict]:
            frames_rgb = yuv420_to_rgb(frames_to_device(planes, device))
            outputs = model(processor.preprocess_frames(frames_rgb)["pixel_values"])
            return processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=sizes)

        def run_transformers() -> list[dict]:
            inputs = hf_processor(chw, return_tensors="pt", device=device).to(device)
            outputs = hf(**inputs)
            return hf_processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=sizes)

        functions = {name: (lambda m=m: run_ours(m)) for name, m in ours.items()}
        if device.type == "cuda":  # the pinned-memory switch only exists on a GPU
            functions["ours_fold_bn_channels_last_pageable"] = lambda: run_ours(
                ours[DEFAULT_VARIANT], pin_memory=False)
        # The frames as a decoder with `decoder.output: yuv420` sends them: 4:2:0 planes, converted on the device.
        functions["ours_fold_bn_channels_last_yuv420"] = lambda: run_ours_yuv420(ours[DEFAULT_VARIANT])
        functions["transformers"] = run_transformers
        results = best_times(functions, args.repeats, device)
        per_second = {name: round(batch_size * 1000 / value["wall_ms"], 3) for name, value in results.items()}
        per_cpu_second = {name: round(batch_size * 1000 / value["cpu_ms"], 3) for name, value in results.items()}
        report[f"batch_{batch_size}"] = {
            **results, "images_per_s": per_second, "images_per_cpu_s": per_cpu_second,
            "ratio_vs_transformers": ratios(results, ["transformers"]),
            # Same pixel values for all (the processors' outputs differ by PIL-vs-torch rounding, not the models).
            "max_abs_logit_diff_vs_transformers": max_logit_diffs(
                ours, hf, dict(hf_processor(chw, return_tensors="pt", device=device).to(device)))}
    return report


def runtime_versions(runtimes: list[str]) -> dict[str, str]:
    versions = {}
    if any(name.startswith("onnxruntime") for name in runtimes):
        import onnxruntime
        versions["onnxruntime"] = onnxruntime.__version__
    if any(name.startswith("openvino") for name in runtimes):
        import openvino
        versions["openvino"] = openvino.get_version()
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--end-to-end", action="store_true", help="frames -> detections instead of the forward")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="end-to-end batch sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--height", type=int, default=800, help="forward mode input height")
    parser.add_argument("--width", type=int, default=1066, help="forward mode input width")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); with 1 thread "
                        "the CPU time is a clean measure of work even on a busy machine")
    parser.add_argument("--compile", action="store_true", help="also measure optimize(compile=True); the first "
                        "call compiles (minutes on a small CPU), the warm-up round absorbs it")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], nargs="+", default=[],
                        help="also measure optimize(dtype=...) for each")
    parser.add_argument("--runtimes", nargs="+", choices=list(RUNTIME_VARIANTS), default=[],
                        help="also measure our exported graph in these runtimes (CPU only)")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help=f"measure only these of our variants (and {DEFAULT_VARIANT}, always): each compiled "
                        "one compiles once per batch size")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.runtimes and device.type != "cpu":
        parser.error("--runtimes run on the CPU (ONNX Runtime and OpenVINO's CPU plugin)")
    report = end_to_end_benchmark(args, device) if args.end_to_end else forward_benchmark(args, device)
    print(json.dumps({
        **report,
        "dtype": "float32",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "repeats": args.repeats,
        "variants": {**{name: repr(options) for name, options in variant_options(args).items()},
                     **{f"ours_{name}": "exported graph, runtime %s, precision %s" % RUNTIME_VARIANTS[name]
                        for name in args.runtimes}},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), **runtime_versions(args.runtimes)},
        "machine": {"platform": platform.platform(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "loadavg_1min_at_end": os.getloadavg()[0]},
    }, indent=2))


if __name__ == "__main__":
    main()
