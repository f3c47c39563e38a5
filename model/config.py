"""`ConditionalDetrConfig`: the Hugging Face field names and defaults, read from and written to `config.json`.

Reading accepts both `transformers` generations: v4 keeps the backbone as flat keys (`backbone`, `dilation`,
`use_timm_backbone`, `backbone_kwargs`), v5 nests it in `backbone_config: {"model_type": "timm_backbone", ...}`.
Writing produces the v4 flat form without `backbone_kwargs`, which both generations load offline (in v5 the mere
presence of `backbone_kwargs` makes `from_pretrained` query the hub: docs/reference-compatibility.md, Q11). Keys
this class does not know are kept in `extra` and written back unchanged, so other tools' fields survive a load/save
round trip. The field mapping of both generations: docs/checkpoint-formats.md, "config.json".
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
MODEL_TYPE = "conditional_detr"
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
ACTIVATIONS = ("relu", "gelu", "silu")
POSITION_EMBEDDINGS = ("sine", "learned")

# Keys `to_dict` derives from the fields, and v5's nested backbone description (folded into the flat fields).
_DERIVED_KEYS = ("model_type", "num_labels", "backbone_config")


@dataclass
class ConditionalDetrConfig:
    """Hyper-parameters of Conditional DETR (defaults: `microsoft/conditional-detr-resnet-50`;
    docs/checkpoint-formats.md, "config.json").

    `num_labels` follows `id2label` when that is given (HF semantics); otherwise `id2label` is filled with
    `LABEL_i` names. There is no "no-object" class: the classifier is a sigmoid over `num_labels` logits.
    `use_pretrained_backbone` is accepted for compatibility and ignored: weights only ever come from local files.
    """

    d_model: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    num_queries: int = 300
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation_function: str = "relu"
    init_std: float = 0.02
    init_xavier_std: float = 1.0
    auxiliary_loss: bool = False
    position_embedding_type: str = "sine"
    num_channels: int = 3
    backbone: str = "resnet50"
    dilation: bool = False
    use_pretrained_backbone: bool = False
    use_timm_backbone: bool = True
    backbone_kwargs: dict[str, Any] | None = None
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    class_cost: float = 2
    bbox_cost: float = 5
    giou_cost: float = 2
    cls_loss_coefficient: float = 2
    bbox_loss_coefficient: float = 5
    giou_loss_coefficient: float = 2
    mask_loss_coefficient: float = 1
    dice_loss_coefficient: float = 1
    focal_alpha: float = 0.25
    # Plain BatchNorm2d instead of FrozenBatchNorm2d, for training a backbone from scratch.
    frozen_batch_norm: bool = True
    # False = DETR's cross-attention (content + position added, one head dim), for the convergence study.
    conditional_cross_attention: bool = True
    # Labels that panoptic post-processing fuses into one segment per class (COCO panoptic's "stuff"). Not an HF
    # field: HF checkpoints do not say which classes are stuff; `cdetr train --panoptic` records them here.
    stuff_labels: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._sync_labels()
        self._fold_backbone_kwargs()
        self.validate()

    def _fold_backbone_kwargs(self) -> None:
        """Turn the timm plumbing of HF configs into the flat fields (docs/checkpoint-formats.md, "config.json")."""
        if not self.use_timm_backbone:
            raise ValueError("use_timm_backbone=False selects the HF ResNet, whose weights use another key layout; "
                             "only timm/torchvision ResNets are supported")
        # timm names may carry a pretrained tag ("resnet50.a1_in1k"); the architecture is the part before it.
        self.backbone = str(self.backbone).split(".")[0]
        kwargs = self.backbone_kwargs or {}
        self.dilation = bool(self.dilation) or kwargs.get("output_stride") == 16
        self.num_channels = kwargs.get("in_chans", kwargs.get("num_channels", self.num_channels))
        self.backbone_kwargs = None

    def _sync_labels(self) -> None:
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if self.num_labels is not None and self.num_labels != len(self.id2label):
                raise ValueError(f"num_labels={self.num_labels} disagrees with id2label, which has "
                                 f"{len(self.id2label)} entries")
            self.num_labels = len(self.id2label)
        else:
            self.num_labels = 2 if self.num_labels is None else self.num_labels
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None:
            self.label2id = {name: i for i, name in self.id2label.items()}
        self.label2id = {str(k): int(v) for k, v in self.label2id.items()}

    def validate(self) -> None:
        """Raise `ValueError` naming the first inconsistent field."""
        positive = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                    "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "num_queries", "num_channels",
                    "num_labels")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, name):
                raise ValueError(f"d_model={self.d_model} is not divisible by {name}={getattr(self, name)}")
        # The sine embeddings give d_model // 2 features per coordinate and interleave sin/cos pairs.
        if self.d_model % 4:
            raise ValueError(f"d_model must be a multiple of 4 for the 2-D sine embeddings, got {self.d_model}")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {', '.join(BACKBONES)}")
        if self.dilation and self.backbone in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50/resnet101), not {self.backbone}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"unknown activation_function {self.activation_function!r}; "
                             f"expected one of {', '.join(ACTIVATIONS)}")
        self.stuff_labels = sorted(int(label) for label in self.stuff_labels)
        unknown = set(self.stuff_labels) - set(self.id2label)
        if unknown:
            raise ValueError(f"stuff_labels {sorted(unknown)} are not in id2label (labels 0..{self.num_labels - 1})")
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            raise ValueError(f"unknown position_embedding_type {self.position_embedding_type!r}; "
                             f"expected one of {', '.join(POSITION_EMBEDDINGS)}")

    # ---------------------------------------------------------------- dict / JSON

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> ConditionalDetrConfig:
        """Build from an HF v4 or v5 `config.json` dict (or our own `to_dict`); `overrides` win over `config`."""
        merged = {**config, **overrides}
        if "num_labels" in overrides and "id2label" not in overrides:
            # HF semantics: a new label count replaces the stored label names.
            merged.pop("id2label", None)
            merged.pop("label2id", None)
        if merged.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"config has model_type {merged['model_type']!r}, expected {MODEL_TYPE!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in merged.items() if k in known}
        nested = merged.get("backbone_config")
        if nested:
            # v5: {"model_type": "timm_backbone", "backbone": "resnet50", "output_stride": 16 | null, ...}
            if nested.get("model_type") != "timm_backbone":
                raise ValueError(f"unsupported backbone_config model_type {nested.get('model_type')!r}: only "
                                 f"timm/torchvision ResNets ('timm_backbone') share this model's key layout")
            kwargs["backbone"] = nested.get("backbone") or "resnet50"
            kwargs["backbone_kwargs"] = nested
        unknown = {k: v for k, v in merged.items() if k not in known and k not in _DERIVED_KEYS and k != "extra"}
        return cls(**kwargs, extra={**merged.get("extra", {}), **unknown})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict that `transformers` (v4 and v5) load offline: string label ids, no `backbone_kwargs`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("extra", "backbone_kwargs", "num_labels")}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["use_pretrained_backbone"] = False
        out["use_timm_backbone"] = True
        out["model_type"] = MODEL_TYPE
        return {**self.extra, **out}

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides: Any) -> ConditionalDetrConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, **overrides)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> ConditionalDetrConfig:
        """Read `<directory>/config.json`."""
        return cls.from_json_file(Path(directory) / CONFIG_NAME, **overrides)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.to_json_file(directory / CONFIG_NAME)

