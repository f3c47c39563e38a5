"""ONNX export of the detector, checked against PyTorch before anything is written.

    export_detector(load_detector("model/weights/shapes-tiny"), "detector.onnx")   # or: cdetr export

The graph is `ConditionalDetrForObjectDetection.predict` without the loss: inputs `pixel_values` (B, 3, H, W) float32
and, by default, `pixel_mask` (B, H, W) int64 (1 on image pixels, as the processor makes it); outputs `logits`
(B, Q, num_labels) and `pred_boxes` (B, Q, 4), the two fields the post-processing reads. Batch size, height and
width are dynamic. torch's dynamo exporter (torch.export, then ONNX opset 18) traces the model unchanged: with a
mask, the forward always applies it when exported (`ConditionalDetrModel.extract_features`), so a padded batch gets
the same outputs as in PyTorch; the legacy TorchScript exporter is not used: it traced the "nothing is padded" branch
of the sample batch into the graph, silently wrong for padded batches. Without a mask (`with_mask=False`) the graph
is for batches of one frame size only.

What is exported of a segmentation model: its detector (`conditional_detr`), whose outputs are identical to a
detection model's. The mask head is not: which queries get a mask depends on their scores (pruned inference,
model/segmentation.py), and panoptic / instance masks stay with the PyTorch runtime.

Every export is run in ONNX Runtime on two batches before it is written: one padded batch of two frames and one frame
of another size (which catches a shape the trace fixed); `ExportMismatchError` if an output differs from PyTorch's
by more than `tolerance`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.conditional_detr import ConditionalDetrForObjectDetection
from model.segmentation import ConditionalDetrForSegmentation

logger = logging.getLogger(__name__)

OPSET = 18
OUTPUTS = ("logits", "pred_boxes")
# The contract of model/optimize.py for switches that keep float32: measured 4e-6 (shapes-tiny) and 1e-6 (R50).
TOLERANCE = 1e-4
# Changes whenever the exported graph would change for the same checkpoint (part of the cache key).
GRAPH_VERSION = "1"


class ExportMismatchError(RuntimeError):
    """The exported graph's outputs differ from PyTorch's: nothing was written."""


class DetectorGraph(nn.Module):
    """What the exported graph computes: a detector's logits and boxes (no loss, no auxiliary outputs)."""

    def __init__(self, detector: ConditionalDetrForObjectDetection):
        super().__init__()
        self.detector = detector

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        _, output = self.detector.predict(pixel_values, pixel_mask)
        return output.logits, output.pred_boxes


@dataclass(frozen=True)
class ExportReport:
    path: Path
    with_mask: bool
    max_abs_diff: dict[str, float]  # per output, the largest difference to PyTorch over the check batches


def export_detector(model: nn.Module, path: str | Path, with_mask: bool = True, size: tuple[int, int] = (128, 160),
                    tolerance: float = TOLERANCE) -> ExportReport:
    """Export `model`'s detector (a detection or segmentation model) to `path`, traced on (2, 3, *size) inputs, after
    checking it against PyTorch (module docstring). The model is put in eval mode and float32, as it is exported."""
    detector = model.conditional_detr if isinstance(model, ConditionalDetrForSegmentation) else model
    graph = DetectorGraph(detector).eval().float()
    batches = check_batches(detector.config.num_channels, size, with_mask)
    batch, height, width = (torch.export.Dim(name) for name in ("batch", "height", "width"))
    shapes = {"pixel_values": {0: batch, 2: height, 3: width}}
    if with_mask:
        shapes["pixel_mask"] = {0: batch, 1: height, 2: width}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed only once checked: a reader (another worker) never sees half a file.
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        draft = Path(scratch) / path.name
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # torch's exporter warns that equal dynamic axes share one name, which is what is meant here.
            warnings.filterwarnings("ignore", message="# The axis name")
            program = torch.onnx.export(graph, tuple(batches[0].values()), input_names=list(batches[0]),
                                        output_names=list(OUTPUTS), dynamic_shapes=shapes, opset_version=OPSET,
                                        dynamo=True, external_data=False, verbose=False)
            program.save(str(draft), external_data=False)
            diffs = _compare(graph, draft, batches)
        worst = {name: max(d[name] for d in diffs) for name in OUTPUTS}
        if any(value > tolerance for value in worst.values()):
            raise ExportMismatchError(f"the exported graph differs from PyTorch by {worst} (tolerance {tolerance}); "
                                      f"{path} was not written")
        os.replace(draft, path)
    logger.info("exported %s (pixel_mask: %s), outputs within %.1e of PyTorch", path, with_mask, max(worst.values()))
    return ExportReport(path=path, with_mask=with_mask, max_abs_diff=worst)


def check_batches(channels: int, size: tuple[int, int], with_mask: bool) -> list[dict[str, torch.Tensor]]:
    """The inputs an export is traced on (the first) and checked on: a batch of two frames of `size`, the second
    padded at the bottom and right (with a mask), and one frame of a different size."""
    height, width = size
    generator = torch.Generator().manual_seed(0)
    first = {"pixel_values": torch.randn(2, channels, height, width, generator=generator)}
    second = {"pixel_values": torch.randn(1, channels, height + 32, width - 32, generator=generator)}
    if with_mask:
        mask = torch.ones(2, height, width, dtype=torch.int64)
        mask[1, height * 3 // 4:] = 0
        mask[1, :, width * 2 // 3:] = 0
        first["pixel_mask"] = mask
        second["pixel_mask"] = torch.ones(1, height + 32, width - 32, dtype=torch.int64)
    return [first, second]


def _compare(graph: DetectorGraph, path: Path, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    import onnxruntime  # an optional dependency (the `onnxruntime` extra): imported when an export is checked

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs = []
    for inputs in batches:
        expected = graph(**inputs)
        actual = session.run(list(OUTPUTS), {name: value.numpy() for name, value in inputs.items()})
        diffs.append({name: float(np.abs(a - e.numpy()).max()) for name, a, e in zip(OUTPUTS, actual, expected)})
    return diffs


def cached_export(model: nn.Module, checkpoint: str | Path, cache_dir: str | Path) -> Path:
    """The checked graph (with mask) of `model`'s detector, loaded from `checkpoint`, in `cache_dir`, exported on
    first use. The file name holds a hash of the checkpoint's files, torch's version and GRAPH_VERSION, so a changed
    checkpoint or exporter exports again; concurrent workers may both export, and the last rename wins with an
    identical file."""
    checkpoint = Path(checkpoint)
    path = Path(cache_dir) / f"{checkpoint.stem}-{checkpoint_digest(checkpoint)[:16]}.onnx"
    if not path.is_file():
        export_detector(model, path)
    return path


def checkpoint_digest(checkpoint: Path) -> str:
    """sha256 over a checkpoint's files (a directory's, in name order, or one .pth) and what shapes the graph."""
    digest = hashlib.sha256(f"{torch.__version__} {GRAPH_VERSION}".encode())
    files = sorted(p for p in checkpoint.iterdir() if p.is_file()) if checkpoint.is_dir() else [checkpoint]
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
