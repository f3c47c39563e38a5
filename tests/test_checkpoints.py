"""Checkpoint formats: original Atten4Vis .pth, pytorch_model.bin, config.json generations, and clear errors."""
from __future__ import annotations

import argparse
import json
import re

import pytest
import torch
from hf_reference import make_hf_detector, padded_batch, save_hf_v4
from safetensors.torch import load_file, save_file
from transformers import ConditionalDetrConfig as HFConfig

from model.checkpoint import detect_layout
from model.conditional_detr import ConditionalDetrForObjectDetection, ConditionalDetrModel
from model.config import ConditionalDetrConfig

TOLERANCE = 1e-4

# v4 → original key renames, written independently of model/checkpoint.py (docs/checkpoint-formats.md,
# "original .pth", read backwards).
TO_ORIGINAL = (
    (r"^model\.backbone\.conv_encoder\.model\.", "backbone.0.body."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.(encoder|decoder)\.", r"transformer.\1."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
    (r"\.fc([12])\.", r".linear\1."),
    (r"(encoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"(decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    (r"\.encoder_attn\.out_proj\.", ".cross_attn.out_proj."),
)


def to_original(v4: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in v4.items():
        fused = re.match(r"(.*encoder\.layers\.\d+\.self_attn)\.([qkv])_proj\.(weight|bias)$", key)
        if fused:
            continue
        for pattern, replacement in TO_ORIGINAL:
            key = re.sub(pattern, replacement, key)
        out[key] = tensor
    for key in v4:
        fused = re.match(r"model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$", key)
        if fused:
            layer, kind = fused.groups()
            parts = [v4[f"model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"transformer.encoder.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat(parts)
    return out


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A small random R50 checkpoint saved by transformers, its outputs on the padded batch, its v4 tensors."""
    hf = make_hf_detector("resnet50", seed=5)
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        expected = hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
    directory = save_hf_v4(hf, tmp_path_factory.mktemp("hf"))
    return directory, expected, load_file(directory / "model.safetensors")


def predict(model):
    with torch.no_grad():
        return model(*padded_batch())


def assert_matches(out, expected):
    assert torch.allclose(out.logits, expected.logits, atol=TOLERANCE)
    assert torch.allclose(out.pred_boxes, expected.pred_boxes, atol=TOLERANCE)


def save_original(path, tensors, **args):
    """What the original main.py saves: model, optimizer, lr_scheduler, epoch and the argparse Namespace."""
    torch.save({"model": tensors, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {},
                "epoch": 49, "args": argparse.Namespace(backbone="resnet50", nheads=8, lr=1e-4, **args)}, path)
    return path


def test_original_pth_round_trip(hf_checkpoint, tmp_path):
    _, expected, v4 = hf_checkpoint
    original = to_original(v4)
    assert detect_layout(list(original)).name == "original"
    assert "transformer.encoder.layers.0.self_attn.in_proj_weight" in original
    path = save_original(tmp_path / "checkpoint.pth", original, dilation=False)
    model = ConditionalDetrForObjectDetection.from_pretrained(path)
    config = model.config
    assert (config.backbone, config.num_queries, config.num_labels, config.encoder_layers,
            config.decoder_layers, config.encoder_ffn_dim) == ("resnet50", 12, 7, 2, 2, 128)
    assert_matches(predict(model), expected)


def test_original_pth_dilation_from_args_or_override(hf_checkpoint, tmp_path):
    _, _, v4 = hf_checkpoint
    original = to_original(v4)
    with_args = save_original(tmp_path / "dc5.pth", original, dilation=True)
    assert ConditionalDetrForObjectDetection.from_pretrained(with_args).config.dilation
    bare = tmp_path / "bare.pth"
    torch.save({"model": original}, bare)
    assert not ConditionalDetrForObjectDetection.from_pretrained(bare).config.dilation
    assert ConditionalDetrForObjectDetection.from_pretrained(bare, dilation=True).config.dilation


def test_pytorch_model_bin_and_base_model(hf_checkpoint, tmp_path):
    directory, expected, v4 = hf_checkpoint
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    torch.save(v4, tmp_path / "pytorch_model.bin")
    detector = ConditionalDetrForObjectDetection.from_pretrained(tmp_path)
    assert_matches(predict(detector), expected)
    # The bare model takes the `model.*` part of a detection checkpoint (the heads are not part of it).
    base = ConditionalDetrModel.from_pretrained(tmp_path)
    with torch.no_grad():
        hidden = base(*padded_batch()).last_hidden_state
    assert torch.allclose(hidden, expected.last_hidden_state, atol=TOLERANCE)


def test_base_model_round_trip(hf_checkpoint, tmp_path):
    directory, expected, _ = hf_checkpoint
    ConditionalDetrModel.from_pretrained(directory).save_pretrained(tmp_path)
    assert "encoder.layers.0.fc1.weight" in load_file(tmp_path / "model.safetensors")
    with torch.no_grad():
        hidden = ConditionalDetrModel.from_pretrained(tmp_path)(*padded_batch()).last_hidden_state
    assert torch.allclose(hidden, expected.last_hidden_state, atol=TOLERANCE)


def corrupt(hf_checkpoint, tmp_path, edit):
    directory, _, v4 = hf_checkpoint
    tensors = dict(v4)
    edit(tensors)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def _set_key(name: str, value: torch.Tensor):
    return lambda tensors: tensors.__setitem__(name, value)


@pytest.mark.parametrize("edit, message", [
    (_set_key("class_labels_classifier.weight", torch.zeros(9, 256)),
     r"class_labels_classifier\.weight: checkpoint \(9, 256\) vs model \(7, 256\)"),
    (lambda tensors: tensors.pop("model.decoder.layers.0.ca_qpos_proj.weight"),
     r"1 missing key\(s\) \[model\.decoder\.layers\.0\.ca_qpos_proj\.weight\]"),
    (_set_key("model.decoder.layers.1.ca_qpos_proj.weight", torch.zeros(256, 256)),
     r"1 unexpected key\(s\) \[model\.decoder\.layers\.1\.ca_qpos_proj\.weight\]"),
], ids=["wrong shape", "missing key", "unexpected key"])
def test_bad_keys_are_named(hf_checkpoint, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        ConditionalDetrForObjectDetection.from_pretrained(corrupt(hf_checkpoint, tmp_path, edit))


def test_missing_files(hf_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ConditionalDetrForObjectDetection.from_pretrained(tmp_path / "nothing-here")
    (tmp_path / "config.json").write_text((hf_checkpoint[0] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        ConditionalDetrForObjectDetection.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        ConditionalDetrForObjectDetection.from_pretrained(tmp_path.parent)


def test_truncated_files(hf_checkpoint, tmp_path):
    directory = corrupt(hf_checkpoint, tmp_path, lambda t: None)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        ConditionalDetrForObjectDetection.from_pretrained(directory)
    pth = tmp_path / "cut.pth"
    save_original(pth, to_original(hf_checkpoint[2]))
    pth.write_bytes(pth.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="truncated, corrupt or not a torch checkpoint"):
        ConditionalDetrForObjectDetection.from_pretrained(pth)


def test_pickle_with_code_is_refused(tmp_path):
    """weights_only loading: a pickle that would call an arbitrary function is rejected, not executed."""
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "hook": print}, path)
    with pytest.raises(ValueError, match="cannot read"):
        ConditionalDetrForObjectDetection.from_pretrained(path)


def test_hf_file_path_is_not_an_original_checkpoint(hf_checkpoint, tmp_path):
    torch.save(hf_checkpoint[2], tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="not an original Conditional DETR checkpoint"):
        ConditionalDetrForObjectDetection.from_pretrained(tmp_path / "weights.pth")


# ------------------------------------------------------------------------------------------------ config.json

def test_reads_v4_config_json():
    v4 = {"model_type": "conditional_detr", "backbone": "resnet101", "use_timm_backbone": True, "dilation": True,
          "backbone_kwargs": {"out_indices": [1, 2, 3, 4], "in_chans": 3, "output_stride": 16},
          "use_pretrained_backbone": True, "id2label": {"0": "N/A", "1": "person"}, "num_queries": 300,
          "transformers_version": "4.57.1", "some_new_field": [1, 2]}
    config = ConditionalDetrConfig.from_dict(v4)
    assert (config.backbone, config.dilation, config.num_labels) == ("resnet101", True, 2)
    assert config.id2label == {0: "N/A", 1: "person"} and config.label2id == {"N/A": 0, "person": 1}
    written = config.to_dict()
    assert written["some_new_field"] == [1, 2] and "backbone_kwargs" not in written
    assert written["id2label"] == {"0": "N/A", "1": "person"} and written["use_pretrained_backbone"] is False


def test_reads_v5_config_json(tmp_path):
    HFConfig(backbone="resnet50", dilation=True, num_labels=5, d_model=128, num_queries=30).save_pretrained(tmp_path)
    assert "backbone_config" in json.loads((tmp_path / "config.json").read_text())
    config = ConditionalDetrConfig.from_pretrained(tmp_path)
    assert (config.backbone, config.dilation, config.num_labels, config.d_model, config.num_queries) == (
        "resnet50", True, 5, 128, 30)


def test_written_config_loads_in_transformers(tmp_path):
    ours = ConditionalDetrConfig(backbone="resnet18", d_model=128, num_queries=20, encoder_layers=3,
                                 id2label={0: "N/A", 1: "circle", 2: "sky"}, frozen_batch_norm=False,
                                 stuff_labels=[2])
    ours.save_pretrained(tmp_path)
    hf = HFConfig.from_pretrained(tmp_path)
    assert hf.backbone_config.backbone == "resnet18" and hf.d_model == 128 and hf.num_queries == 20
    assert hf.id2label == {0: "N/A", 1: "circle", 2: "sky"} and hf.encoder_layers == 3
    assert ConditionalDetrConfig.from_pretrained(tmp_path) == ours


@pytest.mark.parametrize("fields, message", [
    ({"d_model": 250}, "not divisible by encoder_attention_heads"),
    ({"backbone": "vgg16"}, "unknown backbone 'vgg16'"),
    ({"backbone": "resnet18", "dilation": True}, "dilation"),
    ({"num_queries": 0}, "num_queries must be a positive integer"),
    ({"activation_function": "tanh"}, "unknown activation_function"),
    ({"position_embedding_type": "rope"}, "unknown position_embedding_type"),
    ({"num_labels": 3, "id2label": {0: "a"}}, "disagrees with id2label"),
    ({"use_timm_backbone": False}, "HF ResNet"),
    ({"model_type": "detr"}, "expected 'conditional_detr'"),
    ({"backbone_config": {"model_type": "resnet"}}, "unsupported backbone_config"),
    ({"num_labels": 3, "stuff_labels": [2, 5]}, r"stuff_labels \[5\] are not in id2label"),
])
def test_invalid_config_values_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        ConditionalDetrConfig.from_dict(fields)


def test_bad_config_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ConditionalDetrConfig.from_pretrained(tmp_path)
