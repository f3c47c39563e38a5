"""The Conditional DETR transformer: DETR's post-norm encoder and the conditional decoder (arXiv 2108.06152).

Module names map one to one onto the HF v4 state-dict keys (`self_attn.{q,k,v,out}_proj`, `sa_*_proj`,
`ca_*_proj`, `encoder_attn.out_proj`, `fc1`, `fc2`, `*_layer_norm`, `decoder.layernorm`, `query_scale`,
`ref_point_head`). Attention runs through `torch.nn.functional.scaled_dot_product_attention`.

Padding masks use the HF convention: True = valid pixel; attention receives `key_padding_mask` (True = padding),
or None when nothing is padded so that the fused SDPA kernels without masks can run.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from model.config import ConditionalDetrConfig
from model.position_encoding import reference_point_embedding

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (DETR's MLP; keys `layers.{i}`)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H*D) → (B, L, H, D)."""
    return x.unflatten(-1, (num_heads, -1))


class Attention(nn.Module):
    """Multi-head attention over already projected, head-split inputs, followed by `out_proj`.

    As in the original's `attention.py`, the input projections live outside: the conditional decoder projects
    content and position separately and concatenates them per head, so queries/keys may be wider than values.
    The softmax scale is 1/sqrt(query head dim) (64^-0.5 for the conditional cross-attention at d_model 256).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Lq, H, Dqk), key (B, Lk, H, Dqk), value (B, Lk, H, Dv), key_padding_mask (B, Lk) True = pad."""
        value_dim = value.shape[-1]
        if query.shape[-1] > value_dim:
            # The conditional cross-attention has values half as wide as queries/keys; SDPA's fused kernels need
            # equal widths, so zero-pad the values and drop the zero columns after (measured 2x faster on CPU
            # than SDPA's generic fallback for unequal widths).
            value = F.pad(value, (0, query.shape[-1] - value_dim))
        attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out[..., :value_dim].transpose(1, 2).flatten(2))


class SelfAttention(Attention):
    """Encoder self-attention: positions are added to queries and keys, not to values (DETR)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__(d_model, num_heads, dropout)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)

    def attend(self, hidden: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        with_pos = hidden + pos
        heads = self.num_heads
        return self(split_heads(self.q_proj(with_pos), heads), split_heads(self.k_proj(with_pos), heads),
                    split_heads(self.v_proj(hidden), heads), key_padding_mask)


class FeedForwardMixin:
    """fc1 → activation → dropout → fc2, shared by encoder and decoder layers (keys `fc1`, `fc2`)."""

    def _init_ffn(self, config: ConditionalDetrConfig, ffn_dim: int) -> None:
        self.fc1 = nn.Linear(config.d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, config.d_model)
        self.activation = ACTIVATIONS[config.activation_function]
        self.activation_dropout = nn.Dropout(config.activation_dropout)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_dropout(self.activation(self.fc1(x))))


class EncoderLayer(FeedForwardMixin, nn.Module):
    """Post-norm DETR encoder layer: q = k = h + pos, v = h."""

    def __init__(self, config: ConditionalDetrConfig):
        super().__init__()
        self.self_attn = SelfAttention(config.d_model, config.encoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self._init_ffn(config, config.encoder_ffn_dim)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = self.self_attn_layer_norm(hidden + self.dropout(self.self_attn.attend(hidden, pos, key_padding_mask)))
        return self.final_layer_norm(hidden + self.dropout(self.feed_forward(hidden)))


class Encoder(nn.Module):
    def __init__(self, config: ConditionalDetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))

    def forward(self, src: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, S, C) flattened projected features → (B, S, C) memory. (No input dropout, unlike HF:
        docs/reference-compatibility.md, Q10.)"""
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return src


