"""Checkpoint layouts and loading/saving.

The native layout is HF v4 (docs/checkpoint-formats.md, "HF v4"), which is what the hub checkpoint
`microsoft/conditional-detr-resnet-50` uses and what `transformers` 5.x `save_pretrained` writes. Two more layouts
are converted on load:

* HF v5: the in-memory `state_dict()` of `transformers` 5.x models (docs/checkpoint-formats.md, "HF v5");
* original Atten4Vis `.pth` (`{"model": state_dict, "args": Namespace, ...}`; docs/checkpoint-formats.md,
  "original .pth"): renames plus splitting each fused `in_proj_{weight,bias}` into q/k/v.

Each layout is data: a regex that recognises it and an ordered table of (pattern, replacement) renames onto the v4
keys (and fused keys to split). To support another layout, add a `Layout` to `LAYOUTS`; to support more keys of a
known one, add rows to its table.

Loading is strict: missing or unexpected keys and shape mismatches raise errors naming them; nothing is ever
partially loaded. `num_batches_tracked` (a plain-BatchNorm step counter without effect at inference) is neither
written nor required.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import CONFIG_NAME, ConditionalDetrConfig

SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"
# Keys a checkpoint may lack or carry without consequence (see module docstring).
_IGNORED_SUFFIX = "num_batches_tracked"
# How many names an error message lists before summarising.
_SHOWN = 8


@dataclass(frozen=True)
class Layout:
    """A state-dict key layout: `detect` matches any of its keys that no v4 checkpoint has; `renames` map keys onto
    v4 (applied in order with `re.sub`); `splits` name fused tensors chunked in equal parts along dim 0."""

    name: str
    detect: str
    renames: tuple[tuple[str, str], ...]
    splits: tuple[tuple[str, tuple[str, ...]], ...] = ()


_DEC = r"(decoder\.layers\.\d+)"

V5 = Layout(
    name="hf-v5",
    # v5 `save_pretrained` reverts the renames above but leaves the learned position embedding at `model.`.
    detect=r"backbone\.model\.|\.o_proj\.|\.mlp\.fc[12]\.|_content_proj\.|(^|\.)model\.position_embedding\.",
    renames=(
        (r"backbone\.model\.", "backbone.conv_encoder.model."),
        (r"(^|\.)model\.position_embedding\.", r"\1model.backbone.position_embedding."),
        (r"\.o_proj\.", ".out_proj."),
        (r"\.mlp\.(fc[12])\.", r".\1."),
        (_DEC + r"\.self_attn\.([qk])_(content|pos)_proj\.", r"\1.sa_\2\3_proj."),
        (_DEC + r"\.self_attn\.v_proj\.", r"\1.sa_v_proj."),
        (_DEC + r"\.encoder_attn\.([qk])_(content|pos)_proj\.", r"\1.ca_\2\3_proj."),
        (_DEC + r"\.encoder_attn\.v_proj\.", r"\1.ca_v_proj."),
        (_DEC + r"\.encoder_attn\.q_pos_sine_proj\.", r"\1.ca_qpos_sine_proj."),
        # Segmentation head (docs/checkpoint-formats.md, "HF v5").
        (r"^bbox_attention\.([qk])_proj\.", r"bbox_attention.\1_linear."),
        (r"^mask_head\.conv([12])\.conv\.", r"mask_head.lay\1."),
        (r"^mask_head\.conv([12])\.norm\.", r"mask_head.gn\1."),
        *((rf"^mask_head\.fpn_stages\.{i}\.fpn_adapter\.", f"mask_head.adapter{i + 1}.") for i in range(3)),
        *((rf"^mask_head\.fpn_stages\.{i}\.refine\.conv\.", f"mask_head.lay{i + 3}.") for i in range(3)),
        *((rf"^mask_head\.fpn_stages\.{i}\.refine\.norm\.", f"mask_head.gn{i + 3}.") for i in range(3)),
        (r"^mask_head\.output_conv\.", "mask_head.out_lay."),
    ),
)

ORIGINAL = Layout(
    name="original",
    detect=r"^transformer\.|^backbone\.0\.body\.",
    renames=(
        (r"^backbone\.0\.body\.", "model.backbone.conv_encoder.model."),
        (r"^backbone\.1\.row_embed\.", "model.backbone.position_embedding.row_embeddings."),
        (r"^backbone\.1\.col_embed\.", "model.backbone.position_embedding.column_embeddings."),
        (r"^transformer\.decoder\.norm\.", "model.decoder.layernorm."),
        (r"^transformer\.", "model."),
        (r"\.linear([12])\.", r".fc\1."),
        (r"(encoder\.layers\.\d+)\.norm1\.", r"\1.self_attn_layer_norm."),
        (r"(encoder\.layers\.\d+)\.norm2\.", r"\1.final_layer_norm."),
        (_DEC + r"\.norm1\.", r"\1.self_attn_layer_norm."),
        (_DEC + r"\.norm2\.", r"\1.encoder_attn_layer_norm."),
        (_DEC + r"\.norm3\.", r"\1.final_layer_norm."),
        (r"\.cross_attn\.", ".encoder_attn."),
        (r"^input_proj\.", "model.input_projection."),
        (r"^query_embed\.", "model.query_position_embeddings."),
        (r"^class_embed\.", "class_labels_classifier."),
        (r"^bbox_embed\.", "bbox_predictor."),
    ),
    # nn.MultiheadAttention stores q, k, v projections stacked in one (3C, C) matrix.
    splits=((r"\.in_proj_(weight|bias)$", (r".q_proj.\1", r".k_proj.\1", r".v_proj.\1")),),
)

LAYOUTS = (V5, ORIGINAL)


def detect_layout(keys: list[str]) -> Layout | None:
    """The first layout any key of which matches its `detect` pattern; None = native v4."""
    for layout in LAYOUTS:
        if any(re.search(layout.detect, key) for key in keys):
            return layout
    return None


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a state dict of any known layout onto the HF v4 keys."""
    layout = detect_layout(list(state_dict))
    if layout is None:
        return dict(state_dict)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in layout.renames:
            key = re.sub(pattern, replacement, key)
        for pattern, parts in layout.splits:
            if re.search(pattern, key):
                for part_name, part in zip(parts, tensor.chunk(len(parts), dim=0)):
                    converted[re.sub(pattern, part_name, key)] = part
                break
        else:
            converted[key] = tensor
    return converted


