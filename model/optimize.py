"""Inference-only speed-ups of a loaded model, each behind one switch of `InferenceOptions`, applied by `optimize`.

    model = optimize(ConditionalDetrForObjectDetection.from_pretrained(path).eval())
    with torch.inference_mode():
        outputs = model(pixel_values, pixel_mask)  # pixel_mask None when no frame is padded: no host sync

Defaults are the switches that keep the outputs within 1e-4 of the unoptimized model, were faster on CPU
(bench/RESULTS.md) and cost nothing up front: batch-norm folding and channels-last. `compile` is faster still but
off by default: it stalls the first call at every new input shape (frame size; batch size too, unless
`batch_size` pads the batches to one). `optimize` changes the
model in place (its backbone state dict loses the batch-norm keys), so optimize a model you only run, never one you
train or save.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from model.backbone import ConvEncoder, FrozenBatchNorm2d
from model.conditional_detr import ConditionalDetrForObjectDetection

BATCH_NORMS = (FrozenBatchNorm2d, nn.BatchNorm2d)


@dataclass(frozen=True)
class InferenceOptions:
    """fold_batch_norm: fold each backbone batch norm into the convolution before it (exact up to rounding).
    channels_last: NHWC memory format for the backbone's convolutions (oneDNN / cuDNN's preferred layout).
    compile: `torch.compile` the detector (backbone, transformer and heads; not a segmentation model's mask head,
        whose work depends on the scores) as one graph: inductor, weights frozen as constants so oneDNN gets them
        prepacked and fuses conv + bias + ReLU; on CUDA also one CUDA graph. It compiles again for every new
        input shape, and again for batches with a pixel_mask.
    batch_size: with `compile`, the compiled detector pads every smaller batch to this many frames (blank frames,
        cut from its outputs), so that batches of any size share one compiled shape (and on CUDA one graph).
    dtype: autocast dtype (torch.bfloat16 / torch.float16) for the forward, outputs returned in float32; None keeps
        float32 (the settings' `model.precision`, model/precision.py). Not within 1e-4: judge it by task accuracy
        (`cdetr eval --precision`)."""
    fold_batch_norm: bool = True
    channels_last: bool = True
    compile: bool = False
    batch_size: int | None = None
    dtype: torch.dtype | None = None


def fold_batch_norm(module: nn.Module) -> int:
    """Fold every batch norm of `module`'s ResNet backbone into the convolution registered just before it, and
    replace the batch norm by an identity. Returns the number folded.

    In inference a batch norm is the per-channel affine map y = (x - mean) * s + beta with s = gamma / sqrt(var +
    eps) (Ioffe & Szegedy 2015, eq. in Alg. 1), so conv followed by it is one conv with weight W * s and bias
    (b - mean) * s + beta. That saves one full pass over every feature map (53 in a ResNet-50). In torchvision's
    ResNets each batch norm is registered right after the convolution that feeds it (conv1/bn1, ...,
    downsample.0/1), which is how the pairs are found.
    """
    folded = 0
    for encoder in (m for m in module.modules() if isinstance(m, ConvEncoder)):
        for parent in list(encoder.modules()):
            children = list(parent.named_children())
            for (_, conv), (norm_name, norm) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(norm, BATCH_NORMS):
                    _fold_into(conv, norm)
                    setattr(parent, norm_name, nn.Identity())
                    folded += 1
    return folded


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, norm: nn.Module) -> None:
    if isinstance(norm, nn.BatchNorm2d) and norm.training:
        raise ValueError("batch norm in training mode uses batch statistics and cannot be folded: call .eval()")
    # float64 so the folded weights round once, not twice.
    scale = norm.weight.double() / (norm.running_var.double() + norm.eps).sqrt()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    conv.weight.copy_((conv.weight.double() * scale[:, None, None, None]).to(conv.weight.dtype))
    folded_bias = (bias - norm.running_mean.double()) * scale + norm.bias.double()
    conv.bias = nn.Parameter(folded_bias.to(conv.weight.dtype), requires_grad=False)


def optimize(model: nn.Module, options: InferenceOptions = InferenceOptions()) -> nn.Module:
    """Apply `options` to an object-detection or segmentation model in place; returns it, in eval mode."""
    model.eval().requires_grad_(False)
    device_type = next(model.parameters()).device.type
    if options.fold_batch_norm:
        fold_batch_norm(model)
    encoders = [m for m in model.modules() if isinstance(m, ConvEncoder)]
    if options.channels_last:
        for encoder in encoders:
            encoder.to(memory_format=torch.channels_last)
            # The weights alone are not enough: a contiguous NCHW input makes the first conv's output NCHW again.
            encoder.register_forward_pre_hook(_inputs_to_channels_last)
    if options.compile:
        # Freezing makes the weights graph constants. It must be the global setting, not a compile option: dynamo
        # reads it when it traces (torch._dynamo.utils.is_parameter_freezing) and otherwise passes the weights as
        # inputs, which leaves nothing to prepack (measured: no gain). It applies only under inference mode.
        torch._inductor.config.freezing = True
        # On CUDA, "reduce-overhead" also replays each shape's kernels as one CUDA graph (with `batch_size`, one
        # shape per frame size). Without a pixel_mask the whole detector is one graph (no host sync breaks it;
        # tests/test_optimize.py checks), so the transformer's many small kernels, which dominate at small
        # batches on a GPU (bench/RESULTS.md 1b), are replayed too, not only the backbone's. A mask's host syncs
        # split the graph in three.
        mode = "reduce-overhead" if device_type == "cuda" else None
        for detector in (m for m in model.modules() if isinstance(m, ConditionalDetrForObjectDetection)):
            compiled = torch.compile(detector.predict, dynamic=False, mode=mode)
            detector.predict = _padded_to(options.batch_size, compiled)
    if options.dtype is not None:
        model.forward = _autocast_forward(model.forward, device_type, options.dtype)
    return model


def _padded_to(batch_size: int | None, predict):
    """`predict` (a detector's) on batches padded to `batch_size`, returning only the real frames' outputs."""
    if batch_size is None:
        return predict

    @functools.wraps(predict)
    def padded(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None):
        frames = pixel_values.shape[0]
        if frames < batch_size:
            # Blank frames: zero pixels, no padding (a mask of ones: an all-padding image has nothing to attend
            # to). F.pad keeps the input's strides (torch.cat would not, and a compiled graph is specialized to its
            # input's strides too).
            blank = batch_size - frames
            pixel_values = F.pad(pixel_values, (0, 0, 0, 0, 0, 0, 0, blank))
            if pixel_mask is not None:
                pixel_mask = F.pad(pixel_mask, (0, 0, 0, 0, 0, blank), value=1)
        return _first_frames(predict(pixel_values, pixel_mask), frames)
    return padded


def _first_frames(outputs, frames: int):
    """`outputs` (tensors in dataclasses, tuples, lists and dicts; batch first) cut to their first `frames`."""
    if isinstance(outputs, torch.Tensor):
        return outputs[:frames]
    if dataclasses.is_dataclass(outputs):
        return dataclasses.replace(outputs, **{field.name: _first_frames(getattr(outputs, field.name), frames)
                                               for field in dataclasses.fields(outputs)})
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_first_frames(item, frames) for item in outputs)
    if isinstance(outputs, dict):
        return {key: _first_frames(value, frames) for key, value in outputs.items()}
    return outputs


def _autocast_forward(forward, device_type: str, dtype: torch.dtype):
    """`forward` under autocast, its output's low-precision tensors cast back to float32: the post-processing
    (top-k of scores, box arithmetic, mask thresholds) then runs as it does without autocast, and bf16's 8-bit
    mantissa does not turn close scores into ties. Measured on the shapes-tiny test set (bench/RESULTS.md): same
    bbox AP and PQ as float32 to +-0.001."""
    autocast_forward = torch.autocast(device_type, dtype=dtype)(forward)

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        outputs = autocast_forward(*args, **kwargs)
        for name, value in vars(outputs).items():
            if isinstance(value, torch.Tensor) and value.dtype == dtype:
                setattr(outputs, name, value.float())
        return outputs
    return wrapped


def _inputs_to_channels_last(module: nn.Module, inputs: tuple) -> tuple:
    pixel_values, *rest = inputs
    return (pixel_values.contiguous(memory_format=torch.channels_last), *rest)


def frames_to_device(frames: np.ndarray, device: torch.device | str, pin_memory: bool = True) -> torch.Tensor:
    """Host uint8 frames -> a tensor on `device` (always a copy: arrays from Ray's object store are read-only).

    To a GPU the frames go through page-locked (pinned) memory and an asynchronous copy: the DMA engine reads
    pinned pages directly, while a copy from pageable memory is first staged by the driver through a pinned buffer
    of its own and blocks the host (CUDA C++ Programming Guide, "Page-Locked Host Memory"). PyTorch's caching host
    allocator keeps the pinned buffer alive until the copy has finished. `pin_memory=False` is the plain copy,
    kept to measure the difference (bench/bench_model.py)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.from_numpy(np.array(frames))
    host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=pin_memory)
    host.numpy()[...] = frames
    return host.to(device, non_blocking=pin_memory)
