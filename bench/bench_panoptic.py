"""Peak memory and time of panoptic inference (ConditionalDetrForSegmentation), ours vs `transformers`, on the same
random weights (default R50 config: 6+6 layers, 300 queries, 250 labels as DETR-panoptic). Prints one JSON object.

    .venv/bin/python bench/bench_panoptic.py [--queries 30] [--repeats 2] [--threads 2]

Each measurement runs in its own subprocess and reports that process's peak resident set size (VmHWM in
/proc/self/status, which sees torch's allocations; `tracemalloc` does not). `resource.getrusage`'s ru_maxrss is not
used: after fork + exec it starts at the parent's peak, which here holds a whole model. The peak is reset after the
model is loaded (writing 5 to /proc/self/clear_refs), so `peak_rss_mb` is the whole process during inference
(interpreter, torch, weights, activations) without the loading; `loaded_rss_mb` is the resident size before the
first forward, so `peak - loaded` is what inference itself costs.

Measurements (1 image, fp32, CPU, no padding):
  * transformers at 384x512, once (it needs about 9 GB, bench/RESULTS.md §4: masks for all 300 queries,
    docs/reference-compatibility.md, Q13);
  * ours at 384x512 and 800x1066 computing masks for all 300 queries (the same work as transformers), and
  * ours with `top_k=--queries`: masks only for the queries that can survive (random weights give every query a
    score near 0.5, so a threshold would keep them all; a trained model keeps the few queries that find a
    segment, which `top_k` stands for).
Our masks for all queries are compared with transformers' (max abs difference), so the timings are of the same
computation. `speedup` = transformers time / ours; `memory_ratio` = transformers peak / ours.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEASUREMENTS = (  # (implementation, height, width, masks: "all" or "top_k"), in run order
    ("transformers", 384, 512, "all"),
    ("ours", 384, 512, "all"),
    ("ours", 384, 512, "top_k"),
    ("ours", 800, 1066, "top_k"),
    ("ours", 800, 1066, "all"),
)


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in MiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) / 1024


def _reset_peak_rss() -> None:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS


def measure(args: argparse.Namespace) -> dict:
    """One measurement, in this (fresh) process: load, then time `repeats` forwards (the first includes warm-up)."""
    torch.set_num_threads(args.threads)
    if args.impl == "transformers":
        from transformers import ConditionalDetrForSegmentation as HFSegmentation

        model = HFSegmentation.from_pretrained(args.weights).eval()
        options = {}
    else:
        from model.segmentation import ConditionalDetrForSegmentation

        model = ConditionalDetrForSegmentation.from_pretrained(args.weights)
        options = {"top_k": args.queries} if args.masks == "top_k" else {}
    pixel_values = torch.randn(1, 3, args.height, args.width, generator=torch.Generator().manual_seed(0))
    _reset_peak_rss()
    loaded = _status_mb("VmRSS")
    times = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            start = time.perf_counter()
            output = model(pixel_values, **options)
            times.append((time.perf_counter() - start) * 1000)
    if args.save_masks:
        torch.save(output.pred_masks, args.save_masks)
    return {"implementation": args.impl, "input": [1, 3, args.height, args.width],
            "masks": "all 300" if args.masks == "all" else f"top_k={args.queries}",
            "masks_computed": output.pred_masks.shape[1], "best_ms": round(min(times), 1),
            "runs_ms": [round(t, 1) for t in times], "loaded_rss_mb": round(loaded),
            "peak_rss_mb": round(_status_mb("VmHWM"))}


def run_measurement(weights: Path, impl: str, height: int, width: int, masks: str, args: argparse.Namespace,
                    save_masks: Path | None) -> dict:
    repeats = 1 if impl == "transformers" or (masks == "all" and height > 500) else args.repeats
    command = [sys.executable, __file__, "--measure", "--weights", str(weights), "--impl", impl,
               "--height", str(height), "--width", str(width), "--masks", masks, "--queries", str(args.queries),
               "--repeats", str(repeats), "--threads", str(args.threads)]
    if save_masks is not None:
        command += ["--save-masks", str(save_masks)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        return {"implementation": impl, "input": [1, 3, height, width], "masks": masks,
                "error": f"exit code {done.returncode}: {done.stderr.strip()[-500:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=30, help="top_k of the pruned measurements")
    parser.add_argument("--repeats", type=int, default=2, help="forwards per measurement of ours (best is kept)")
    parser.add_argument("--threads", type=int, default=2)
    # Internal: one measurement in a subprocess.
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--height", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--masks", help=argparse.SUPPRESS)
    parser.add_argument("--save-masks", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return

    import transformers
    from transformers import ConditionalDetrConfig as HFConfig
    from transformers import ConditionalDetrForSegmentation as HFSegmentation

    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        torch.manual_seed(0)
        HFSegmentation(HFConfig(num_labels=250, use_pretrained_backbone=False)).save_pretrained(directory / "weights")
        results = []
        for impl, height, width, masks in MEASUREMENTS:
            save = directory / f"{impl}-{height}.pt" if masks == "all" and height == 384 else None
            results.append(run_measurement(directory / "weights", impl, height, width, masks, args, save))
        reference_masks = directory / "transformers-384.pt"
        our_masks = directory / "ours-384.pt"
        max_diff = ((torch.load(our_masks) - torch.load(reference_masks)).abs().max().item()
                    if reference_masks.exists() and our_masks.exists() else None)

    by_key = {(r["implementation"], r["input"][2], r["masks"].startswith("all")): r for r in results}
    reference = by_key[("transformers", 384, True)]
    ratios = {}
    if "best_ms" in reference:
        for name, key in (("all_masks_384x512", ("ours", 384, True)), ("top_k_384x512", ("ours", 384, False))):
            if "best_ms" in by_key[key]:
                ratios[f"speedup_{name}"] = round(reference["best_ms"] / by_key[key]["best_ms"], 2)
                ratios[f"memory_ratio_{name}"] = round(reference["peak_rss_mb"] / by_key[key]["peak_rss_mb"], 2)
    full_hd = by_key[("ours", 800, False)]
    print(json.dumps({
        "benchmark": "conditional_detr_r50_panoptic_inference",
        "dtype": "float32",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "results": results,
        "max_abs_diff_masks_vs_transformers_384x512": max_diff,
        "ratios": ratios,
        "targets": {"speedup_top_k_384x512_at_least_10": ratios.get("speedup_top_k_384x512", 0) >= 10,
                    "peak_top_k_800x1066_below_4gb": full_hd.get("peak_rss_mb", float("inf")) < 4096},
    }, indent=2))


if __name__ == "__main__":
    main()
