"""COCO annotations -> Conditional DETR targets (the one parser of COCO records, used by the image processor's
`annotations=` and by the training datasets), and how resizing and padding change a target.

The rule for which records become targets, the same as the original DETR datasets and `transformers`:
- detection objects (`detection_objects`): crowd objects are dropped (a crowd is one region over many instances,
  not an object to detect); boxes go from COCO xywh to xyxy clipped to the image; an object whose clipped box is
  empty is dropped.
- panoptic segments (`segment_masks`): every segment is a target, crowd ones included, with its `iscrowd` (a crowd
  segment still tells which category its pixels are).
The processor takes panoptic boxes from the masks (`masks_to_boxes`, last pixel index, for parity with
`transformers`); the training datasets take them from the segment's COCO `bbox` (pixel edges, the convention of
their detection boxes and of the evaluation).

A target is a dict of tensors: `image_id` (1,), `class_labels` (N,), `boxes` (N,4) float32, `area` (N,), `iscrowd`
(N,), `orig_size` (2,) and `size` (2,) as (height, width), and optionally `masks` (N,H,W) bool.
Boxes start as absolute xyxy pixels; `normalize_boxes` turns them into cxcywh relative to `size`, the resized image
*before* padding (what the model predicts, see `pad_masks`).
"""
import pathlib

import numpy as np
import PIL.Image
import torch
from pycocotools import mask as coco_mask

from model.box_ops import box_xywh_to_xyxy, box_xyxy_to_cxcywh, masks_to_boxes
from model.coco_format import decode_id_png, rle_to_mask

FORMATS = ("coco_detection", "coco_panoptic")


def validate_annotation(annotation: dict, format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"annotation format must be one of {FORMATS}, got {format!r}")
    if not isinstance(annotation, dict):
        raise ValueError(f"a {format} annotation must be a dict, got {type(annotation).__name__}")
    if format == "coco_detection":
        if "image_id" not in annotation or not isinstance(annotation.get("annotations"), (list, tuple)):
            raise ValueError("a coco_detection annotation needs 'image_id' and an 'annotations' list "
                             f"(got keys {sorted(annotation)})")
    elif not {"image_id", "file_name", "segments_info"} <= set(annotation):
        raise ValueError("a coco_panoptic annotation needs 'image_id', 'file_name' and 'segments_info' "
                         f"(got keys {sorted(annotation)})")


def segmentations_to_masks(segmentations: list, height: int, width: int) -> torch.Tensor:
    """COCO segmentations (polygons, uncompressed RLE or compressed RLE) -> (N,H,W) bool masks, via pycocotools."""
    masks = []
    for segmentation in segmentations:
        if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
            masks.append(rle_to_mask(segmentation))
            continue
        decoded = coco_mask.decode(coco_mask.frPyObjects(segmentation, height, width))
        masks.append(decoded.reshape(height, width, -1).any(axis=2))
    if not masks:
        return torch.zeros((0, height, width), dtype=torch.bool)
    return torch.from_numpy(np.stack(masks))


def detection_objects(objects: list[dict], height: int, width: int) -> tuple[list[dict], torch.Tensor]:
    """The COCO detection objects that are targets (see the module docstring) and their boxes, absolute xyxy."""
    objects = [obj for obj in objects if not obj.get("iscrowd", 0)]
    boxes = box_xywh_to_xyxy(torch.tensor([obj["bbox"] for obj in objects], dtype=torch.float32).reshape(-1, 4))
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=height)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    return [obj for obj, kept in zip(objects, keep.tolist()) if kept], boxes[keep]


def segment_masks(ids: torch.Tensor, segments: list[dict]) -> torch.Tensor:
    """(N,H,W) bool: the pixels of each COCO panoptic segment in an (H,W) id map; every segment is a target."""
    segment_ids = torch.tensor([segment["id"] for segment in segments], dtype=torch.int64)
    return ids[None] == segment_ids[:, None, None]


