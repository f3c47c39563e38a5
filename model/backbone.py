"""Convolutional backbone: a torchvision ResNet returning its four stage maps with the pixel mask at each stride.

Submodule names give the HF v4 state-dict keys `model.backbone.conv_encoder.model.{conv1,bn1,layer1..4}.*`
(torchvision and timm ResNets share these names); `Joiner` adds `model.backbone.position_embedding.*` for the
learned position embedding, as HF v4 and DETR's `Joiner` do.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from model.config import ConditionalDetrConfig
from model.position_encoding import build_position_embedding

STAGES = ("layer1", "layer2", "layer3", "layer4")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all stored as buffers (DETR, HF).

    Pretrained detectors are trained with batch sizes of 1-2 images per GPU, far too few for batch statistics, so
    the ImageNet statistics are frozen. eps = 1e-5 as in torchvision's BatchNorm2d.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checkpoints saved from a plain BatchNorm2d carry a step counter that has no meaning here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inference-mode batch norm is exactly the frozen affine map, in one fused kernel (measured ~1.8x faster
        # than the two-pass x * scale + shift on a stride-4 map).
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=self.eps)


def downsample_mask(mask: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """(B, H, W) bool pixel mask → (B, *size) bool, nearest-neighbour (DETR / HF semantics)."""
    return F.interpolate(mask[None].float(), size=size).bool()[0]


class ConvEncoder(nn.Module):
    """ResNet-18/34/50/101 (random init; weights come from checkpoints) without its classification head."""

    def __init__(self, config: ConditionalDetrConfig):
        super().__init__()
        norm_layer = FrozenBatchNorm2d if config.frozen_batch_norm else nn.BatchNorm2d
        # DC5: the last stage keeps stride 16 and dilates its 3x3 convolutions instead
        # (docs/checkpoint-formats.md, "DC5").
        dilation = [False, False, config.dilation] if config.dilation else None
        resnet = getattr(torchvision.models, config.backbone)(
            weights=None, replace_stride_with_dilation=dilation, norm_layer=norm_layer)
        if config.num_channels != 3:
            resnet.conv1 = nn.Conv2d(config.num_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        del resnet.fc, resnet.avgpool
        self.model = resnet
        self.channels = [self._stage_channels(getattr(resnet, name)) for name in STAGES]
        if config.frozen_batch_norm:
            # Pretrained use (original Conditional DETR): only layer2-4 are fine-tuned; the stem and layer1 keep
            # their ImageNet filters. With plain BN the backbone is trained from scratch, so everything learns.
            for name, parameter in self.model.named_parameters():
                if not name.startswith(("layer2", "layer3", "layer4")):
                    parameter.requires_grad_(False)

    @staticmethod
    def _stage_channels(stage: nn.Sequential) -> int:
        last_block = stage[-1]
        return (last_block.conv3 if hasattr(last_block, "conv3") else last_block.conv2).out_channels

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(B, C, H, W), (B, H, W) bool → [(feature map, mask)] for strides 4, 8, 16, 32 (DC5: 4, 8, 16, 16)."""
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(pixel_values))))
        out = []
        for name in STAGES:
            x = getattr(m, name)(x)
            out.append((x, downsample_mask(pixel_mask, x.shape[-2:])))
        return out


class Joiner(nn.Module):
    """Backbone + position embedding of the last map (`model.backbone` in the HF v4 layout)."""

    def __init__(self, config: ConditionalDetrConfig):
        super().__init__()
        self.conv_encoder = ConvEncoder(config)
        self.position_embedding = build_position_embedding(config.position_embedding_type, config.d_model)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor
                ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Stage maps with their masks, and the (B, d_model, h, w) position embedding of the last map."""
        features = self.conv_encoder(pixel_values, pixel_mask)
        last_mask = features[-1][1]
        return features, self.position_embedding(last_mask).to(pixel_values.dtype)
