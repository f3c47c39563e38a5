"""`ConditionalDetrModel` and `ConditionalDetrForObjectDetection`, named and laid out like the HF classes.

The forward is split into stages that a segmentation head (or any other head) can call one by one, keeping what it
needs without recomputation:

    features = detr.model.extract_features(pixel_values, pixel_mask)  # 4 stage maps, last-map mask, projection
    memory = detr.model.encode(features)                              # (B, S, C) encoder memory
    hidden_states, reference_points = detr.model.decode(memory, features)  # (L', B, Q, C), (B, Q, 2)
    output = detr.detection_output(hidden_states, reference_points, memory)  # logits, boxes, aux, (loss)

`ConditionalDetrForObjectDetection.predict` is this sequence without the loss (what `optimize(compile=True)`
compiles as one graph), and `forward` is `predict` plus the loss when labels are given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import checkpoint
from model.backbone import Joiner
from model.config import ConditionalDetrConfig
from model.transformer import MLP, Decoder, Encoder

# Focal-loss prior (RetinaNet): every logit starts at P(object) = 0.01 so the first losses are not swamped by the
# ~Q*C negatives (original Conditional DETR init; HF does not do this: docs/reference-compatibility.md, Q10).
PRIOR_PROBABILITY = 0.01


@dataclass
class ConditionalDetrFeatures:
    """Backbone stage output.

    feature_maps: the 4 ResNet stage maps (strides 4, 8, 16, 32; DC5: 4, 8, 16, 16).
    mask: (B, h, w) bool, True on valid pixels of the last map.
    projected: (B, d_model, h, w) `input_projection` of the last map (the encoder input).
    position_embeddings: (B, h*w, d_model) position embedding of the last map.
    key_padding_mask: (B, h*w) True on padding, or None when no image of the batch is padded.
    """

    feature_maps: list[torch.Tensor]
    mask: torch.Tensor
    projected: torch.Tensor
    position_embeddings: torch.Tensor
    key_padding_mask: torch.Tensor | None


@dataclass
class ConditionalDetrModelOutput:
    """last_hidden_state (B, Q, C) after the final layernorm; encoder_last_hidden_state (B, S, C);
    reference_points (B, Q, 2) normalized (x, y), where HF returns (Q, B, 2): docs/reference-compatibility.md, Q1;
    intermediate_hidden_states (L, B, Q, C), normalized, only with `auxiliary_loss`."""

    last_hidden_state: torch.Tensor
    encoder_last_hidden_state: torch.Tensor
    reference_points: torch.Tensor
    intermediate_hidden_states: torch.Tensor | None = None


@dataclass
class ConditionalDetrObjectDetectionOutput:
    """logits (B, Q, num_labels) for a sigmoid classifier (no "no-object" logit); pred_boxes (B, Q, 4) normalized
    (cx, cy, w, h) relative to each unpadded image; auxiliary_outputs: [{"logits", "pred_boxes"}] for the first
    L-1 decoder layers when `auxiliary_loss`; loss / loss_dict only when labels were given."""

    logits: torch.Tensor
    pred_boxes: torch.Tensor
    last_hidden_state: torch.Tensor
    encoder_last_hidden_state: torch.Tensor
    reference_points: torch.Tensor
    auxiliary_outputs: list[dict[str, torch.Tensor]] | None = None
    loss: torch.Tensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with both terms clamped to >= eps (original `util/misc.py`)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class ConditionalDetrPreTrainedModel(nn.Module):
    """Checkpoint I/O shared by the model classes (HF dir in v4/v5 layout, or an original Atten4Vis .pth)."""

    def __init__(self, config: ConditionalDetrConfig):
        super().__init__()
        self.config = config

    @classmethod
    def from_pretrained(cls, path: str | Path, **config_overrides: Any):
        """Load from an HF directory (`config.json` + `model.safetensors` / `pytorch_model.bin`) or an original
        `.pth`; `config_overrides` replace config fields (e.g. `dilation=True` for a DC5 `.pth`)."""
        return checkpoint.load_pretrained(cls, path, **config_overrides)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json` + `model.safetensors` in the HF v4 key layout."""
        checkpoint.save_pretrained(self, directory)


