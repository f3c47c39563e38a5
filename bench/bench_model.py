"""Forward time of Conditional DETR-R50 (default config: 6+6 layers, 300 queries, 91 labels), ours vs
`transformers`, on the same random weights, at 1x3x800x1066 fp32. Prints one JSON object.

    .venv/bin/python bench/bench_model.py [--repeats 3] [--device cpu] [--threads N] [--height 800 --width 1066]

`transformers` is the baseline measured in the same run (its default SDPA attention and its eager attention);
each ratio = best HF time / our time (> 1: we are faster), for wall time and for process CPU time. The logits are
compared too, so both sides compute the same thing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import ConditionalDetrConfig as HFConfig  # noqa: E402
from transformers import ConditionalDetrForObjectDetection as HFDetection  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.conditional_detr import ConditionalDetrForObjectDetection  # noqa: E402


def timed_forward(model: torch.nn.Module, inputs: dict, device: torch.device) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one forward. On a shared CPU the process CPU time (all threads) is the steadier
    measure of work done: waiting for a core counts in wall time only."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    model(**inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def best_times(models: dict[str, torch.nn.Module], inputs: dict, repeats: int, device: torch.device
               ) -> dict[str, dict[str, float]]:
    """Best wall and CPU time of `repeats` forwards per model after one warm-up each. The models take turns within
    every round, so load from other processes on a shared machine hits all of them alike."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    with torch.inference_mode():
        for round_index in range(repeats + 1):
            for name, model in models.items():
                elapsed = timed_forward(model, inputs, device)
                if round_index:
                    times[name].append(elapsed)
    return {name: {"wall_ms": round(min(w for w, _ in values), 1), "cpu_ms": round(min(c for _, c in values), 1)}
            for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1066)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); with 1 thread "
                        "the CPU time is a clean measure of work even on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    hf = HFDetection(HFConfig(num_labels=91, use_pretrained_backbone=False)).eval()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = ConditionalDetrForObjectDetection.from_pretrained(directory).to(device)
        hf_eager = HFDetection.from_pretrained(directory, attn_implementation="eager").eval().to(device)
    hf = hf.to(device)

    pixel_values = torch.randn(1, 3, args.height, args.width, device=device)
    pixel_mask = torch.ones(1, args.height, args.width, dtype=torch.int64, device=device)
    inputs = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
    with torch.inference_mode():
        max_diff = (ours(**inputs).logits - hf(**inputs).logits).abs().max().item()

    models = {"ours": ours, "transformers_sdpa": hf, "transformers_eager": hf_eager}
    results = best_times(models, inputs, args.repeats, device)
    ratios = {f"ratio_{kind}_vs_best_transformers": round(
        min(results["transformers_sdpa"][kind], results["transformers_eager"][kind]) / results["ours"][kind], 3)
        for kind in ("wall_ms", "cpu_ms")}
    print(json.dumps({
        "benchmark": "conditional_detr_r50_forward",
        "input": [1, 3, args.height, args.width],
        "dtype": "float32",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "repeats": args.repeats,
        **results,
        **ratios,
        "max_abs_logit_diff": max_diff,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_1min_at_end": os.getloadavg()[0]},
    }, indent=2))


if __name__ == "__main__":
    main()
