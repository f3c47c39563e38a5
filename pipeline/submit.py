"""`cdetr submit`: add a source to a running pipeline (one started with `keep_running`).

It only writes one validated `add` message to the control stream (`<prefix>:control`); the running `cdetr run`
starts the source, or reports an `error` event in `<prefix>:events` (for example, an id that is already running).
Redis URL and prefix come from the same layers as `cdetr run`'s (--config, `CDETR_REDIS__*`, then the flags), so
on a cluster's head the URL is taken from the environment and never typed.
"""
import argparse
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.redis_server import DEFAULT_HOST, DEFAULT_PORT
from pipeline.schema import AddSource
from pipeline.sink import RedisSink, connect
from pipeline.wire import DEFAULT_PREFIX, JSON_FIELD


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="file path (as the cluster's nodes see it) or http(s)/rtsp/udp/tcp URL")
    parser.add_argument("--source-id", required=True, metavar="ID", help="stream id: results go to <prefix>:frames:ID")
    parser.add_argument("--fps", type=float, help="sample the source at most at this rate")
    parser.add_argument("--policy", choices=("block", "drop_oldest"), help="backpressure (default: by source kind)")
    parser.add_argument("--redis-url", help="the pipeline's redis:// or rediss:// URL (default: the local server)")
    parser.add_argument("--prefix", help=f"key prefix of the running pipeline (default: {DEFAULT_PREFIX})")
    parser.add_argument("--config", type=Path, help="the pipeline's YAML/JSON config file (for its redis section)")


def run(args: argparse.Namespace) -> int:
    source = {"id": args.source_id, "url": args.source, "fps": args.fps, "policy": args.policy}
    redis = {key: value for key, value in (("url", args.redis_url), ("prefix", args.prefix)) if value is not None}
    try:
        # The pipeline's own validation: a bad id, URL or fps never reaches the stream.
        config = load_config(args.config, overrides={"sources": [source], "redis": redis})
    except ConfigError as e:
        print(f"cdetr submit: {e}", file=sys.stderr)
        return 2
    try:
        # No embedded server here: a pipeline to submit to already has its Redis running.
        sink = RedisSink(connect(config.redis.url or f"redis://{DEFAULT_HOST}:{DEFAULT_PORT}/0"), config.redis.prefix)
    except ConnectionError as e:
        print(f"cdetr submit: {e}", file=sys.stderr)
        return 1
    message = AddSource(op="add", source=config.sources[0])
    entry_id = sink.client.xadd(sink.control_key, {JSON_FIELD: message.model_dump_json(exclude_none=True)})
    print(f"cdetr submit: {args.source_id} sent to {sink.control_key} ({entry_id})", file=sys.stderr)
    return 0