class DecoderLayer(FeedForwardMixin, nn.Module):
    """Conditional decoder layer: self-attention with separate content/position projections, then the conditional
    cross-attention whose per-head query is [content ; spatial] and key is [content ; position] (paper eq. 3)."""

    def __init__(self, config: ConditionalDetrConfig, is_first: bool):
        super().__init__()
        d_model = config.d_model
        self.num_heads = config.decoder_attention_heads
        self.conditional = config.conditional_cross_attention
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = Attention(d_model, self.num_heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        # The learned query p_q enters the cross-attention query only in the first layer (the original sets
        # ca_qpos_proj = None in the others); DETR-style cross-attention adds it in every layer.
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if is_first or not self.conditional else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model) if self.conditional else None
        self.encoder_attn = Attention(d_model, self.num_heads, config.attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
        self._init_ffn(config, config.decoder_ffn_dim)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: torch.Tensor, query_pos: torch.Tensor, query_sine_embed: torch.Tensor | None,
                memory: torch.Tensor, memory_pos: torch.Tensor, key_padding_mask: torch.Tensor | None
                ) -> torch.Tensor:
        heads = self.num_heads
        q = self.sa_qcontent_proj(hidden) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(hidden) + self.sa_kpos_proj(query_pos)
        v = self.sa_v_proj(hidden)
        attended = self.self_attn(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
        hidden = self.self_attn_layer_norm(hidden + self.dropout(attended))

        query, key = self._cross_attention_query_key(hidden, query_pos, query_sine_embed, memory, memory_pos)
        value = split_heads(self.ca_v_proj(memory), heads)
        hidden = self.encoder_attn_layer_norm(
            hidden + self.dropout(self.encoder_attn(query, key, value, key_padding_mask)))
        return self.final_layer_norm(hidden + self.dropout(self.feed_forward(hidden)))

    def _cross_attention_query_key(self, hidden, query_pos, query_sine_embed, memory, memory_pos):
        heads = self.num_heads
        q_content = self.ca_qcontent_proj(hidden)
        k_content = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(memory_pos)
        if self.ca_qpos_proj is not None:
            q_content = q_content + self.ca_qpos_proj(query_pos)
            k_content = k_content + k_pos
        if not self.conditional:
            return split_heads(q_content, heads), split_heads(k_content, heads)
        # Per-head concatenation: each head's logit = content·content + spatial·spatial (paper eq. 3), with the
        # softmax scale of the doubled head dim (2*d_model/heads, 64 at d_model 256) as in the original.
        q_spatial = self.ca_qpos_sine_proj(query_sine_embed)
        query = torch.cat((split_heads(q_content, heads), split_heads(q_spatial, heads)), dim=-1)
        key = torch.cat((split_heads(k_content, heads), split_heads(k_pos, heads)), dim=-1)
        return query, key


class Decoder(nn.Module):
    """Six conditional layers sharing one set of reference points s = sigmoid(ref_point_head(p_q)).

    We follow the original, not HF (docs/reference-compatibility.md, Q2): the un-normalized state flows from layer
    to layer (and into `query_scale`); the shared final `layernorm` is applied to each returned state only. So
    `auxiliary_loss` changes which states are returned, never the final output; HF instead feeds normalized states
    onward when it is on.
    """

    def __init__(self, config: ConditionalDetrConfig):
        super().__init__()
        d_model = config.d_model
        self.d_model = d_model
        self.conditional = config.conditional_cross_attention
        self.layers = nn.ModuleList(DecoderLayer(config, is_first=i == 0) for i in range(config.decoder_layers))
        self.layernorm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, 2, 2)

    def forward(self, query_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor,
                key_padding_mask: torch.Tensor | None, return_intermediate: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """query_pos (B, Q, C) learned queries, memory / memory_pos (B, S, C) → normalized hidden states
        (L, B, Q, C) for every layer if `return_intermediate`, else (1, B, Q, C) for the last; and the reference
        points (B, Q, 2) as normalized (x, y)."""
        reference_points = self.ref_point_head(query_pos).sigmoid()
        sine_embed = reference_point_embedding(reference_points, self.d_model).to(query_pos.dtype)
        hidden = torch.zeros_like(query_pos)
        states = []
        for i, layer in enumerate(self.layers):
            query_sine_embed = None
            if self.conditional:
                # p_s scaled by λ_q = FFN(f) from the decoder embedding (paper eq. 4); λ_q = 1 in the first layer.
                query_sine_embed = sine_embed if i == 0 else sine_embed * self.query_scale(hidden)
            hidden = layer(hidden, query_pos, query_sine_embed, memory, memory_pos, key_padding_mask)
            if return_intermediate or i == len(self.layers) - 1:
                states.append(self.layernorm(hidden))
        return torch.stack(states), reference_points
