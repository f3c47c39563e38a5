"""Panoptic segmentation head of Conditional DETR: DETR's mask head (Carion et al. 2020, §4.4 and Fig. 8).

The head turns each object query into a mask logit map at 1/4 of the input resolution:

1. `MHAttentionMap` scores the query against the encoder memory (one map per attention head, no value product);
2. `MaskHeadSmallConv` decodes cat(input-projected features, those maps) with an FPN over backbone stages 2-4.

Unlike `transformers` (docs/reference-compatibility.md, Q13: every feature map is copied once per query, 300x,
which does not fit in 24 GB at 800x1066: bench/RESULTS.md §4), the per-image parts are computed once per image and
the per-query parts only for the queries that need a mask, a chunk of queries at a time.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.conditional_detr import (
    ConditionalDetrForObjectDetection,
    ConditionalDetrObjectDetectionOutput,
    ConditionalDetrPreTrainedModel,
)
from model.config import ConditionalDetrConfig


class MHAttentionMap(nn.Module):
    """Attention weights of every query over the encoder memory, per head (DETR's `MHAttentionMap`).

    The softmax runs jointly over heads x h x w, as in DETR, so the maps of one query sum to 1 over all heads.
    """

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (d_model // num_heads) ** -0.5
        self.q_linear = nn.Linear(d_model, d_model)
        self.k_linear = nn.Linear(d_model, d_model)
        for linear in (self.q_linear, self.k_linear):  # DETR's init
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """queries (N, Q, C) decoder states; memory (N, h*w, C) encoder output; mask (N, h, w), True = image pixel.

        Returns (N, Q, heads, h, w).
        """
        n, num_queries, _ = queries.shape
        h, w = mask.shape[-2:]
        q = self.q_linear(queries).view(n, num_queries, self.num_heads, -1) * self.scale
        # A linear layer on the flattened memory is DETR's 1x1 convolution with k_linear's weights.
        k = self.k_linear(memory).view(n, h, w, self.num_heads, -1)
        logits = torch.einsum("nqmd,nhwmd->nqmhw", q, k)
        logits = logits.masked_fill(~mask[:, None, None], torch.finfo(logits.dtype).min)
        return logits.flatten(2).softmax(-1).view_as(logits)


class MaskHeadSmallConv(nn.Module):
    """DETR's FPN-style mask decoder: 3x3 conv + GroupNorm(8) + ReLU blocks, widths dim, C/2, C/4, C/8, C/16.

    Its input is cat(input-projected features (C channels), attention maps (heads channels)) at stride 32; after
    `lay2`, `lay3` and `lay4` the map is upsampled (nearest) and added to a 1x1 adapter of backbone stage 4, 3, 2.
    The work is split in two so nothing per image is repeated per query:
    `image_context` (once per image) and `forward` (per query).
    """

    def __init__(self, dim: int, fpn_dims: list[int], context_dim: int):
        super().__init__()
        widths = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        if any(width % 8 for width in widths):
            raise ValueError(
                f"the mask head needs GroupNorm(8) on widths {widths} (d_model + heads and d_model / 16 must be "
                f"multiples of 8): got d_model={context_dim}, heads={dim - context_dim}"
            )
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = nn.GroupNorm(8, dim)
        self.lay2 = nn.Conv2d(dim, widths[1], 3, padding=1)
        self.gn2 = nn.GroupNorm(8, widths[1])
        self.lay3 = nn.Conv2d(widths[1], widths[2], 3, padding=1)
        self.gn3 = nn.GroupNorm(8, widths[2])
        self.lay4 = nn.Conv2d(widths[2], widths[3], 3, padding=1)
        self.gn4 = nn.GroupNorm(8, widths[3])
        self.lay5 = nn.Conv2d(widths[3], widths[4], 3, padding=1)
        self.gn5 = nn.GroupNorm(8, widths[4])
        self.out_lay = nn.Conv2d(widths[4], 1, 3, padding=1)
        self.adapter1 = nn.Conv2d(fpn_dims[0], widths[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], widths[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], widths[3], 1)
        self.context_dim = context_dim
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)

    def image_context(
        self, projected: torch.Tensor, fpn_maps: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The per-image part of the head: projected (B, C, h, w); fpn_maps = backbone stages 4, 3, 2.

        `lay1` is linear in its input, so lay1(cat(F, A)) = conv(F, W[:, :C]) + conv(A, W[:, C:]) + bias: the
        feature half (256 of 264 input channels) is done here once; the adapters are 1x1 convs of per-image maps,
        so adapting before the per-query broadcast equals DETR's adapting of 300 identical copies.
        """
        context = F.conv2d(projected, self.lay1.weight[:, : self.context_dim], self.lay1.bias, padding=1)
        adapters = (self.adapter1, self.adapter2, self.adapter3)
        return context, [adapter(fpn) for adapter, fpn in zip(adapters, fpn_maps)]

    def forward(self, context: torch.Tensor, fpn_maps: list[torch.Tensor], attention: torch.Tensor) -> torch.Tensor:
        """Masks of N queries of one image: `image_context` outputs of that image (batch 1, broadcast over the
        queries) and attention maps (N, heads, h, w). Returns mask logits (N, 1, H/4, W/4)."""
        x = context + F.conv2d(attention, self.lay1.weight[:, self.context_dim :], padding=1)
        x = F.relu(self.gn1(x))
        x = F.relu(self.gn2(self.lay2(x)))
        for fpn, conv, norm in zip(fpn_maps, (self.lay3, self.lay4, self.lay5), (self.gn3, self.gn4, self.gn5)):
            x = fpn + F.interpolate(x, size=fpn.shape[-2:], mode="nearest")
            x = F.relu(norm(conv(x)))
        return self.out_lay(x)


@dataclass
class ConditionalDetrSegmentationOutput(ConditionalDetrObjectDetectionOutput):
    """The detection outputs plus `pred_masks`, mask logits at 1/4 of the padded input size.

    Without `mask_query_indices`, `pred_masks` is (B, Q, H/4, W/4): one mask per query (the `transformers` layout).
    With it (pruned inference, training), `mask_query_indices[b]` lists the queries of image b that have a mask,
    ascending, and `pred_masks[b, :len(mask_query_indices[b])]` are their masks; `pred_masks` is (B, K, H/4, W/4)
    with K the largest count, the rows past an image's count filled with the lowest logit (probability 0).
    """

    pred_masks: torch.Tensor | None = None
    mask_query_indices: list[torch.Tensor] | None = None


class ConditionalDetrForSegmentation(ConditionalDetrPreTrainedModel):
    """`ConditionalDetrForObjectDetection` (under `conditional_detr.`) + DETR's panoptic mask head.

    The detection outputs are exactly those of the detection model with the same weights: boxes include the
    reference-point offset, which `transformers`' segmentation class forgets (docs/reference-compatibility.md, Q3).
    """

    def __init__(self, config: ConditionalDetrConfig):
        super().__init__(config)
        self.conditional_detr = ConditionalDetrForObjectDetection(config)
        d_model, heads = config.d_model, config.encoder_attention_heads
        self.bbox_attention = MHAttentionMap(d_model, heads)
        channels = self.conditional_detr.model.backbone.conv_encoder.channels
        self.mask_head = MaskHeadSmallConv(d_model + heads, channels[2::-1], d_model)

    @classmethod
    def from_detector(cls, detector: ConditionalDetrForObjectDetection) -> "ConditionalDetrForSegmentation":
        """A segmentation model around a copy of a trained detector, with a new mask head: the first step of DETR's
        two-stage recipe (train the detector, then the head with `freeze_detector`)."""
        model = cls(detector.config)
        model.conditional_detr.load_state_dict(detector.state_dict())
        return model

    def freeze_detector(self) -> None:
        """Stop training the detector (DETR's `--frozen_weights`): only the mask head and `bbox_attention` learn,
        and a forward with labels then computes the mask losses only."""
        self.conditional_detr.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                labels: list[dict[str, torch.Tensor]] | None = None, score_threshold: float | None = None,
                top_k: int | None = None, mask_chunk_size: int = 8) -> ConditionalDetrSegmentationOutput:
        """Detection outputs + `pred_masks`.

        Masks are computed for every query (the `transformers` output), or, with `score_threshold` and/or
        `top_k`, only for the queries whose best sigmoid class score is `> score_threshold` (at most the `top_k`
        best): exactly the queries the panoptic / instance post-processing with `threshold=score_threshold` keeps,
        so their results do not change. Queries go through the mask head `mask_chunk_size` at a time, which bounds
        the memory at full resolution. With `labels` (per image `class_labels`, `boxes` normalized cxcywh and
        `masks` (N, H, W) at the padded input size) masks are computed for the matched queries only and the loss
        is returned: mask focal + dice, plus the detection terms unless the detector is frozen.
        """
        for name, value in (("top_k", top_k), ("mask_chunk_size", mask_chunk_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of queries, got {value}")
        detector = self.conditional_detr
        trains_detector = any(p.requires_grad for p in detector.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains_detector):
            features, detection = detector.predict(pixel_values, pixel_mask)
        context = self.mask_head.image_context(features.projected, features.feature_maps[2::-1])

        if labels is not None:
            return self._training_output(detection, features.mask, context, labels, trains_detector)
        indices = surviving_queries(detection.logits, score_threshold, top_k)
        masks = [self._masks(detection, features.mask, context, b, queries, mask_chunk_size)
                 for b, queries in enumerate(indices)]
        pruned = score_threshold is not None or top_k is not None
        return ConditionalDetrSegmentationOutput(**vars(detection), pred_masks=_pad_masks(masks),
                                                 mask_query_indices=indices if pruned else None)

    def _masks(self, detection: ConditionalDetrObjectDetectionOutput, mask: torch.Tensor,
               context: tuple[torch.Tensor, list[torch.Tensor]], b: int, queries: torch.Tensor,
               chunk_size: int | None = None) -> torch.Tensor:
        """Mask logits (K, H/4, W/4) of the given queries of image b, `chunk_size` queries at a time (None: all)."""
        lay1_context, fpn_maps = context[0][b : b + 1], [fpn[b : b + 1] for fpn in context[1]]
        if len(queries) == 0:
            return fpn_maps[-1].new_zeros(0, *fpn_maps[-1].shape[-2:])
        maps = self.bbox_attention(detection.last_hidden_state[b : b + 1, queries],
                                   detection.encoder_last_hidden_state[b : b + 1], mask[b : b + 1])[0]
        chunks = maps.split(chunk_size or len(queries))
        return torch.cat([self.mask_head(lay1_context, fpn_maps, chunk)[:, 0] for chunk in chunks])

    def _training_output(self, detection: ConditionalDetrObjectDetectionOutput, mask: torch.Tensor,
                         context: tuple[torch.Tensor, list[torch.Tensor]], labels: list[dict[str, torch.Tensor]],
                         trains_detector: bool) -> ConditionalDetrSegmentationOutput:
        # Only matched queries are supervised by the mask losses, so only theirs are computed (DETR computes all
        # 300 and indexes them). The criterion repeats the (deterministic) matching on the same outputs.
        from model.training.criterion import SetCriterion  # the training stack is optional for inference

        for target in labels:
            if "masks" not in target:
                raise ValueError("segmentation labels need 'masks' (N, H, W) per image besides class_labels/boxes")
        criterion = SetCriterion(self.config, losses=("labels", "boxes", "masks") if trains_detector else ("masks",))
        matches = criterion.matcher(detection.logits, detection.pred_boxes, labels)
        indices = [queries.to(detection.logits.device) for queries, _ in matches]
        masks = [self._masks(detection, mask, context, b, queries) for b, queries in enumerate(indices)]
        dense = masks[0].new_zeros(*detection.logits.shape[:2], *masks[0].shape[-2:])
        for b, (queries, image_masks) in enumerate(zip(indices, masks)):
            dense[b, queries] = image_masks
        output = ConditionalDetrSegmentationOutput(**vars(detection), pred_masks=dense)
        output.loss, output.loss_dict = criterion(output, labels)
        output.pred_masks, output.mask_query_indices = _pad_masks(masks), indices
        return output


def surviving_queries(logits: torch.Tensor, score_threshold: float | None, top_k: int | None) -> list[torch.Tensor]:
    """Per image, the ascending indices of the queries whose best sigmoid class score is `> score_threshold`
    (strict, as the post-processors), keeping at most the `top_k` highest-scoring; None = no such limit."""
    scores = logits.sigmoid().amax(-1)
    indices = []
    for image_scores in scores:
        keep = torch.arange(len(image_scores), device=scores.device)
        if score_threshold is not None:
            keep = keep[image_scores > score_threshold]
        if top_k is not None and len(keep) > top_k:
            keep = keep[image_scores[keep].topk(top_k).indices]
        indices.append(keep.sort().values)
    return indices


def _pad_masks(masks: list[torch.Tensor]) -> torch.Tensor:
    """Per-image (K_b, h, w) masks → (B, max K_b, h, w), padded with the lowest logit."""
    batch = masks[0].new_full((len(masks), max(len(m) for m in masks), *masks[0].shape[-2:]),
                              torch.finfo(masks[0].dtype).min)
    for b, image_masks in enumerate(masks):
        batch[b, : len(image_masks)] = image_masks
    return batch


def has_panoptic_head(path: str | Path) -> bool:
    """Whether a checkpoint directory holds a segmentation model (`architectures` in config.json, as HF writes)."""
    config = Path(path) / "config.json"
    return config.is_file() and "ConditionalDetrForSegmentation" in json.loads(config.read_text()).get(
        "architectures", [])


def load_detector(path: str | Path) -> ConditionalDetrForObjectDetection:
    """The detection model of a checkpoint: a detection model, or a segmentation model's detector (its
    `conditional_detr.` part, identical to a detection model; the mask head only adds masks)."""
    if has_panoptic_head(path):
        return ConditionalDetrForSegmentation.from_pretrained(path).conditional_detr
    return ConditionalDetrForObjectDetection.from_pretrained(path)
