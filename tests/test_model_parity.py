"""Numerical parity of our Conditional DETR with `transformers` 5.24 on the same (random) weights.

Weights are created and saved by `transformers` itself in both key layouts it produces: `save_pretrained` writes
the v4 layout (the hub checkpoint's), the in-memory `state_dict()` is the v5 layout. Inputs are two images of
different sizes padded into one batch, so the padding mask path is exercised.
"""
from __future__ import annotations

import math

import pytest
import torch
from hf_reference import HFDetection, make_hf_detector, padded_batch, save_hf_v4, save_hf_v5
from safetensors import safe_open

from model.conditional_detr import ConditionalDetrForObjectDetection, ConditionalDetrModel
from model.config import ConditionalDetrConfig
from model.position_encoding import PositionEmbeddingSine

TOLERANCE = 1e-4
BACKBONES = {"R50": ("resnet50", False), "R50-DC5": ("resnet50", True), "R101": ("resnet101", False)}
SAVERS = {"v4": save_hf_v4, "v5": save_hf_v5}


@pytest.fixture(scope="module", params=list(BACKBONES))
def reference(request, tmp_path_factory):
    """(backbone name, HF outputs on the padded batch, {layout: checkpoint dir}, HF model)."""
    backbone, dilation = BACKBONES[request.param]
    hf = make_hf_detector(backbone, dilation)
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        expected = hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
    dirs = {name: save(hf, tmp_path_factory.mktemp(f"{request.param}-{name}")) for name, save in SAVERS.items()}
    return request.param, expected, dirs, hf


