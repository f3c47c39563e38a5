"""`model.inference.optimize`: every switch that keeps accuracy gives the unoptimized model's outputs within 1e-4.

The weights (ResNet-50, randomized frozen batch-norm buffers, so a wrong fold shows) are saved by `transformers`
and loaded into ours; the input is a padded batch of two sizes. Speed is measured in bench/bench_model.py.
"""
from __future__ import annotations

import copy

import pytest
import torch

from hf_reference import make_hf_detector, padded_batch, save_hf_v4
from model.backbone import ConvEncoder, FrozenBatchNorm2d
from model.conditional_detr import ConditionalDetrForObjectDetection
from model.config import ConditionalDetrConfig
from model.inference import InferenceOptions, fold_batch_norm, optimize

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
