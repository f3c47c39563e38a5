"""`cdetr bench NAME [ARGS...]`: run one of the benchmark scripts in the source tree's `bench/` folder.

The benchmarks compare against `transformers` (a test-only dependency) and live outside the installed packages,
so this command only finds and runs them: each prints its JSON report to stdout. ARGS go to the script as they
are (`cdetr bench model --help` lists the script's own options).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = {
    "model": "bench_model.py",  # forward / end-to-end images/s, ours (each optimize switch) vs transformers
    "preprocess": "bench_preprocess.py",  # 1280x720 frames -> model inputs, ours vs transformers' processors
    "panoptic": "bench_panoptic.py",  # panoptic inference time and peak memory vs transformers
    "pipeline": "bench_pipeline.py",  # N concurrent 720p sources through Ray vs a naive sequential loop
    "decode": "bench_decoder.py",  # CPU per 1080p30 H.264 stream of the pipeline's decoder vs plain PyAV
    "peak": "bench_peak.py",  # FLOPs per frame and the CPU's practical peak: how far from the hardware limit
    "stages": "bench_stages.py",  # one batch stage by stage: ms, GFLOP and TFLOP/s per stage vs the peak
    "rtsp": "bench_rtsp.py",  # N RTSP cameras from one local server: decoder CPU, latency, drops, reboots
    "tracking": "bench_tracking.py",  # our tracker vs the trackers package's ByteTrack / OC-SORT: HOTA, IDF1, counts
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=sorted(SCRIPTS), help="which benchmark to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options for the benchmark script")


def run(args: argparse.Namespace) -> int:
    script = BENCH_DIR / SCRIPTS[args.benchmark]
    if not script.is_file():
        raise SystemExit(f"cdetr bench: {script} not found; the benchmarks need the source tree (an editable "
                         f"install or a checkout), not an installed wheel")
    # The scripts import `model`, `pipeline` and each other from the source tree.
    root = str(BENCH_DIR.parent)
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(script), *args.args], cwd=root,
                          env={**os.environ, "PYTHONPATH": path}).returncode
