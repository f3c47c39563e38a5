"""`cdetr sample-video`: the procedural shapes video of `model.training.shapes`, with its ground truth beside it."""
import argparse
from pathlib import Path

from model.training.shapes import write_sample_video


def parse_size(text: str) -> tuple[int, int]:
    """`1280x720` -> (1280, 720)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1280x720, got {text!r}") from None
    if width < 16 or height < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16x16, got {text!r}")
    return width, height


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, metavar="OUT.mp4")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=parse_size, default=(1280, 720), metavar="WxH")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=25,
                        help="frame rate; the shapes cover the same path in the same seconds at any rate")


def run(args: argparse.Namespace) -> int:
    path = write_sample_video(args.out, seconds=args.seconds, size=args.size, seed=args.seed, fps=args.fps)
    print(f"{path} (ground truth: {path}.gt.json)")
    return 0
