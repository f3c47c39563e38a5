"""Position embeddings: the 2-D sine embedding of feature-map pixels, its 1-D form for decoder reference points, and
DETR's learned row/column embedding.

Both sine embeddings share `sine_features` (the "coordinate → interleaved sin/cos" step of "Attention is all you
need", generalised to images by DETR), so the encoder keys and the conditional spatial queries (Conditional DETR
eq. 4, p_s = sinusoidal(s)) use exactly the same frequencies.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# Rows/columns covered by the learned embedding (as in DETR and HF): feature maps up to 50x50, i.e. 1600x1600 px.
LEARNED_MAX_SIZE = 50


def sine_features(coords: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """(...,) coordinates (already scaled to radians) → (..., num_feats): [sin(c/t_0), cos(c/t_0), sin(c/t_1), ...]
    with t_i = temperature^(2*floor(i/2)/num_feats)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    angles = coords[..., None] / dim_t
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def reference_point_embedding(points: torch.Tensor, d_model: int) -> torch.Tensor:
    """(..., 2) normalized (x, y) reference points → (..., d_model) = cat(sine(y), sine(x)), d_model // 2 features
    per coordinate; the (y, x) order matches the image embedding so p_s lives in the same space as the keys."""
    scaled = points * (2 * math.pi)
    num_feats = d_model // 2
    return torch.cat((sine_features(scaled[..., 1], num_feats), sine_features(scaled[..., 0], num_feats)), dim=-1)


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine embedding: normalized cumulative pixel counts of the valid region, scaled to [0, 2π]."""

    def __init__(self, num_feats: int, temperature: float = 10000.0, eps: float = 1e-6):
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.eps = eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask (B, h, w) bool, True on valid pixels → (B, 2*num_feats, h, w) = cat(pos_y, pos_x)."""
        valid = mask.to(torch.float32)
        # Counting only valid pixels makes the embedding independent of how much padding the batch added.
        y_embed = valid.cumsum(1)
        x_embed = valid.cumsum(2)
        y_embed = y_embed / (y_embed[:, -1:, :] + self.eps) * (2 * math.pi)
        x_embed = x_embed / (x_embed[:, :, -1:] + self.eps) * (2 * math.pi)
        pos_y = sine_features(y_embed, self.num_feats, self.temperature)
        pos_x = sine_features(x_embed, self.num_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """DETR's learned embedding: a row and a column table, concatenated as (x, y)."""

    def __init__(self, num_feats: int):
        super().__init__()
        # Names follow the HF v4 layout (`model.backbone.position_embedding.{row,column}_embeddings`).
        self.row_embeddings = nn.Embedding(LEARNED_MAX_SIZE, num_feats)
        self.column_embeddings = nn.Embedding(LEARNED_MAX_SIZE, num_feats)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask (B, h, w) → (B, 2*num_feats, h, w); the mask only supplies the shape, as in DETR."""
        batch, height, width = mask.shape
        if height > LEARNED_MAX_SIZE or width > LEARNED_MAX_SIZE:
            raise ValueError(f"learned position embedding covers feature maps up to {LEARNED_MAX_SIZE}x"
                             f"{LEARNED_MAX_SIZE}, got {height}x{width}")
        x_emb = self.column_embeddings(torch.arange(width, device=mask.device))
        y_emb = self.row_embeddings(torch.arange(height, device=mask.device))
        pos = torch.cat((x_emb[None].expand(height, -1, -1), y_emb[:, None].expand(-1, width, -1)), dim=-1)
        return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1)


def build_position_embedding(kind: str, d_model: int) -> nn.Module:
    """`sine` or `learned`, d_model // 2 features per axis (the config validates `kind`)."""
    if kind == "learned":
        return PositionEmbeddingLearned(d_model // 2)
    return PositionEmbeddingSine(d_model // 2)