# ---------------------------------------------------------------------------------------------------- reading files

def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors of a `.safetensors` file or a torch pickle (`.bin`, `.pth`: the dict itself or its "model"), and the
    training arguments an original checkpoint stores under "args" (empty otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path), {}
        except SafetensorError as err:
            raise ValueError(f"cannot read {path}: truncated or not a safetensors file ({err})") from err
    data = _torch_load(path)
    state_dict = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} holds no state dict (expected a dict of tensors or a dict with 'model')")
    args = data.get("args") if state_dict is not data else None
    return state_dict, vars(args) if isinstance(args, argparse.Namespace) else {}


def _torch_load(path: Path) -> Any:
    # weights_only=True: never run arbitrary pickled code. Original checkpoints also hold the training
    # `argparse.Namespace` ("args"); it is plain data (strings, numbers, lists), so it is allow-listed here.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError... depending on the damage
        raise ValueError(f"cannot read {path}: truncated, corrupt or not a torch checkpoint ({err})") from err


def _hf_weights_file(directory: Path) -> Path:
    for name in (SAFETENSORS_NAME, PYTORCH_NAME):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no {SAFETENSORS_NAME} or {PYTORCH_NAME} in {directory}")


# ---------------------------------------------------------------------------------- config of an original checkpoint

