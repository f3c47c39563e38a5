"""Conditional DETR in PyTorch (no Ray, no Redis): the Hugging Face-compatible public API.

Names are resolved lazily (PEP 562) so that `import model` stays cheap and each submodule can be used on its own.
"""
from importlib import import_module

_EXPORTS = {
    "ConditionalDetrConfig": "model.config",
    "ConditionalDetrModel": "model.conditional_detr",
    "ConditionalDetrForObjectDetection": "model.conditional_detr",
    "ConditionalDetrForSegmentation": "model.segmentation",
    "ConditionalDetrImageProcessor": "model.image_processor",
    "ConditionalDetrFeatureExtractor": "model.image_processor",
    "InferenceOptions": "model.inference",
    "optimize": "model.inference",
    "frames_to_device": "model.inference",
    "yuv420_to_rgb": "model.yuv",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
