"""Conditional DETR in PyTorch (no Ray, no Redis): the Hugging Face-compatible public API.

This package holds the network and its processing: the model (`config`, `backbone`, `position_encoding`,
`transformer`, `conditional_detr`, `segmentation`, `checkpoint`), the image processor and what it uses
(`image_processor`, `image_size`, `coco_targets`, `post_processing`, `box_ops`, `yuv`), COCO file formats
(`coco_format`), the inference speed-ups (`optimize`) and the bundled weights (`weights/`). Training and its data
live in `model.training`, which nothing here needs for inference.

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
    "InferenceOptions": "model.optimize",
    "optimize": "model.optimize",
    "frames_to_device": "model.optimize",
    "yuv420_to_rgb": "model.yuv",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
