"""`cdetr run`: the streaming pipeline from the command line; the job itself is pipeline/runner.py."""
import argparse
import re
import sys
from pathlib import Path

import redis

from pipeline.config import ConfigError, load_config
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
    parser.add_argument("--autocast", choices=["bfloat16", "float16"],
                        help="run the model under autocast to this dtype (faster; check accuracy with cdetr eval)")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the detector as one graph (one CUDA graph on a GPU; batches padded to "
                        "the batch size: each frame size compiles once, at its first batch)")
    parser.add_argument("--redis-url",
                        help="redis://, rediss:// or redis+sentinel:// URL (default: local, started if needed)")
    parser.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--config", type=Path, help="YAML/JSON config file (see pipeline/config.py)")
    parser.add_argument("--fps", type=float, help="sample every source at most at this rate")
    parser.add_argument("--batch-size", type=int, help="frames per model call")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, overrides=_overrides(args))
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
                               ("instance_masks", args.instance_masks), ("autocast", args.autocast),
                               ("compile", args.compile)) if v is not None}
    if model:
        overrides["model"] = model
    if args.redis_url:
        overrides["redis"] = {"url": args.redis_url}
    if args.ray_address:
        overrides["ray_address"] = args.ray_address
    if args.batch_size is not None:
        overrides["batching"] = {"max_batch_size": args.batch_size}
    return overrides


def _default_ids(urls: list[str]) -> list[str]:
    """`video.mp4` → `video`; sanitized to the id alphabet; numbered when two would collide. From the redacted
    URL: the id is part of a Redis key, and `rtsp://admin:pw@cam` has no path to take it from."""
    ids = []
    for i, url in enumerate(urls):
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(redact(url).rstrip("/")).stem)[:60] or f"source{i}"
        ids.append(stem if stem not in ids else f"{stem}-{i}")
    return ids


def print_summary(summary: dict[str, dict]) -> None:
    print(f"{'source':<24} {'status':<8} {'frames':>7} {'fps':>7} {'p50 ms':>8} {'p95 ms':>8} {'dropped':>8} "
          f"{'lost':>6}")
    for source_id, s in summary.items():
        cells = [s["frames"], s["fps"], s["p50_ms"], s["p95_ms"], s["dropped"], s["lost"]]
        print(f"{source_id:<24} {s['status']:<8} " + " ".join(
            f"{'-' if v is None else v:>{w}}" for v, w in zip(cells, (7, 7, 8, 8, 8, 6))))
