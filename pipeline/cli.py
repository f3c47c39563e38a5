"""`cdetr`: a registry of subcommands, each a module with `add_arguments(parser)` and `run(args) -> int`.

Only the chosen command's module is imported (Ray, torch and PyAV are slow to import). To add a command, add one
line to COMMANDS.
Library code (`pipeline`, `model`) logs and never prints to stderr itself; here the command line decides what
reaches the terminal: INFO and above, as `cdetr: <message>`.
"""
import argparse
import importlib
import logging
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("pipeline.run_command", "run the streaming pipeline: sources -> Ray workers -> Redis Streams"),
    "subscribe": ("pipeline.subscriber", "print a source's FrameResults from Redis as JSON lines"),
    "submit": ("pipeline.submit", "add a source to a running pipeline (a message on its control stream)"),
    "detect": ("pipeline.detect", "detect on single images: JSON + rendered PNG"),
    "sample-video": ("pipeline.sample_video", "write a procedural shapes video with ground truth"),
    "render": ("pipeline.render", "annotated video of a source from its results in Redis"),
    "schema": ("pipeline.schema", "print the JSON Schema of the Redis wire format"),
    "probe": ("pipeline.probe", "open one source as the decoder does and report what it finds (no Ray, no Redis)"),
    "train": ("model.training.train", "train Conditional DETR on a COCO-format (shapes) dataset"),
    "eval": ("model.training.evaluate", "bbox/segm AP and panoptic quality of a model on a COCO-format dataset"),
    "bench": ("pipeline.bench_command", "run a benchmark script from bench/ (prints JSON)"),
    "export": ("pipeline.export_command", "export a checkpoint's detector to ONNX, checked against PyTorch"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    log_to_stderr()
    parser = argparse.ArgumentParser(prog="cdetr", description="Conditional DETR streaming video analytics")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(sub)
    args = parser.parse_args(argv)
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args)
    except BrokenPipeError:
        # The reader went away (`cdetr subscribe cam1 | head`): not an error. Point stdout at /dev/null so the
        # interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def log_to_stderr() -> None:
    """Show INFO and above from `pipeline` and `model` on stderr (what `cdetr` and `make demo` print)."""
    handler = logging.StreamHandler(sys.stderr)  # the current stderr, which tests capture
    handler.setFormatter(logging.Formatter("cdetr: %(message)s"))
    for name in ("pipeline", "model"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]  # replaces the one of an earlier main() in this process
        logger.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
