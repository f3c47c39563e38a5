"""Reference models built and saved by `transformers` itself (test-only; `model/` never imports transformers).

Weights are random but every parameter kind is exercised: LayerNorm affine parameters, linear biases and the
frozen batch-norm buffers are randomized (HF initialises them to 1 / 0, which would hide a swapped or skipped op).
Configs are shrunk (layers, ffn, queries) for speed; the ResNet backbones stay real.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import ConditionalDetrConfig as HFConfig  # noqa: E402
from transformers import ConditionalDetrForObjectDetection as HFDetection  # noqa: E402

SMALL = dict(encoder_layers=2, decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=12,
             num_labels=7, auxiliary_loss=False, use_pretrained_backbone=False)


def make_hf_detector(backbone: str = "resnet50", dilation: bool = False, seed: int = 0, **overrides) -> HFDetection:
    """A small random `transformers` ConditionalDetrForObjectDetection in eval mode."""
    torch.manual_seed(seed)
    config = HFConfig(backbone=backbone, dilation=dilation, **{**SMALL, **overrides})
    model = HFDetection(config).eval()
    randomize_(model, seed)
    return model


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Randomize what HF initialises to constants (LayerNorm affine, biases, frozen-BN buffers), and give the
    transformer unit-variance-preserving weights instead of HF's normal(0, 0.02), so that attention is peaked
    and every term (e.g. the spatial half of the cross-attention) moves the outputs well above the tolerance."""
    generator = torch.Generator().manual_seed(seed + 1)
    for name, tensor in model.state_dict().items():
        # The state-dict tensors share storage with the parameters/buffers, so in-place writes stick.
        if tensor.dim() == 2:  # Linear weights and the query embedding
            fan_in = tensor.shape[1] if "embeddings" not in name else 1
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 1.5 / fan_in ** 0.5)
        elif name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        elif name.endswith(("running_mean", "bias")):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
        elif tensor.dim() == 1 and name.endswith("weight"):  # LayerNorm and frozen-BN scales
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)


def save_hf_v4(model: HFDetection, directory: Path) -> Path:
    """What `transformers` 5.24 `save_pretrained` writes: the v4 key layout (it reverts its own renames)."""
    model.save_pretrained(directory)
    return directory


def save_hf_v5(model: HFDetection, directory: Path) -> Path:
    """The in-memory v5 `state_dict()` keys saved as-is, next to the config `save_pretrained` writes."""
    model.config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    return directory


def padded_batch(seed: int = 0, sizes: tuple[tuple[int, int], ...] = ((96, 128), (128, 96))
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images of different sizes padded bottom/right into one batch, with the HF int64 pixel_mask."""
    generator = torch.Generator().manual_seed(seed)
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    pixel_values = torch.zeros(len(sizes), 3, height, width)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.int64)
    for i, (h, w) in enumerate(sizes):
        pixel_values[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        pixel_mask[i, :h, :w] = 1
    return pixel_values, pixel_mask
