"""model/export.py and model/runtime.py: the exported detector in ONNX Runtime and OpenVINO against PyTorch.

A tiny random detector, its frames through the real processor at 64x96 model size (the graph was traced at 128x160:
height and width are dynamic), batches of 2 and 3 with and without padding. fp32 runtimes must match PyTorch within
TOLERANCE; bf16 is judged against fp32 in the same test, never by its digits (they differ by CPU).
"""
from __future__ import annotations

import json

import pytest
import torch

from model import ConditionalDetrImageProcessor
from model.export import TOLERANCE, ExportMismatchError, cached_export, export_detector
from model.runtime import ExportedDetector, check_runtime_precision
from model.segmentation import load_detector
from pipeline.cli import main


@pytest.fixture(scope="module")
def detector(tiny_model):
    return load_detector(tiny_model).eval()


@pytest.fixture(scope="module")
def exported(detector, tiny_model, tmp_path_factory):
    return cached_export(detector, tiny_model, tmp_path_factory.mktemp("onnx-cache"))


def padded_batch(tiny_model) -> dict[str, torch.Tensor]:
    """A landscape and a portrait frame on one 96x96 canvas: each padded by a third (a row / column of the last
    feature map), the first at the bottom, the second at the right."""
    processor = ConditionalDetrImageProcessor.from_pretrained(tiny_model)
    generator = torch.Generator().manual_seed(1)
    frames = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
              for shape in ((60, 90, 3), (90, 60, 3))]
    inputs = processor.preprocess_frames(frames)
    assert inputs["pixel_mask"].shape == (2, 96, 96) and not inputs["pixel_mask"][1].all()
    return inputs


def largest_difference(actual: dict[str, torch.Tensor], expected) -> float:
    return max((actual[name] - getattr(expected, name)).abs().max().item() for name in ("logits", "pred_boxes"))


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_exported_graph_matches_pytorch_on_a_padded_batch(detector, exported, tiny_model, runtime):
    inputs = padded_batch(tiny_model)
    with torch.inference_mode():
        expected = detector(inputs["pixel_values"], inputs["pixel_mask"])
        unmasked = detector(inputs["pixel_values"])
    model = ExportedDetector(exported, detector.config, runtime)
    assert largest_difference(model(inputs["pixel_values"], inputs["pixel_mask"]), expected) < TOLERANCE
    # The mask matters for the padded frame: a graph with "no padding" baked in would give these outputs.
    assert (unmasked.logits[1] - expected.logits[1]).abs().max().item() > 100 * TOLERANCE


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_exported_graph_takes_any_batch_and_frame_size_without_a_mask(detector, exported, runtime):
    pixel_values = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = detector(pixel_values)
    model = ExportedDetector(exported, detector.config, runtime)
    assert largest_difference(model(pixel_values), expected) < TOLERANCE


def test_openvino_bf16_stays_near_fp32(detector, exported, tiny_model):
    inputs = padded_batch(tiny_model)
    fp32 = ExportedDetector(exported, detector.config, "openvino", "fp32")(inputs["pixel_values"],
                                                                           inputs["pixel_mask"])
    bf16 = ExportedDetector(exported, detector.config, "openvino", "bf16")(inputs["pixel_values"],
                                                                           inputs["pixel_mask"])
    difference = max((bf16[name] - fp32[name]).abs().max().item() for name in fp32)
    print(f"OpenVINO bf16 vs fp32, largest output difference: {difference:.2e}")
    # bf16 keeps 8 mantissa bits: outputs move by ~1e-2 on a CPU that computes in bf16, by 0 on one that falls
    # back to fp32; either way nowhere near a different detection.
    assert difference < 0.25


def test_a_padded_frame_with_its_corner_masked_is_refused(detector, exported, tiny_model):
    inputs = padded_batch(tiny_model)
    inputs["pixel_mask"][0, 0, 0] = 0
    with pytest.raises(ValueError, match="top-left"):
        ExportedDetector(exported, detector.config, "onnxruntime")(inputs["pixel_values"], inputs["pixel_mask"])


def test_cached_export_is_reused(detector, tiny_model, exported):
    written = exported.stat().st_mtime_ns
    assert cached_export(detector, tiny_model, exported.parent) == exported
    assert exported.stat().st_mtime_ns == written


def test_runtime_precisions_each_runtime_runs():
    check_runtime_precision("openvino", "bf16")
    with pytest.raises(ValueError, match="fp32 only"):
        check_runtime_precision("onnxruntime", "bf16")
    with pytest.raises(ValueError, match="runtime must be one of"):
        check_runtime_precision("tensorrt", "fp32")


def test_cdetr_export_without_mask_checks_the_graph_and_refuses_a_mismatch(tiny_model, detector, tmp_path,
                                                                           capsys):
    # The graph for unpadded batches only: no pixel_mask input.
    out = tmp_path / "detector.onnx"
    assert main(["export", str(out), "--model", str(tiny_model), "--no-mask"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"] == ["pixel_values"] and max(report["max_abs_diff_vs_pytorch"].values()) < TOLERANCE
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        expected = detector(pixel_values).logits
    logits, _ = session.run(None, {"pixel_values": pixel_values.numpy()})
    assert (torch.from_numpy(logits) - expected).abs().max().item() < TOLERANCE
    # A tolerance no float32 graph meets stands for a wrong graph: refused, nothing written.
    refused = tmp_path / "refused.onnx"
    with pytest.raises(ExportMismatchError, match="was not written"):
        export_detector(detector, refused, with_mask=False, tolerance=0.0)
    assert not refused.exists() and list(tmp_path.iterdir()) == [out]