class ConditionalDetrModel(ConditionalDetrPreTrainedModel):
    """Backbone + encoder + conditional decoder, without heads (HF keys under `model.`)."""

    def __init__(self, config: ConditionalDetrConfig):
        super().__init__(config)
        self.backbone = Joiner(config)
        self.query_position_embeddings = nn.Embedding(config.num_queries, config.d_model)
        self.input_projection = nn.Conv2d(self.backbone.conv_encoder.channels[-1], config.d_model, kernel_size=1)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self._reset_transformer_parameters()

    def _reset_transformer_parameters(self) -> None:
        # Original `Transformer._reset_parameters`: xavier-uniform for every matrix of encoder and decoder,
        # including the decoder's MLPs (HF draws normal(0, init_std) instead: docs/reference-compatibility.md, Q10).
        for module in (self.encoder, self.decoder):
            for parameter in module.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)

    def extract_features(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
                         ) -> ConditionalDetrFeatures:
        """pixel_values (B, C, H, W) float, pixel_mask (B, H, W) with 1 on valid pixels.

        pixel_mask None means no image is padded (video frames): the attention then runs without a mask, and the
        forward never waits for the device, so it can be captured whole (one compiled graph, one CUDA graph).
        A given mask costs two host syncs: one to check it, one to learn whether anything is padded at all."""
        given_mask = pixel_mask is not None
        pixel_mask = self._check_inputs(pixel_values, pixel_mask)
        stages, pos = self.backbone(pixel_values, pixel_mask)
        feature_map, mask = stages[-1]
        # Unpadded batches run the attention without a mask, which lets SDPA pick its fused kernels. An exported
        # graph (torch.export, the ONNX export: model/export.py) cannot branch on the data, so with a mask it always
        # masks: the same result for unpadded batches, the right one for padded ones.
        padded = given_mask and (torch.compiler.is_exporting() or not bool(mask.all()))
        return ConditionalDetrFeatures(
            feature_maps=[feature for feature, _ in stages],
            mask=mask,
            projected=self.input_projection(feature_map),
            position_embeddings=pos.flatten(2).transpose(1, 2),
            key_padding_mask=~mask.flatten(1) if padded else None,
        )

    def _check_inputs(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(f"pixel_values must be (batch, {self.config.num_channels}, height, width), "
                             f"got shape {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a normalized float tensor, got dtype {pixel_values.dtype}")
        batch, _, height, width = pixel_values.shape
        if pixel_mask is None:
            return torch.ones((batch, height, width), dtype=torch.bool, device=pixel_values.device)
        if tuple(pixel_mask.shape) != (batch, height, width):
            raise ValueError(f"pixel_mask must have shape {(batch, height, width)} to match pixel_values, "
                             f"got {tuple(pixel_mask.shape)}")
        pixel_mask = pixel_mask.to(device=pixel_values.device, dtype=torch.bool)
        # A graph cannot raise on values: an exported model's runtime checks the corner itself (model/runtime.py).
        if not torch.compiler.is_exporting() and not bool(pixel_mask[:, 0, 0].all()):
            # Padding goes bottom/right, so the top-left pixel is valid in every real image; an image without it
            # would leave its attention rows with nothing to attend to.
            raise ValueError("pixel_mask marks the top-left pixel of an image as padding; images are expected "
                             "at the top-left of the padded canvas with 1 on valid pixels")
        return pixel_mask

    def encode(self, features: ConditionalDetrFeatures) -> torch.Tensor:
        """→ encoder memory (B, S, C), S = h*w."""
        src = features.projected.flatten(2).transpose(1, 2)
        return self.encoder(src, features.position_embeddings, features.key_padding_mask)

    def decode(self, memory: torch.Tensor, features: ConditionalDetrFeatures
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """→ normalized decoder states (L, B, Q, C) with `auxiliary_loss`, else (1, B, Q, C); reference points
        (B, Q, 2)."""
        query_pos = self.query_position_embeddings.weight[None].expand(memory.shape[0], -1, -1)
        return self.decoder(query_pos, memory, features.position_embeddings, features.key_padding_mask,
                            return_intermediate=self.config.auxiliary_loss)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
                ) -> ConditionalDetrModelOutput:
        features = self.extract_features(pixel_values, pixel_mask)
        memory = self.encode(features)
        hidden_states, reference_points = self.decode(memory, features)
        return ConditionalDetrModelOutput(
            last_hidden_state=hidden_states[-1],
            encoder_last_hidden_state=memory,
            reference_points=reference_points,
            intermediate_hidden_states=hidden_states if self.config.auxiliary_loss else None,
        )


class ConditionalDetrForObjectDetection(ConditionalDetrPreTrainedModel):
    """`ConditionalDetrModel` + a sigmoid classifier and a box MLP that predicts offsets to the reference point."""

    def __init__(self, config: ConditionalDetrConfig):
        super().__init__(config)
        self.model = ConditionalDetrModel(config)
        self.class_labels_classifier = nn.Linear(config.d_model, config.num_labels)
        self.bbox_predictor = MLP(config.d_model, config.d_model, 4, 3)
        self._reset_head_parameters()

    def _reset_head_parameters(self) -> None:
        nn.init.constant_(self.class_labels_classifier.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
        # Zero last box layer: the first prediction is the reference point itself with w = h = 0.5.
        nn.init.zeros_(self.bbox_predictor.layers[-1].weight)
        nn.init.zeros_(self.bbox_predictor.layers[-1].bias)

    def heads(self, hidden_states: torch.Tensor, reference_points: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., B, Q, C) states, (B, Q, 2) reference points → logits (..., B, Q, num_labels), boxes (..., B, Q, 4).

        The box MLP predicts (cx, cy) as an offset to the reference point in logit space (paper §3.3), the same
        reference for every layer: box = sigmoid(t + [inverse_sigmoid(s), 0, 0])."""
        offsets = self.bbox_predictor(hidden_states)
        reference = inverse_sigmoid(reference_points)
        boxes = torch.cat((offsets[..., :2] + reference, offsets[..., 2:]), dim=-1).sigmoid()
        return self.class_labels_classifier(hidden_states), boxes

    def detection_output(self, hidden_states: torch.Tensor, reference_points: torch.Tensor, memory: torch.Tensor
                         ) -> ConditionalDetrObjectDetectionOutput:
        """Heads on the decoder states of `ConditionalDetrModel.decode`, and the auxiliary outputs."""
        logits, boxes = self.heads(hidden_states, reference_points)
        auxiliary_outputs = None
        if self.config.auxiliary_loss:
            auxiliary_outputs = [{"logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])]
        output = ConditionalDetrObjectDetectionOutput(
            logits=logits[-1], pred_boxes=boxes[-1], last_hidden_state=hidden_states[-1],
            encoder_last_hidden_state=memory, reference_points=reference_points,
            auxiliary_outputs=auxiliary_outputs)
        return output

    def compute_loss(self, output: ConditionalDetrObjectDetectionOutput, labels: list[dict[str, torch.Tensor]]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hungarian matching + focal / L1 / GIoU losses (and the same for every auxiliary output).

        labels: one dict per image with "class_labels" (N,) and "boxes" (N, 4) normalized cxcywh (HF format).
        """
        # The training stack is optional for inference, so it is imported only when a loss is asked for.
        from model.training.criterion import SetCriterion

        return SetCriterion(self.config)(output, labels)

    def predict(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
                ) -> tuple[ConditionalDetrFeatures, ConditionalDetrObjectDetectionOutput]:
        """The backbone features (a segmentation head reads them) and the detection outputs, without a loss."""
        features = self.model.extract_features(pixel_values, pixel_mask)
        memory = self.model.encode(features)
        hidden_states, reference_points = self.model.decode(memory, features)
        return features, self.detection_output(hidden_states, reference_points, memory)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                labels: list[dict[str, torch.Tensor]] | None = None) -> ConditionalDetrObjectDetectionOutput:
        _, output = self.predict(pixel_values, pixel_mask)
        if labels is not None:
            output.loss, output.loss_dict = self.compute_loss(output, labels)
        return output
