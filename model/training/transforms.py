"""DETR's augmentations (its `datasets/transforms.py`) on (PIL image, target) pairs with absolute xyxy boxes.

The last transform, `ToModelTarget`, turns a target into what the criterion expects: `boxes` normalized cxcywh
relative to the (unpadded) augmented image, as the original DETR does (the processor's batch padding does not
rescale them, docs/reference-compatibility.md, Q7).
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.box_ops import box_xyxy_to_cxcywh
from model.image_size import get_resize_output_size


def _keep(target: dict, keep: torch.Tensor) -> dict:
    per_object = ("class_labels", "boxes", "masks")
    return {k: (v[keep] if k in per_object else v) for k, v in target.items()}


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        if random.random() >= self.p:
            return image, target
        target = dict(target)
        x0, y0, x1, y1 = target["boxes"].unbind(-1)
        target["boxes"] = torch.stack([image.width - x1, y0, image.width - x0, y1], dim=-1)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), target


class RandomResize:
    """Resize the shorter side to a size drawn from `sizes` (multi-scale training), the longer side ≤ max_size
    (the processor's rounding rule, so evaluation-time resizing matches)."""

    def __init__(self, sizes: list[int], max_size: int | None = None):
        self.sizes, self.max_size = sizes, max_size

    def __call__(self, image, target):
        size = {"shortest_edge": random.choice(self.sizes), "longest_edge": self.max_size}
        height, width = get_resize_output_size(image.height, image.width, size)
        target = dict(target)
        target["boxes"] = target["boxes"] * torch.tensor([width / image.width, height / image.height] * 2)
        if "masks" in target:  # (a crop of a void background can leave no segment: interpolate needs one)
            masks = target["masks"]
            target["masks"] = (F.interpolate(masks[None].float(), size=(height, width), mode="nearest")[0] > 0.5
                               if len(masks) else masks.new_zeros((0, height, width)))
        return image.resize((width, height), Image.Resampling.BILINEAR), target


class RandomSizeCrop:
    """Crop a random window with sides in [min_size, max_size] (clipped to the image); drop emptied objects."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target):
        w = random.randint(min(self.min_size, image.width), min(image.width, self.max_size))
        h = random.randint(min(self.min_size, image.height), min(image.height, self.max_size))
        left, top = random.randint(0, image.width - w), random.randint(0, image.height - h)
        target = dict(target)
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
        boxes = torch.min(boxes.reshape(-1, 2, 2), torch.tensor([w, h], dtype=torch.float32)).clamp(min=0)
        target["boxes"] = boxes.reshape(-1, 4)
        if "masks" in target:
            target["masks"] = target["masks"][:, top:top + h, left:left + w]
            keep = target["masks"].flatten(1).any(1)
        else:
            keep = (boxes[:, 1] > boxes[:, 0]).all(1)
        return image.crop((left, top, left + w, top + h)), _keep(target, keep)


class RandomSelect:
    """Apply `first` with probability p, else `second` (DETR's choice between plain and crop augmentation)."""

    def __init__(self, first, second, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target):
        return self.first(image, target) if random.random() < self.p else self.second(image, target)


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target


class ToModelTarget:
    """Last step: boxes to normalized cxcywh of the final image, `size` = its (h, w), image to a uint8 array."""

    def __call__(self, image, target):
        target = dict(target)
        scale = torch.tensor([image.width, image.height] * 2, dtype=torch.float32)
        target["boxes"] = box_xyxy_to_cxcywh(target["boxes"] / scale)
        target["size"] = torch.tensor([image.height, image.width])
        return np.asarray(image), target


def make_transforms(train: bool, size: int, min_scale: float = 0.6) -> Compose:
    """DETR's recipe scaled to a base (shorter-side) size: 800 in DETR, e.g. 320 for shapes.

    Training: flip, then either a multi-scale resize (min_scale..1.0 x size; DETR's 480..800 is 0.6) or
    resize-crop-resize (crop sides 0.48..0.75 x size, like 384..600, then the same scales). Evaluation: shorter
    side = size. Longer side ≤ 1.667 x size. A min_scale near 1 trains at the size the processor feeds the model
    at inference: the width of a box is not scale-invariant in a briefly trained model (model/weights/EVAL.md).
    """
    max_size = int(size * 1333 / 800)
    if not train:
        return Compose([RandomResize([size], max_size), ToModelTarget()])
    scales = list(range(int(min_scale * size) // 16 * 16, size + 1, 16))
    crop = Compose([RandomResize([int(size * r) for r in (0.5, 0.625, 0.75)]),
                    RandomSizeCrop(int(0.48 * size), int(0.75 * size)),
                    RandomResize(scales, max_size)])
    return Compose([RandomHorizontalFlip(), RandomSelect(RandomResize(scales, max_size), crop), ToModelTarget()])
