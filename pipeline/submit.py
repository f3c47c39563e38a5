"""`cdetr submit`: add a source to a running pipeline (one started with `keep_running`).

It only writes one validated `add` message to the control stream (`<prefix>:control`); the running `cdetr run`
starts the source, or reports an `error` event in `<prefix>:events` (for example, an id that is already running).
Redis URL and prefix come from the same layers as `cdetr run`'s (--config, `CDETR_REDIS__*`, then the flags), so
on a cluster's head the URL is taken from the environment and never typed.

The message stays in the control stream, so a camera password written into the URL would rest there in plain text:
such a URL is refused unless `--allow-inline-password` says so, and the password goes by reference instead,
`${NAME}`, which the decoder fills in from its node's environment (docs/security.md).
"""
import argparse
import re
import sys
from pathlib import Path

from pipeline import analytics_flags
from pipeline.config import ConfigError, load_config
from pipeline.redis_server import DEFAULT_HOST, DEFAULT_PORT
from pipeline.schema import AddSource
from pipeline.sink import RedisSink, connect
from pipeline.sources import inline_password, redact, split_userinfo
from pipeline.wire import DEFAULT_PREFIX, JSON_FIELD


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="file path (as the cluster's nodes see it) or http(s)/rtsp/udp/tcp URL")
    parser.add_argument("--source-id", required=True, metavar="ID", help="stream id: results go to <prefix>:frames:ID")
    parser.add_argument("--fps", type=float, help="sample the source at most at this rate")
    parser.add_argument("--policy", choices=("block", "drop_oldest"), help="backpressure (default: by source kind)")
    parser.add_argument("--no-tracking", action="store_true",
                        help="no tracker for this source: track_id and analytics are null")
    analytics_flags.add_arguments(parser, per_source=False)
    parser.add_argument("--redis-url",
                        help="the pipeline's redis://, rediss:// or redis+sentinel:// URL (default: the local server)")
    parser.add_argument("--prefix", help=f"key prefix of the running pipeline (default: {DEFAULT_PREFIX})")
    parser.add_argument("--config", type=Path, help="the pipeline's YAML/JSON config file (for its redis section)")
    parser.add_argument("--allow-inline-password", action="store_true",
                        help="send a URL with its password written out; it is then stored in plain text in "
                        "<prefix>:control (default: refused; write the password as ${ENV_NAME} instead)")


def run(args: argparse.Namespace) -> int:
    source = {"id": args.source_id, "url": args.source, "fps": args.fps, "policy": args.policy,
              "tracking": False if args.no_tracking else None, "lines": args.line, "zones": args.zone}
    redis = {key: value for key, value in (("url", args.redis_url), ("prefix", args.prefix)) if value is not None}
    try:
        # The pipeline's own validation: a bad id, URL or fps never reaches the stream.
        config = load_config(args.config, overrides={"sources": [source], "redis": redis})
    except ConfigError as e:
        print(f"cdetr submit: {e}", file=sys.stderr)
        return 2
    if inline_password(args.source) and not args.allow_inline_password:
        print(_refusal(args.source, args.source_id, config.redis.prefix), file=sys.stderr)
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
    if args.allow_inline_password and inline_password(args.source):
        print(f"cdetr submit: its password is stored in plain text in {sink.control_key}", file=sys.stderr)
    return 0


def _refusal(url: str, source_id: str, prefix: str) -> str:
    """Why an inline password is refused, and the URL with a reference in its place."""
    name = re.sub(r"[^A-Z0-9]", "_", source_id.upper()) + "_PASSWORD"
    name = f"SOURCE_{name}" if name[0].isdigit() else name  # environment variable names start with a letter
    head, userinfo, rest = split_userinfo(url)
    user = userinfo.partition(":")[0]
    return (f"cdetr submit: {redact(url)} has its password written out, which would be stored in plain text in "
            f"{prefix}:control. Pass it by reference instead:\n  {head}{user}:${{{name}}}{rest}\n"
            f"and set {name} in the environment of the nodes that run decoders (on Kubernetes, from a Secret; "
            f"docs/security.md). To store it anyway, add --allow-inline-password.")
