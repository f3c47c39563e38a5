"""An exported detector (model/export.py) run by ONNX Runtime or OpenVINO, called like the PyTorch model.

    model = ExportedDetector(path, config, "openvino", precision="bf16", num_threads=2)
    outputs = model(pixel_values, pixel_mask)   # {"logits", "pred_boxes"}: float32 torch tensors

The graph takes a pixel mask (`export_detector(with_mask=True)`): a batch without one gets a mask of ones, which
gives the same outputs as no mask, so one graph serves padded and unpadded batches. Both runtimes are optional
dependencies (extras `onnxruntime`, `openvino`), imported only when a model is made for them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model.config import ConditionalDetrConfig
from model.export import OUTPUTS

RUNTIMES = ("onnxruntime", "openvino")
# Our precision names -> OpenVINO's INFERENCE_PRECISION_HINT (the CPU plugin's precision for its matmuls/convs).
OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}

Run = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


class ExportedDetector:
    """`config`: the checkpoint's (labels for post-processing); `precision`: fp32, or with OpenVINO also bf16 and
    fp16; `num_threads`: the runtime's compute threads, as `torch.set_num_threads` for the PyTorch runtime."""

    def __init__(self, path: str | Path, config: ConditionalDetrConfig, runtime: str, precision: str = "fp32",
                 num_threads: int = 1):
        check_runtime_precision(runtime, precision)
        self.config = config
        self.runtime = runtime
        self.precision = precision
        make = _onnxruntime if runtime == "onnxruntime" else _openvino
        self._run = make(Path(path), precision, max(1, num_threads))

    def __call__(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if pixel_mask is None:
            pixel_mask = torch.ones((pixel_values.shape[0], *pixel_values.shape[-2:]), dtype=torch.int64)
        mask = pixel_mask.cpu().numpy().astype(np.int64, copy=False)
        # The check PyTorch's forward does and a graph cannot (ConditionalDetrModel._check_inputs).
        if not mask[:, 0, 0].all():
            raise ValueError("pixel_mask marks the top-left pixel of an image as padding; images are expected at "
                             "the top-left of the padded canvas with 1 on valid pixels")
        values = pixel_values.detach().cpu().float().contiguous().numpy()
        outputs = self._run({"pixel_values": values, "pixel_mask": mask})
        # A copy: OpenVINO's arrays are views of the request's buffers, which its next call overwrites.
        return {name: torch.from_numpy(np.array(value, dtype=np.float32)) for name, value in zip(OUTPUTS, outputs)}


def check_runtime_precision(runtime: str, precision: str) -> None:
    """ONNX Runtime's CPU kernels are float32 (it has no precision switch for a float32 graph); OpenVINO runs
    fp32, bf16 and fp16."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "onnxruntime" and precision != "fp32":
        raise ValueError(f"the onnxruntime runtime runs fp32 only, got precision {precision!r} (openvino runs bf16)")
    if precision not in OPENVINO_PRECISION:
        raise ValueError(f"precision must be one of {', '.join(OPENVINO_PRECISION)}, got {precision!r}")


def _onnxruntime(path: Path, precision: str, num_threads: int) -> Run:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(list(OUTPUTS), feeds)


def _openvino(path: Path, precision: str, num_threads: int) -> Run:
    import openvino

    compiled = openvino.Core().compile_model(str(path), "CPU", {
        "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision], "INFERENCE_NUM_THREADS": num_threads,
        # One request at a time (the worker's batches come one after another): all threads on it.
        "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = request.infer(feeds)
        return [results[compiled.output(name)] for name in OUTPUTS]
    return run