@pytest.mark.parametrize("layout", list(SAVERS))
def test_detection_matches_transformers(reference, layout, record_property):
    name, expected, dirs, hf = reference
    model = ConditionalDetrForObjectDetection.from_pretrained(dirs[layout])
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():  # the staged forward (what the segmentation head uses); == forward(), see below
        features = model.model.extract_features(pixel_values, pixel_mask)
        memory = model.model.encode(features)
        out = model.detection_output(*model.model.decode(memory, features), memory)
    logits_diff = (out.logits - expected.logits).abs().max().item()
    boxes_diff = (out.pred_boxes - expected.pred_boxes).abs().max().item()
    record_property("max_abs_diff", {"backbone": name, "layout": layout, "logits": logits_diff, "boxes": boxes_diff})
    print(f"{name} {layout}: max |dlogits| {logits_diff:.2e}, max |dboxes| {boxes_diff:.2e}")
    assert out.logits.shape == expected.logits.shape and out.pred_boxes.shape == expected.pred_boxes.shape
    assert logits_diff < TOLERANCE and boxes_diff < TOLERANCE
    assert torch.allclose(out.last_hidden_state, expected.last_hidden_state, atol=TOLERANCE)
    assert torch.allclose(out.encoder_last_hidden_state, expected.encoder_last_hidden_state, atol=TOLERANCE)
    # Reference points: ours (B, Q, 2) = sigmoid(ref_point_head(learned queries)), the same for every image
    # (HF's base-model output holds them as (Q, B, 2): docs/reference-compatibility.md, Q1).
    with torch.no_grad():
        hf_points = hf.model.decoder.ref_point_head(hf.model.query_position_embeddings.weight).sigmoid()
    assert torch.allclose(out.reference_points, hf_points.expand(2, -1, -1), atol=TOLERANCE)
    strides = [pixel_values.shape[-1] // f.shape[-1] for f in features.feature_maps]
    assert strides == ([4, 8, 16, 16] if name == "R50-DC5" else [4, 8, 16, 32])


def test_layouts_are_what_transformers_writes(reference):
    """`save_pretrained` of transformers 5.24 reverts its renames (v4 keys); the live state_dict has v5 keys."""
    _, _, dirs, _ = reference
    with safe_open(dirs["v4"] / "model.safetensors", "pt") as f:
        v4_keys = set(f.keys())
    with safe_open(dirs["v5"] / "model.safetensors", "pt") as f:
        v5_keys = set(f.keys())
    assert "model.backbone.conv_encoder.model.conv1.weight" in v4_keys
    assert "model.decoder.layers.0.ca_qpos_proj.weight" in v4_keys
    assert "model.decoder.layers.1.ca_qpos_proj.weight" not in v4_keys
    assert "model.backbone.model.conv1.weight" in v5_keys
    assert "model.decoder.layers.0.encoder_attn.q_pos_proj.weight" in v5_keys


def test_saved_checkpoint_loads_in_transformers(tmp_path):
    """Our `save_pretrained` output (config.json + v4 safetensors) loads offline in transformers, same numbers."""
    hf = make_hf_detector("resnet50", seed=3)
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        expected = hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
    ours = ConditionalDetrForObjectDetection.from_pretrained(save_hf_v5(hf, tmp_path / "hf"))
    ours.save_pretrained(tmp_path / "ours")
    reloaded = HFDetection.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = reloaded(pixel_values=pixel_values, pixel_mask=pixel_mask)
    assert torch.allclose(again.logits, expected.logits, atol=TOLERANCE)
    assert torch.allclose(again.pred_boxes, expected.pred_boxes, atol=TOLERANCE)


def test_narrow_resnet18_model_matches_transformers(tmp_path):
    """Nothing hard-codes 256: d_model 128, ResNet-18, 3+3 layers, 20 queries, 4 heads."""
    hf = make_hf_detector("resnet18", d_model=128, encoder_layers=3, decoder_layers=3, num_queries=20,
                          encoder_attention_heads=4, decoder_attention_heads=4)
    pixel_values, pixel_mask = padded_batch(seed=1)
    with torch.no_grad():
        expected = hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
    model = ConditionalDetrForObjectDetection.from_pretrained(save_hf_v4(hf, tmp_path))
    with torch.no_grad():
        out = model(pixel_values, pixel_mask)
    assert out.logits.shape == (2, 20, 7)
    assert torch.allclose(out.logits, expected.logits, atol=TOLERANCE)
    assert torch.allclose(out.pred_boxes, expected.pred_boxes, atol=TOLERANCE)


@pytest.mark.parametrize("save", [save_hf_v4, save_hf_v5])
def test_learned_position_embedding_matches_transformers(tmp_path, save):
    hf = make_hf_detector("resnet18", position_embedding_type="learned", seed=2)
    pixel_values, pixel_mask = padded_batch(seed=2)
    with torch.no_grad():
        expected = hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
    model = ConditionalDetrForObjectDetection.from_pretrained(save(hf, tmp_path))
    assert model.config.position_embedding_type == "learned"
    with torch.no_grad():
        out = model(pixel_values, pixel_mask)
    assert torch.allclose(out.logits, expected.logits, atol=TOLERANCE)
    assert torch.allclose(out.pred_boxes, expected.pred_boxes, atol=TOLERANCE)


@pytest.fixture(scope="module")
def tiny_config():
    return ConditionalDetrConfig(backbone="resnet18", d_model=64, encoder_layers=2, decoder_layers=3,
                                 encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_labels=4)


def test_auxiliary_loss_does_not_change_inference(tiny_config):
    """We follow the original (docs/reference-compatibility.md, Q2): aux outputs come from normalized copies; the
    final output is unchanged."""
    torch.manual_seed(0)
    plain = ConditionalDetrForObjectDetection(tiny_config).eval()
    aux_config = ConditionalDetrConfig.from_dict(tiny_config.to_dict(), auxiliary_loss=True)
    with_aux = ConditionalDetrForObjectDetection(aux_config).eval()
    with_aux.load_state_dict(plain.state_dict())
    pixel_values, pixel_mask = padded_batch(sizes=((64, 96), (96, 64)))
    with torch.no_grad():
        a, b = plain(pixel_values, pixel_mask), with_aux(pixel_values, pixel_mask)
    assert a.auxiliary_outputs is None
    assert len(b.auxiliary_outputs) == tiny_config.decoder_layers - 1
    assert b.auxiliary_outputs[0]["logits"].shape == a.logits.shape
    assert torch.equal(a.logits, b.logits) and torch.equal(a.pred_boxes, b.pred_boxes)
    assert not torch.allclose(b.auxiliary_outputs[0]["logits"], b.logits)


def test_original_initialization(tiny_config):
    """Focal prior on class biases; zero last box layer → initial boxes are (ref_x, ref_y, 0.5, 0.5)."""
    model = ConditionalDetrForObjectDetection(tiny_config).eval()
    with torch.no_grad():
        out = model(*padded_batch(sizes=((64, 64), (64, 32))))
    assert torch.allclose(model.class_labels_classifier.bias, torch.full((4,), -4.59512), atol=1e-4)
    assert torch.allclose(out.pred_boxes[..., :2], out.reference_points, atol=1e-5)
    assert torch.allclose(out.pred_boxes[..., 2:], torch.full_like(out.pred_boxes[..., 2:], 0.5))


def test_unpadded_batch_equals_all_ones_mask(tiny_config):
    model = ConditionalDetrForObjectDetection(tiny_config).eval()
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a = model(pixel_values)
        b = model(pixel_values, torch.ones(2, 64, 96, dtype=torch.int64))
    assert torch.equal(a.logits, b.logits)


def test_sine_embedding_ignores_padding():
    """The sine embedding counts valid pixels only, so an image's embedding does not depend on its batch's padding
    (the backbone's receptive field still sees the padding border; that part is inherent to DETR batching)."""
    embed = PositionEmbeddingSine(32)
    mask = torch.zeros(1, 6, 5, dtype=torch.bool)
    mask[:, :4, :3] = True
    alone = embed(torch.ones(1, 4, 3, dtype=torch.bool))
    assert torch.allclose(embed(mask)[..., :4, :3], alone, atol=1e-6)
    # (y, x) order and the normalization: the last valid row/column reaches 2π.
    assert torch.allclose(alone[0, 0, -1, 0], torch.tensor(2 * math.pi).sin(), atol=1e-5)
    assert torch.allclose(alone[0, 32, 0, -1], torch.tensor(2 * math.pi).sin(), atol=1e-5)


def test_segmentation_hooks_expose_intermediates(tiny_config):
    """The staged forward gives the 4 stage maps, the last-map mask, the projection, memory, states, heads."""
    model = ConditionalDetrForObjectDetection(tiny_config).eval()
    pixel_values, pixel_mask = padded_batch(sizes=((64, 96), (96, 64)))
    with torch.no_grad():
        features = model.model.extract_features(pixel_values, pixel_mask)
        memory = model.model.encode(features)
        hidden_states, reference_points = model.model.decode(memory, features)
        staged = model.detection_output(hidden_states, reference_points, memory)
        direct = model(pixel_values, pixel_mask)
    assert [f.shape[1] for f in features.feature_maps] == [64, 128, 256, 512]
    assert features.mask.shape == (2, 3, 3) and features.mask.dtype == torch.bool
    assert not features.mask[0, 2, :].any() and features.mask[0, :2, :].all()
    assert features.projected.shape == (2, 64, 3, 3) and memory.shape == (2, 9, 64)
    assert hidden_states.shape == (1, 2, 10, 64)
    assert torch.equal(staged.logits, direct.logits) and torch.equal(staged.pred_boxes, direct.pred_boxes)


def test_plain_batch_norm_and_plain_cross_attention_train(tiny_config):
    """Training-from-scratch options: plain BN (backbone fully trainable) and DETR cross-attention both learn."""
    config = ConditionalDetrConfig.from_dict(tiny_config.to_dict(), frozen_batch_norm=False,
                                             conditional_cross_attention=False)
    model = ConditionalDetrForObjectDetection(config).train()
    assert isinstance(model.model.backbone.conv_encoder.model.bn1, torch.nn.BatchNorm2d)
    assert all(layer.ca_qpos_sine_proj is None and layer.ca_qpos_proj is not None
               for layer in model.model.decoder.layers)
    out = model(*padded_batch(sizes=((64, 64), (64, 64))))
    (out.logits.sum() + out.pred_boxes.sum()).backward()
    assert model.model.backbone.conv_encoder.model.conv1.weight.grad is not None
    assert model.model.decoder.layers[2].ca_qpos_proj.weight.grad.abs().sum() > 0


def test_frozen_backbone_stem(tiny_config):
    model = ConditionalDetrForObjectDetection(tiny_config)
    backbone = model.model.backbone.conv_encoder.model
    assert not backbone.conv1.weight.requires_grad and not any(p.requires_grad for p in backbone.layer1.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    assert not any(name.startswith("fc") for name, _ in backbone.named_parameters())


def test_bad_inputs_are_named(tiny_config):
    model = ConditionalDetrModel(tiny_config).eval()
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="normalized float"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pixel_mask must have shape"):
        model(torch.randn(1, 3, 64, 64), torch.ones(1, 32, 64))
    with pytest.raises(ValueError, match="top-left pixel"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64))
