"""`model.optimize.optimize`: every switch that is on by default gives the unoptimized model's outputs within 1e-4.

The weights (randomized frozen batch-norm buffers, so a wrong fold shows) are saved by `transformers` and loaded
into ours; the input is a padded batch of two sizes. `compile` and `dtype` (off by default) have their own tests
(compile on a tiny ResNet-18 model: an R50 takes minutes to compile here). Speed is measured in bench/.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hf_reference import SMALL, make_hf_detector, padded_batch, randomize_, save_hf_v4
from transformers import ConditionalDetrConfig as HFConfig
from transformers import ConditionalDetrForSegmentation as HFSegmentation

from model.backbone import ConvEncoder, FrozenBatchNorm2d
from model.conditional_detr import ConditionalDetrForObjectDetection
from model.config import ConditionalDetrConfig
from model.optimize import InferenceOptions, fold_batch_norm, frames_to_device, optimize
from model.precision import Hardware, auto_precision, detect_hardware, resolve_precision
from model.segmentation import ConditionalDetrForSegmentation

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(unoptimized model, its outputs on the padded batch)."""
    directory = save_hf_v4(make_hf_detector("resnet50"), tmp_path_factory.mktemp("r50"))
    model = ConditionalDetrForObjectDetection.from_pretrained(directory).eval()
    with torch.inference_mode():
        return model, model(*padded_batch())


SWITCHES = [InferenceOptions(channels_last=False), InferenceOptions(fold_batch_norm=False), InferenceOptions()]


@pytest.mark.parametrize("options", SWITCHES, ids=repr)
def test_optimized_model_matches_unoptimized(reference, options):
    model, expected = reference
    optimized = optimize(copy.deepcopy(model), options)
    with torch.inference_mode():
        out = optimized(*padded_batch())
    assert (out.logits - expected.logits).abs().max().item() < TOLERANCE
    assert (out.pred_boxes - expected.pred_boxes).abs().max().item() < TOLERANCE
    assert torch.allclose(out.last_hidden_state, expected.last_hidden_state, atol=TOLERANCE)


def test_fold_batch_norm_removes_every_backbone_batch_norm(reference):
    model = copy.deepcopy(reference[0])
    # ResNet-50: the stem, 3 per bottleneck (16 of them) and one per stage's downsample = 1 + 48 + 4.
    assert fold_batch_norm(model) == 53
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert fold_batch_norm(model) == 0


def test_fold_refuses_a_training_batch_norm():
    # A backbone trained from scratch has plain BatchNorm2d; in training mode it normalizes with batch statistics.
    encoder = ConvEncoder(ConditionalDetrConfig(backbone="resnet18", frozen_batch_norm=False)).train()
    with pytest.raises(ValueError, match="training mode"):
        fold_batch_norm(encoder)


def _segmentation_model(tmp_path, seed: int) -> ConditionalDetrForSegmentation:
    """A small random ResNet-18 segmentation model, written by `transformers` and loaded by ours."""
    torch.manual_seed(seed)
    reference = HFSegmentation(HFConfig(**{**SMALL, "backbone": "resnet18", "d_model": 128})).eval()
    randomize_(reference, seed=seed)
    return ConditionalDetrForSegmentation.from_pretrained(save_hf_v4(reference, tmp_path)).eval()


@pytest.mark.parametrize("options", [InferenceOptions(), InferenceOptions(compile=True, batch_size=3)],
                         ids=["default", "compiled"])
