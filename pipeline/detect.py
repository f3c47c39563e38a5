"""`cdetr detect`: the worker's model and post-processing on single images, without Ray or Redis.

Each image gives `<out>/<name>.json` (a FrameResult, the same format as in Redis, frame_index 0) and
`<out>/<name>.png` (the image with its detections drawn).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.config import ModelSettings
from pipeline.render import annotate
from pipeline.schema import FrameResult
from pipeline.worker import Detector, check_model_path


def detect_image(detector: Detector, path: Path) -> FrameResult:
    try:
        image = Image.open(path).convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    frame = torch.from_numpy(np.array(image))
    started = time.time()
    [(detections, panoptic)], timings = detector([frame], [(image.height, image.width)])
    return FrameResult(source_id=path.stem, frame_index=0, pts=None, captured_at=started, width=image.width,
                       height=image.height, model=detector.name, detections=detections, panoptic=panoptic,
                       timings_ms=timings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--model", type=Path, default=ModelSettings().path, help="checkpoint dir or .pth")
    parser.add_argument("--panoptic", action="store_true", help="also run the panoptic head")
    parser.add_argument("--instance-masks", action="store_true",
                        help="also attach a COCO RLE mask to each detection (segmentation checkpoint)")
    parser.add_argument("--threshold", type=float, default=ModelSettings().threshold)
    parser.add_argument("--out", type=Path, default=Path("out"), help="directory for the JSON and PNG files")


def run(args: argparse.Namespace) -> int:
    settings = ModelSettings(path=args.model, panoptic=args.panoptic, instance_masks=args.instance_masks,
                             threshold=args.threshold)
    try:
        check_model_path(settings)
    except (FileNotFoundError, ValueError) as e:
        print(f"cdetr detect: {e}", file=sys.stderr)
        return 2
    detector = Detector(settings)
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for path in args.images:
        try:
            result = detect_image(detector, path)
        except ValueError as e:
            print(f"cdetr detect: {e}", file=sys.stderr)
            status = 1
            continue
        (args.out / f"{path.stem}.json").write_text(result.model_dump_json(indent=2))
        annotate(Image.open(path), result).save(args.out / f"{path.stem}.png")
        print(result.model_dump_json())
    return status
