"""`cdetr export`: a checkpoint's detector as an ONNX graph (model/export.py), checked against PyTorch."""
import argparse
import json
import sys
from pathlib import Path

from model.export import ExportMismatchError, export_detector
from model.segmentation import load_detector
from pipeline.config import ModelSettings
from pipeline.sample_video import parse_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, metavar="OUT.onnx")
    parser.add_argument("--model", type=Path, default=ModelSettings().path,
                        help="checkpoint dir or .pth (a segmentation checkpoint: its detector; the mask head is not "
                        "exported)")
    parser.add_argument("--no-mask", action="store_true",
                        help="a graph without the pixel_mask input, for batches of one frame size (no padding)")
    parser.add_argument("--size", type=parse_size, default=(160, 128), metavar="WxH",
                        help="frame size the export is traced and checked at (height and width stay dynamic)")


def run(args: argparse.Namespace) -> int:
    if not args.model.exists():
        print(f"cdetr export: model checkpoint {args.model} does not exist", file=sys.stderr)
        return 2
    if min(args.size) < 64:
        print(f"cdetr export: --size must be at least 64x64, got {args.size[0]}x{args.size[1]}", file=sys.stderr)
        return 2
    try:
        report = export_detector(load_detector(args.model), args.out, with_mask=not args.no_mask,
                                 size=args.size[::-1])
    except ExportMismatchError as e:
        print(f"cdetr export: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"path": str(report.path), "inputs": ["pixel_values"] + ["pixel_mask"] * report.with_mask,
                      "outputs": ["logits", "pred_boxes"], "max_abs_diff_vs_pytorch": report.max_abs_diff}))
    return 0