def test_optimized_segmentation_model_matches_unoptimized(tmp_path, options):
    # The mask head reads the stride 4-16 backbone maps (FPN), which the fold and channels-last both touch; compiled,
    # it reads them from the compiled detector, cut from a batch padded to 3 frames.
    model = _segmentation_model(tmp_path, seed=1)
    batch = padded_batch()
    with torch.inference_mode():
        expected = model(*batch)
        out = optimize(copy.deepcopy(model), options)(*batch)
    torch.testing.assert_close(out.logits, expected.logits, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(out.pred_masks, expected.pred_masks, atol=TOLERANCE, rtol=0)


def test_autocast_runs_in_bfloat16_and_returns_float32(tmp_path):
    model = _segmentation_model(tmp_path, seed=2)
    batch = padded_batch()
    with torch.inference_mode():
        expected = model(*batch)
        out = optimize(copy.deepcopy(model), InferenceOptions(dtype=torch.bfloat16))(*batch)
    for name in ("logits", "pred_boxes", "pred_masks", "last_hidden_state"):
        value, full = getattr(out, name), getattr(expected, name)
        assert value.dtype == torch.float32, name  # post-processing sees float32
        assert not torch.equal(value, full), name  # ... computed in bfloat16
    # bf16 keeps ~3 significant digits: close (here logits 0.08, boxes 0.02 at most), not within 1e-4.
    torch.testing.assert_close(out.pred_boxes, expected.pred_boxes, atol=0.05, rtol=0)
    torch.testing.assert_close(out.logits, expected.logits, atol=0.25, rtol=0)


def test_compiled_detector_is_one_graph_for_every_batch_size():
    from torch._dynamo.utils import counters

    torch.manual_seed(3)
    model = ConditionalDetrForObjectDetection(ConditionalDetrConfig(
        backbone="resnet18", d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10,
        frozen_batch_norm=False)).eval()
    eager = optimize(copy.deepcopy(model))
    compiled = optimize(copy.deepcopy(model), InferenceOptions(compile=True, batch_size=4))
    torch.compiler.reset()
    counters.clear()

    def check(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> None:
        out, expected = compiled(pixel_values, pixel_mask), eager(pixel_values, pixel_mask)
        assert out.logits.shape == (len(pixel_values), 10, model.config.num_labels)
        torch.testing.assert_close(out.logits, expected.logits, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(out.pred_boxes, expected.pred_boxes, atol=TOLERANCE, rtol=0)

    with torch.inference_mode():
        # Video batches (no mask): batches of 1-4 frames are one compilation of one graph, with no host sync
        # breaking it (what lets CUDA replay the whole detector as one graph).
        for size in (1, 3, 4, 2):
            check(torch.randn(size, 3, 64, 96), None)
        assert counters["stats"]["unique_graphs"] == 1
        assert not counters["graph_break"]
        # A padded batch still gets the right outputs (its mask's host syncs split the graph).
        for size in (3, 1):
            pixel_mask = torch.ones(size, 64, 96, dtype=torch.long)
            pixel_mask[-1, :, 80:] = 0  # one padded frame, as the processor makes them
            check(torch.randn(size, 3, 64, 96), pixel_mask)


def test_frames_to_device_copies_read_only_frames():
    frames = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    frames.flags.writeable = False  # as arrays from Ray's object store arrive
    moved = frames_to_device(frames, "cpu")
    assert moved.dtype == torch.uint8 and moved.shape == (2, 4, 6, 3)
    assert np.array_equal(moved.numpy(), frames)
    moved[0, 0, 0, 0] = 255  # a copy: writable, and the source is untouched
    assert frames[0, 0, 0, 0] == 0


@pytest.mark.parametrize("hardware, runtime, expected", [
    (Hardware("cpu", frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})), "torch", "bf16"),
    (Hardware("cpu", frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})), "openvino", "bf16"),
    (Hardware("cpu", frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})), "onnxruntime", "fp32"),
    (Hardware("cpu", frozenset({"avx512f", "avx512_bf16"})), "torch", "fp32"),  # bf16 faster on some, slower on others
    (Hardware("cpu", frozenset({"avx2", "fma"})), "torch", "fp32"),
    (Hardware("cpu"), "openvino", "fp32"),  # flags unknown (not Linux): nothing fast is assumed
    (Hardware("cuda", cuda_capability=(9, 0)), "torch", "bf16"),
    (Hardware("cuda", cuda_capability=(7, 5)), "torch", "fp32"),
], ids=["amx", "amx-openvino", "amx-onnxruntime", "avx512_bf16", "avx2", "unknown", "hopper", "turing"])
def test_auto_precision_follows_the_hardware(hardware, runtime, expected):
    assert auto_precision(hardware, runtime) == expected
    assert resolve_precision("auto", hardware, runtime) == expected
    assert resolve_precision("fp16", hardware, runtime) == "fp16"  # a named precision is taken as given


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    hardware = detect_hardware("cpu", cpuinfo)
    assert hardware.cpu_flags == {"fpu", "avx512_bf16", "amx_bf16", "amx_tile"} and hardware.cpu_kind == "amx"
    assert detect_hardware("cpu", tmp_path / "missing").cpu_kind == "none"
    # This machine's own answer, whatever it is, is one of the three kinds.
    assert detect_hardware("cpu").cpu_kind in ("amx", "avx512_bf16", "none")
