"""`cdetr probe URL`: open one source exactly as the pipeline's decoder does (its options, transports, timeouts,
`${NAME}` passwords), without Ray or Redis, and print what an operator needs: reachable or not and why, codec,
size, frame rate, the RTSP transport used, and how long the open and the first frame took.

Exit status: 0 when a frame was decoded, 1 when not, 2 for a URL or option the configuration refuses."""
import argparse
import json
import time

from pipeline.config import ConfigError, DecoderConfig, SourceConfig, validate_config
from pipeline.decoder import StreamDecoder
from pipeline.sources import redact

_SIZE = {"shortest_edge": 64, "longest_edge": 96}  # frames are only counted: the smallest conversion will do


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="source URL or path, as in a source's `url` (a password may be ${ENV_NAME})")
    parser.add_argument("--transport", choices=("auto", "tcp", "udp"), default="auto", help="RTSP transport")
    parser.add_argument("--ca-file", help="CA certificates (PEM) for an https:// or rtsps:// server")
    parser.add_argument("--open-timeout", type=float, default=DecoderConfig().open_timeout_s, metavar="S",
                        help="decoder.open_timeout_s")
    parser.add_argument("--read-timeout", type=float, default=DecoderConfig().read_timeout_s, metavar="S",
                        help="decoder.read_timeout_s")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        config = validate_config({"sources": [{"id": "probe", "url": args.url, "transport": args.transport,
                                               "ca_file": args.ca_file}],
                                  "decoder": {"open_timeout_s": args.open_timeout,
                                              "read_timeout_s": args.read_timeout}})
    except ConfigError as e:
        print(e)
        return 2
    report = probe(config.sources[0], config.decoder)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key + ':':<16} {'-' if value is None else value}")
    return 0 if report["reachable"] else 1


def probe(source: SourceConfig, cfg: DecoderConfig) -> dict:
    """Open `source` with a StreamDecoder and wait for its first frame or first failure (whatever the decoder would
    report as `reconnecting`, `auth_failed` or `error`). Returns the report; nothing in it holds a password."""
    started_at = time.time()
    decoder = StreamDecoder(source, _SIZE, cfg.model_copy(update={"buffer_size": 1}))
    wait_s = cfg.open_timeout_s + cfg.read_timeout_s + 5
    deadline = time.monotonic() + wait_s
    opened, failure, first_frame_at, ended = None, None, None, False
    try:
        while first_frame_at is None and failure is None and not ended and time.monotonic() < deadline:
            info, _ = decoder.read(1, wait_s=0.2)
            for event in info.events:
                if event.type == "started":
                    opened = event
                elif event.type in ("reconnecting", "auth_failed", "error") and failure is None:
                    failure = event
            if info.frames:
                first_frame_at = info.frames[0].captured_at
            ended = info.finished
    finally:
        decoder.stop()
    if first_frame_at is not None:
        error = None
    elif failure is not None:
        error = failure.message
    else:
        error = "the source ended before its first frame" if ended else f"no frame within {wait_s:g} s"
    details = opened.details if opened is not None else {}
    return {
        "url": redact(source.url), "reachable": first_frame_at is not None, "live": source.live, "error": error,
        "auth_failed": failure is not None and failure.type == "auth_failed",
        "codec": details.get("codec"), "width": details.get("width"), "height": details.get("height"),
        "fps": details.get("fps"), "transport": details.get("transport"),
        "open_s": round(opened.at - started_at, 3) if opened is not None else None,
        "first_frame_s": round(first_frame_at - started_at, 3) if first_frame_at is not None else None,
    }