def prepare_detection_target(annotation: dict, height: int, width: int, return_masks: bool) -> dict:
    """A COCO detection annotation (`image_id` + `annotations` list) -> a target of its `detection_objects`."""
    objects, boxes = detection_objects(annotation["annotations"], height, width)
    target = {
        "image_id": torch.tensor([annotation["image_id"]], dtype=torch.int64),
        "class_labels": torch.tensor([obj["category_id"] for obj in objects], dtype=torch.int64),
        "boxes": boxes,
        "area": torch.tensor([obj["area"] for obj in objects], dtype=torch.float32),
        "iscrowd": torch.zeros(len(objects), dtype=torch.int64),
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
        "size": torch.tensor([height, width], dtype=torch.int64),
    }
    if return_masks:
        if any("segmentation" not in obj for obj in objects):
            raise ValueError("return_segmentation_masks=True needs a 'segmentation' in every annotation")
        target["masks"] = segmentations_to_masks([obj["segmentation"] for obj in objects], height, width)
    return target


def prepare_panoptic_target(annotation: dict, height: int, width: int, masks_path: str | pathlib.Path | None,
                            return_masks: bool) -> dict:
    """A COCO panoptic annotation (PNG `masks_path/file_name` + `segments_info`) -> one mask per segment.

    Boxes come from the masks (`masks_to_boxes`), as in `transformers`.
    """
    if masks_path is None:
        raise ValueError("coco_panoptic annotations need masks_path, the folder holding the panoptic PNGs")
    png_path = pathlib.Path(masks_path) / annotation["file_name"]
    if not png_path.is_file():
        raise FileNotFoundError(f"panoptic PNG not found: {png_path}")
    ids = torch.from_numpy(decode_id_png(png_path))
    if tuple(ids.shape) != (height, width):
        raise ValueError(f"panoptic PNG {png_path} is {tuple(ids.shape)} but its image is {(height, width)}")
    segments = annotation["segments_info"]
    masks = segment_masks(ids, segments)
    target = {
        "image_id": torch.tensor([annotation["image_id"]], dtype=torch.int64),
        "class_labels": torch.tensor([segment["category_id"] for segment in segments], dtype=torch.int64),
        "boxes": masks_to_boxes(masks),
        "area": torch.tensor([segment["area"] for segment in segments], dtype=torch.float32),
        "iscrowd": torch.tensor([segment.get("iscrowd", 0) for segment in segments], dtype=torch.int64),
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
        "size": torch.tensor([height, width], dtype=torch.int64),
    }
    if return_masks:
        target["masks"] = masks
    return target


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (N,H,W) bool masks with PIL, the reference's sampling grid."""
    height, width = size
    resized = [np.asarray(PIL.Image.fromarray(mask.numpy().astype(np.uint8)).resize((width, height),
                                                                                   PIL.Image.Resampling.NEAREST))
               for mask in masks]
    if not resized:
        return torch.zeros((0, height, width), dtype=torch.bool)
    return torch.from_numpy(np.stack(resized)) > 0


def resize_target(target: dict, new_size: tuple[int, int]) -> dict:
    """Scale boxes and areas (and resize masks) from `target["size"]` to `new_size` (height, width)."""
    old_height, old_width = target["size"].tolist()
    ratio_height, ratio_width = new_size[0] / old_height, new_size[1] / old_width
    resized = dict(target)
    resized["boxes"] = target["boxes"] * torch.tensor([ratio_width, ratio_height, ratio_width, ratio_height])
    resized["area"] = target["area"] * (ratio_width * ratio_height)
    if "masks" in target:
        resized["masks"] = resize_masks(target["masks"], new_size)
    resized["size"] = torch.tensor(new_size, dtype=torch.int64)
    return resized


def normalize_boxes(target: dict) -> dict:
    """Absolute xyxy -> cxcywh in [0, 1] relative to `size`, the unpadded image the model sees."""
    height, width = target["size"].tolist()
    normalized = dict(target)
    normalized["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([width, height, width, height],
                                                                             dtype=torch.float32)
    return normalized


def pad_masks(target: dict, padded_size: tuple[int, int]) -> dict:
    """Pad masks bottom/right to the batch canvas. Boxes and `size` stay relative to the unpadded image.

    This follows the original DETR (detr#286): the model predicts boxes relative to the valid region given by the
    pixel mask, so the targets must be too. `transformers` instead re-normalizes boxes to the padded canvas and
    sets `size` to it (docs/reference-compatibility.md, Q7), which makes a target depend on the other images in
    its batch.
    """
    if "masks" not in target:
        return target
    masks = target["masks"]
    padded = torch.zeros((masks.shape[0], *padded_size), dtype=masks.dtype)
    padded[:, : masks.shape[1], : masks.shape[2]] = masks
    return {**target, "masks": padded}
