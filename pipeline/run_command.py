"""`cdetr run`: the streaming pipeline from the command line; the job itself is pipeline/runner.py."""
import argparse
import re
import sys
from pathlib import Path

import redis

from pipeline import analytics_flags
from pipeline.config import ConfigError, PipelineConfig, load_config, validate_config
from pipeline.runner import run_job
from pipeline.sources import redact
from pipeline.worker import check_model_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", metavar="SOURCE", help="file path or http(s)/rtsp/udp/tcp URL")
    parser.add_argument("--source-id", action="append", default=[], metavar="ID",
                        help="stream id per SOURCE, in order (default: derived from the file name)")
    parser.add_argument("--model", type=Path, help="checkpoint dir or .pth (default: the bundled shapes-tiny)")
    parser.add_argument("--panoptic", action="store_true", default=None, help="also run the panoptic head")
    parser.add_argument("--instance-masks", action="store_true", default=None,
                        help="also attach a COCO RLE mask to each detection (segmentation checkpoint)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                        help="model precision (default fp32; auto: bf16 on CPUs with AMX and recent GPUs; check "
                        "accuracy with cdetr eval --precision)")
    parser.add_argument("--runtime", choices=["torch", "onnxruntime", "openvino"],
                        help="what runs the model: torch (default), or its ONNX export in ONNX Runtime or OpenVINO "
                        "(CPU workers, detection only)")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the detector as one graph (one CUDA graph on a GPU; batches padded to "
                        "the batch size: each frame size compiles once, at its first batch)")
    parser.add_argument("--redis-url",
                        help="redis://, rediss:// or redis+sentinel:// URL (default: local, started if needed)")
    parser.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--config", type=Path, help="YAML/JSON config file (see pipeline/config.py)")
    parser.add_argument("--fps", type=float, help="sample every source at most at this rate")
    parser.add_argument("--batch-size", type=int, help="frames per model call")
    parser.add_argument("--no-tracking", action="store_true",
                        help="no tracker on any source: track_id and analytics are null (a source's `tracking` in "
                        "--config still wins)")
    analytics_flags.add_arguments(parser, per_source=True)


def run(args: argparse.Namespace) -> int:
    try:
        config = with_analytics(load_config(args.config, overrides=_overrides(args)), args.line, args.zone)
        check_model_path(config.model)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"cdetr run: {e}", file=sys.stderr)
        return 2
    if not config.sources and not config.keep_running:
        print("cdetr run: no sources (give SOURCE arguments or `sources` in --config)", file=sys.stderr)
        return 2
    try:
        summary = run_job(config, progress=True)
    except (ConnectionError, redis.exceptions.NoPermissionError) as e:
        # Redis unreachable (past redis.retry_timeout_s), refusing our password, or an ACL without our keys: the
        # messages name the problem and never the password.
        print(f"cdetr run: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0 if all(s["status"] in ("eos", "removed") for s in summary.values()) else 1


def _overrides(args: argparse.Namespace) -> dict:
    if args.source_id and len(args.source_id) != len(args.sources):
        raise ConfigError(f"{len(args.source_id)} --source-id for {len(args.sources)} sources")
    ids = args.source_id or _default_ids(args.sources)
    overrides: dict = {}
    if args.sources:
        overrides["sources"] = [{"id": i, "url": url, **({"fps": args.fps} if args.fps else {})}
                                for i, url in zip(ids, args.sources)]
    model = {k: v for k, v in (("path", args.model), ("panoptic", args.panoptic),
                               ("instance_masks", args.instance_masks), ("precision", args.precision),
                               ("compile", args.compile), ("runtime", args.runtime)) if v is not None}
    if model:
        overrides["model"] = model
    if args.redis_url:
        overrides["redis"] = {"url": args.redis_url}
    if args.ray_address:
        overrides["ray_address"] = args.ray_address
    if args.batch_size is not None:
        overrides["batching"] = {"max_batch_size": args.batch_size}
    if args.no_tracking:
        overrides["tracking"] = {"enabled": False}
    return overrides


def with_analytics(config: PipelineConfig, lines: list[tuple[str, dict]], zones: list[tuple[str, dict]]
                   ) -> PipelineConfig:
    """`config` with the `--line` and `--zone` flags' (source id, entry) pairs added to their sources."""
    if not lines and not zones:
        return config
    data = config.model_dump()
    sources = {source["id"]: source for source in data["sources"]}
    for flag, field, items in (("--line", "lines", lines), ("--zone", "zones", zones)):
        for source_id, item in items:
            if source_id not in sources:
                raise ConfigError(f"{flag} {source_id}:{item['name']}: no source {source_id!r} (sources: "
                                  f"{', '.join(sources) or 'none'})")
            sources[source_id][field].append(item)
    return validate_config(data)


def _default_ids(urls: list[str]) -> list[str]:
    """`video.mp4` → `video`; sanitized to the id alphabet; numbered when two would collide. From the redacted
    URL: the id is part of a Redis key, and `rtsp://admin:pw@cam` has no path to take it from."""
    ids = []
    for i, url in enumerate(urls):
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(redact(url).rstrip("/")).stem)[:60] or f"source{i}"
        ids.append(stem if stem not in ids else f"{stem}-{i}")
    return ids


def print_summary(summary: dict[str, dict]) -> None:
    print(f"{'source':<24} {'status':<11} {'frames':>7} {'fps':>7} {'p50 ms':>8} {'p95 ms':>8} {'dropped':>8} "
          f"{'lost':>6}")
    for source_id, s in summary.items():
        cells = [s["frames"], s["fps"], s["p50_ms"], s["p95_ms"], s["dropped"], s["lost"]]
        print(f"{source_id:<24} {s['status']:<11} " + " ".join(
            f"{'-' if v is None else v:>{w}}" for v, w in zip(cells, (7, 7, 8, 8, 8, 6))))
