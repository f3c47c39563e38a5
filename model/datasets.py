"""COCO detection / panoptic datasets (as written by `model.shapes.write_dataset`) with DETR's augmentations.

Samples are (PIL image, target) with target boxes in absolute xyxy pixels while augmenting; the last transform,
`ToModelTarget`, turns them into what the criterion expects: `class_labels`, `boxes` normalized cxcywh relative to
the (unpadded) augmented image, as the original DETR does (the processor's batch padding does not rescale them,
reference quirk Q7). Normalization and padding are the image processor's job, done per batch in `Collator`.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler

from model.box_ops import box_xywh_to_xyxy, box_xyxy_to_cxcywh
from model.image_size import get_resize_output_size
from model.panoptic import decode_id_png, rle_to_mask


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a COCO dataset written by model.shapes.write_dataset")
    return json.loads(path.read_text())


def _base_target(image_id: int, labels: list[int], boxes_xywh: list, height: int, width: int) -> dict:
    return {
        "image_id": torch.tensor(image_id),
        "class_labels": torch.tensor(labels, dtype=torch.int64),
        "boxes": box_xywh_to_xyxy(torch.tensor(boxes_xywh, dtype=torch.float32).reshape(-1, 4)),
        "orig_size": torch.tensor([height, width]),
    }


class CocoDetection(Dataset):
    """`root/images/*.png` + `root/annotations.json`; with `masks=True` the RLE segmentations become `masks`."""

    def __init__(self, root: str | Path, transforms=None, masks: bool = False):
        self.root, self.transforms, self.masks = Path(root), transforms, masks
        coco = _read_json(self.root / "annotations.json")
        self.images = sorted(coco["images"], key=lambda i: i["id"])
        self.annotations = {i["id"]: [] for i in self.images}
        for ann in coco["annotations"]:
            if not ann.get("iscrowd", 0):  # crowd regions are not training targets (as in DETR)
                self.annotations[ann["image_id"]].append(ann)

    def __len__(self) -> int:
        return len(self.images)

    def landscape(self) -> list[bool]:
        """Per sample: is the image at least as wide as high (for `AspectGroupedBatches`)."""
        return [info["width"] >= info["height"] for info in self.images]

    def __getitem__(self, index: int):
        info = self.images[index]
        image = Image.open(self.root / "images" / info["file_name"]).convert("RGB")
        anns = self.annotations[info["id"]]
        target = _base_target(info["id"], [a["category_id"] for a in anns], [a["bbox"] for a in anns],
                              image.height, image.width)
        if self.masks:
            decoded = [rle_to_mask(a["segmentation"]) for a in anns]
            target["masks"] = torch.from_numpy(np.stack(decoded) if decoded else
                                               np.zeros((0, image.height, image.width), bool))
        return self.transforms(image, target) if self.transforms else (image, target)


class CocoPanoptic(Dataset):
    """`root/images/*.png` + `root/panoptic/*.png` (id = R + 256 G + 256^2 B) + `root/panoptic.json`.

    Every segment, thing or stuff, is a target with its mask; `isthing` tells them apart.
    """

    def __init__(self, root: str | Path, transforms=None):
        self.root, self.transforms = Path(root), transforms
        coco = _read_json(self.root / "panoptic.json")
        self.images = {i["id"]: i for i in coco["images"]}
        self.annotations = sorted(coco["annotations"], key=lambda a: a["image_id"])
        self.isthing = {c["id"]: bool(c["isthing"]) for c in coco["categories"]}

    def __len__(self) -> int:
        return len(self.annotations)

    def landscape(self) -> list[bool]:
        """Per sample: is the image at least as wide as high (for `AspectGroupedBatches`)."""
        return [self.images[a["image_id"]]["width"] >= self.images[a["image_id"]]["height"] for a in self.annotations]

    def __getitem__(self, index: int):
        ann = self.annotations[index]
        info = self.images[ann["image_id"]]
        image = Image.open(self.root / "images" / info["file_name"]).convert("RGB")
        ids = decode_id_png(self.root / "panoptic" / ann["file_name"])
        segments = [s for s in ann["segments_info"] if not s.get("iscrowd", 0)]
        target = _base_target(info["id"], [s["category_id"] for s in segments], [s["bbox"] for s in segments],
                              image.height, image.width)
        target["masks"] = torch.from_numpy(ids[None] == np.array([s["id"] for s in segments])[:, None, None])
        return self.transforms(image, target) if self.transforms else (image, target)


# --- augmentations (DETR datasets/transforms.py, on PIL images + absolute xyxy boxes) ----------------------------


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


def make_transforms(train: bool, size: int) -> Compose:
    """DETR's recipe scaled to a base (shorter-side) size: 800 in DETR, e.g. 320 for shapes.

    Training: flip, then either a multi-scale resize (0.6..1.0 x size, like 480..800) or resize-crop-resize
    (crop sides 0.48..0.75 x size, like 384..600). Evaluation: shorter side = size. Longer side ≤ 1.667 x size.
    """
    max_size = int(size * 1333 / 800)
    if not train:
        return Compose([RandomResize([size], max_size), ToModelTarget()])
    scales = list(range(int(0.6 * size) // 16 * 16, size + 1, 16))
    crop = Compose([RandomResize([int(size * r) for r in (0.5, 0.625, 0.75)]),
                    RandomSizeCrop(int(0.48 * size), int(0.75 * size)),
                    RandomResize(scales, max_size)])
    return Compose([RandomHorizontalFlip(), RandomSelect(RandomResize(scales, max_size), crop), ToModelTarget()])


class AspectGroupedBatches(Sampler):
    """Shuffled batches whose images are all landscape or all portrait: a batch is padded to its largest height
    and width, so mixing 16:9 with 9:16 frames would compute on a square canvas, 2.8x the pixels of either.
    Every epoch draws a new order from torch's global generator (seeded by the training run)."""

    def __init__(self, landscape: list[bool], batch_size: int):
        self.groups = [[i for i, wide in enumerate(landscape) if wide == side] for side in (True, False)]
        self.batch_size = batch_size

    def __iter__(self):
        batches = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group)).tolist()]
            batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        yield from (batches[i] for i in torch.randperm(len(batches)).tolist())

    def __len__(self) -> int:
        return sum(math.ceil(len(group) / self.batch_size) for group in self.groups)


class Collator:
    """Batches (uint8 image, target) samples: the image processor rescales, normalizes and pads the images
    (returning `pixel_mask`); target masks are zero-padded to the same canvas."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, batch) -> dict:
        images, targets = zip(*batch)
        inputs = self.processor(list(images), do_resize=False, return_tensors="pt")
        height, width = inputs["pixel_values"].shape[-2:]
        labels = []
        for target in targets:
            target = dict(target)
            if "masks" in target:
                masks = target["masks"]
                target["masks"] = F.pad(masks, (0, width - masks.shape[-1], 0, height - masks.shape[-2]))
            labels.append(target)
        return {"pixel_values": inputs["pixel_values"], "pixel_mask": inputs["pixel_mask"], "labels": labels}
