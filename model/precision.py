"""Which precision the model runs in: `fp32`, `bf16`, `fp16`, or `auto`, the one this hardware runs fast.

`auto` is a pure function of what the hardware has (`Hardware`, read by `detect_hardware`), measured in
bench/RESULTS.md:
- a CPU with AMX (Intel Xeon 4th gen and later: flags amx_tile and amx_bf16) multiplies bf16 matrices in tiles:
  2.4-4.4x its fp32 speed in PyTorch and OpenVINO -> bf16;
- a CPU with avx512_bf16 but no AMX: bf16 was 4x faster than fp32 on an AMD EPYC (Zen 5) and 1.6x *slower* on an
  Intel Xeon, so there is no safe guess -> fp32 (measure with `cdetr bench model` and choose bf16 by name);
- any other CPU has no bf16 arithmetic (it is emulated, slower than fp32) -> fp32;
- a CUDA GPU of compute capability 8.0 or later (Ampere, Hopper, ...) has bf16 tensor cores: bf16 (1.5-1.9x fp32 at
  batch 8-32 on an H100); older GPUs -> fp32 (fp16 would be their fast path, but its 5-bit exponent can overflow in
  the transformer, and it has not been evaluated).
ONNX Runtime runs fp32 only (model/runtime.py), so `auto` is fp32 there.

Low precision costs accuracy: logits move by ~1e-2; the bundled model's AP and PQ under each precision are in
model/weights/EVAL.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# What `optimize` takes (InferenceOptions.dtype: the autocast dtype, None = float32).
TORCH_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMX_FLAGS = frozenset({"amx_tile", "amx_bf16"})


@dataclass(frozen=True)
class Hardware:
    """device: "cpu" or "cuda"; cpu_flags: /proc/cpuinfo's flags (empty where it cannot be read); cuda_capability:
    the GPU's (major, minor), None on a CPU."""
    device: str
    cpu_flags: frozenset[str] = frozenset()
    cuda_capability: tuple[int, int] | None = None

    @property
    def cpu_kind(self) -> str:
        """amx, avx512_bf16 or none: the CPU's fastest bf16 arithmetic."""
        if AMX_FLAGS <= self.cpu_flags:
            return "amx"
        return "avx512_bf16" if "avx512_bf16" in self.cpu_flags else "none"


def detect_hardware(device: torch.device | str = "cpu", cpuinfo: Path = Path("/proc/cpuinfo")) -> Hardware:
    device = torch.device(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return Hardware(device=device.type, cpu_flags=cpu_flags(cpuinfo), cuda_capability=capability)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's flags (Linux); empty elsewhere, which `auto` reads as "no fast bf16"."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def auto_precision(hardware: Hardware, runtime: str = "torch") -> str:
    """The precision `auto` stands for (module docstring)."""
    if runtime == "onnxruntime":
        return "fp32"
    if hardware.device == "cuda":
        return "bf16" if hardware.cuda_capability is not None and hardware.cuda_capability >= (8, 0) else "fp32"
    return "bf16" if hardware.cpu_kind == "amx" else "fp32"


def resolve_precision(precision: str, hardware: Hardware, runtime: str = "torch") -> str:
    """`precision` with `auto` replaced by what it stands for on `hardware`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return auto_precision(hardware, runtime) if precision == "auto" else precision
