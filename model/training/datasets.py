"""COCO detection / panoptic datasets (as written by `shapes.write_dataset`) and how they are batched.

Samples are (PIL image, target) with target boxes in absolute xyxy pixels, ready for the augmentations of
`transforms`; which COCO records become targets is the one rule of `model.coco_targets`. Normalization and
padding are the image processor's job, done per batch in `Collator`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler

from model.box_ops import box_xywh_to_xyxy
from model.coco_format import decode_id_png
from model.coco_targets import detection_objects, segment_masks


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a COCO dataset written by "
                                "model.training.shapes.write_dataset")
    return json.loads(path.read_text())


def label_map(root: str | Path) -> dict[int, str]:
    """id -> name of every category of the dataset at `root`: panoptic.json's (things and stuff) when it has one,
    else annotations.json's. A model trained on the dataset takes it as its `id2label`, the same whether it trains
    on the detection or the panoptic targets. Ids without a category are "N/A", so that `num_labels` (max id + 1)
    covers every id, as in the COCO checkpoints (the sigmoid classifier has no "no-object" logit)."""
    root = Path(root)
    panoptic = root / "panoptic.json"
    categories = _read_json(panoptic if panoptic.is_file() else root / "annotations.json")["categories"]
    if not categories:
        raise ValueError(f"the dataset at {root} has no categories")
    names = {category["id"]: category["name"] for category in categories}
    return {i: names.get(i, "N/A") for i in range(max(names) + 1)}


def _target(image_id: int, labels: list[int], boxes: torch.Tensor, height: int, width: int) -> dict:
    return {
        "image_id": torch.tensor(image_id),
        "class_labels": torch.tensor(labels, dtype=torch.int64),
        "boxes": boxes,
        "orig_size": torch.tensor([height, width]),
    }


class CocoDetection(Dataset):
    """`root/images/*.png` + `root/annotations.json`: boxes of the objects that are targets (`detection_objects`)."""

    def __init__(self, root: str | Path, transforms=None):
        self.root, self.transforms = Path(root), transforms
        coco = _read_json(self.root / "annotations.json")
        self.images = sorted(coco["images"], key=lambda i: i["id"])
        self.annotations = {i["id"]: [] for i in self.images}
        for ann in coco["annotations"]:
            self.annotations[ann["image_id"]].append(ann)

    def __len__(self) -> int:
        return len(self.images)

    def landscape(self) -> list[bool]:
        """Per sample: is the image at least as wide as high (for `AspectGroupedBatches`)."""
        return [info["width"] >= info["height"] for info in self.images]

    def __getitem__(self, index: int):
        info = self.images[index]
        image = Image.open(self.root / "images" / info["file_name"]).convert("RGB")
        objects, boxes = detection_objects(self.annotations[info["id"]], image.height, image.width)
        target = _target(info["id"], [obj["category_id"] for obj in objects], boxes, image.height, image.width)
        return self.transforms(image, target) if self.transforms else (image, target)


class CocoPanoptic(Dataset):
    """`root/images/*.png` + `root/panoptic/*.png` (id = R + 256 G + 256^2 B) + `root/panoptic.json`.

    Every segment, thing or stuff, is a target with its mask (`segment_masks`); `isthing` tells them apart. Boxes
    are the segments' COCO `bbox` (pixel edges, like the detection boxes), not computed from the masks.
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
        ids = torch.from_numpy(decode_id_png(self.root / "panoptic" / ann["file_name"]))
        segments = ann["segments_info"]
        boxes = box_xywh_to_xyxy(torch.tensor([s["bbox"] for s in segments], dtype=torch.float32).reshape(-1, 4))
        target = _target(info["id"], [s["category_id"] for s in segments], boxes, image.height, image.width)
        target["masks"] = segment_masks(ids, segments)
        return self.transforms(image, target) if self.transforms else (image, target)


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