def config_from_original(source: str, state_dict: dict[str, torch.Tensor], args: dict[str, Any],
                         **overrides: Any) -> ConditionalDetrConfig:
    """Infer the config from an original checkpoint's tensor shapes, and from its training `args` what keys cannot
    tell (heads, DC5). `overrides` win, e.g. `dilation=True` for a DC5 checkpoint saved without args."""
    layer3_blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"backbone\.0\.body\.layer3\.(\d+)\.", k))}
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state_dict
    backbones = {(True, 6): "resnet50", (True, 23): "resnet101", (False, 2): "resnet18", (False, 6): "resnet34"}
    backbone = backbones.get((bottleneck, len(layer3_blocks)))
    if backbone is None:
        raise ValueError(f"{source}: cannot recognise the ResNet ({len(layer3_blocks)} layer3 blocks)")

    def count(prefix: str) -> int:
        return len({k.split(".")[3] for k in state_dict if k.startswith(prefix)})

    query_embed = state_dict["query_embed.weight"]
    config: dict[str, Any] = {
        "backbone": backbone,
        "dilation": bool(args.get("dilation", False)),
        "num_labels": state_dict["class_embed.weight"].shape[0],
        "num_queries": query_embed.shape[0],
        "d_model": query_embed.shape[1],
        "encoder_layers": count("transformer.encoder.layers."),
        "decoder_layers": count("transformer.decoder.layers."),
        "encoder_ffn_dim": state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0],
        "decoder_ffn_dim": state_dict["transformer.decoder.layers.0.linear1.weight"].shape[0],
        "position_embedding_type": "learned" if "backbone.1.row_embed.weight" in state_dict else "sine",
    }
    if "nheads" in args:
        config["encoder_attention_heads"] = config["decoder_attention_heads"] = args["nheads"]
    return ConditionalDetrConfig.from_dict(config, **overrides)


# ------------------------------------------------------------------------------------------------ loading and saving

def load_pretrained(model_class: type, path: str | Path, **overrides: Any):
    """Build `model_class(config)` and load its weights from an HF directory or an original `.pth` file."""
    path = Path(path)
    if path.is_dir():
        config = ConditionalDetrConfig.from_pretrained(path, **overrides)
        state_dict, _ = read_checkpoint(_hf_weights_file(path))
    elif path.is_file():
        state_dict, args = read_checkpoint(path)
        if detect_layout(list(state_dict)) is not ORIGINAL:
            raise ValueError(f"{path} is not an original Conditional DETR checkpoint; for HF checkpoints pass the "
                             f"directory holding {CONFIG_NAME}")
        config = config_from_original(str(path), state_dict, args, **overrides)
    else:
        raise FileNotFoundError(f"no checkpoint at {path} (expected an HF directory or an original .pth file)")
    model = model_class(config)
    load_state_dict(model, convert_state_dict(state_dict), source=str(path))
    return model.eval()


def load_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strictly load v4-layout tensors into `model`; errors name every offending key.

    A bare `ConditionalDetrModel` (keys without the `model.` prefix) takes the `model.*` part of a detection
    checkpoint; the heads of that checkpoint are then not part of what it loads.
    """
    own = model.state_dict()
    if not any(k.startswith("model.") for k in own) and any(k.startswith("model.") for k in state_dict):
        state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
    expected = {k for k in own if not k.endswith(_IGNORED_SUFFIX)}
    missing = sorted(expected - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{source} does not match {type(model).__name__}: "
                       f"{len(missing)} missing key(s) {_names(missing)}, "
                       f"{len(unexpected)} unexpected key(s) {_names(unexpected)}")
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if v.shape != own[k].shape]
    if mismatched:
        raise ValueError(f"{source} has {len(mismatched)} shape mismatch(es) for {type(model).__name__}: "
                         + "; ".join(mismatched[:_SHOWN]))
    # Keep the model's own step counters (plain BatchNorm) so the strict load below is complete.
    state_dict.update({k: v for k, v in own.items() if k.endswith(_IGNORED_SUFFIX)})
    model.load_state_dict(state_dict, strict=True)


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return f"[{shown}{', ...' if len(keys) > _SHOWN else ''}]"


def save_pretrained(model: torch.nn.Module, directory: str | Path) -> None:
    """`config.json` (loadable by `transformers` offline) + `model.safetensors` in the v4 layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
               if not k.endswith(_IGNORED_SUFFIX)}
    save_file(tensors, directory / SAFETENSORS_NAME, metadata={"format": "pt"})
