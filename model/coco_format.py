"""COCO interchange formats for segmentation results: panoptic PNGs and run-length-encoded masks.

COCO panoptic format (Kirillov et al. 2019, panopticapi): a segment id map stored as an RGB PNG with
`id = R + 256 * G + 256**2 * B` (0 = unlabeled), plus one `segments_info` entry per id with `id`, `category_id`,
`area` (pixels), `bbox` ([x, y, width, height] in pixels) and `iscrowd`.
COCO RLE (pycocotools): `{"size": [h, w], "counts": str}`, column-major runs, `counts` kept as an ASCII string so it
fits in JSON.
"""
import io
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from pycocotools import mask as coco_mask

MAX_SEGMENT_ID = 256**3 - 1


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H,W,3) uint8 colours -> (H,W) int64 segment ids."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H,W) integer segment ids -> (H,W,3) uint8 colours."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise ValueError(f"segment ids must be in [0, {MAX_SEGMENT_ID}] to fit in an RGB PNG, "
                         f"got [{ids.min()}, {ids.max()}]")
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], axis=-1).astype(np.uint8)


def encode_id_png(ids: np.ndarray | torch.Tensor) -> bytes:
    """Segment id map -> PNG bytes in the COCO panoptic colour encoding."""
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    buffer = io.BytesIO()
    PIL.Image.fromarray(id_to_rgb(ids)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_id_png(png: bytes | str | Path) -> np.ndarray:
    """PNG bytes or a PNG file path -> (H,W) int64 segment ids."""
    source = io.BytesIO(png) if isinstance(png, bytes) else png
    with PIL.Image.open(source) as image:
        return rgb_to_id(np.asarray(image.convert("RGB")))


def segment_bbox(mask: np.ndarray) -> list[int]:
    """COCO [x, y, width, height] of a non-empty binary mask; width/height count pixels (panopticapi convention)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def panoptic_to_coco(segmentation: torch.Tensor | np.ndarray, segments_info: list[dict]) -> tuple[bytes, list[dict]]:
    """A `post_process_panoptic_segmentation` result -> (COCO panoptic PNG bytes, COCO `segments_info`).

    Each segment keeps its id; `label_id` becomes `category_id`; `score` is carried along when present (COCO
    readers ignore extra keys). Segments with no pixels in the map are dropped, since COCO requires area > 0.
    """
    ids = segmentation.cpu().numpy() if isinstance(segmentation, torch.Tensor) else np.asarray(segmentation)
    coco_segments = []
    for segment in segments_info:
        mask = ids == segment["id"]
        area = int(mask.sum())
        if area == 0:
            continue
        coco_segment = {"id": int(segment["id"]), "category_id": int(segment["label_id"]), "area": area,
                        "bbox": segment_bbox(mask), "iscrowd": 0}
        if "score" in segment:
            coco_segment["score"] = segment["score"]
        coco_segments.append(coco_segment)
    return encode_id_png(ids), coco_segments


def panoptic_from_coco(png: bytes | str | Path, segments_info: list[dict]) -> dict:
    """COCO panoptic PNG + `segments_info` -> `{"segmentation": (H,W) int32 tensor, "segments_info": [...]}` in the
    form `post_process_panoptic_segmentation` returns (`id`, `label_id`, and `score` when present)."""
    ids = decode_id_png(png)
    known = {int(segment["id"]) for segment in segments_info}
    unknown = set(np.unique(ids).tolist()) - known - {0}
    if unknown:
        raise ValueError(f"panoptic PNG contains segment ids {sorted(unknown)[:10]} missing from segments_info")
    segments = []
    for segment in segments_info:
        entry = {"id": int(segment["id"]), "label_id": int(segment["category_id"])}
        if "score" in segment:
            entry["score"] = segment["score"]
        segments.append(entry)
    return {"segmentation": torch.from_numpy(ids.astype(np.int32)), "segments_info": segments}


def mask_to_rle(mask: np.ndarray | torch.Tensor) -> dict:
    """(H,W) binary mask -> COCO RLE `{"size": [h, w], "counts": str}`."""
    if isinstance(mask, torch.Tensor):
        mask = mask.cpu().numpy()
    if mask.ndim != 2:
        raise ValueError(f"mask_to_rle expects a (H, W) mask, got shape {mask.shape}")
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (`counts` as str or bytes) -> (H,W) bool mask."""
    counts = rle["counts"]
    encoded = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return coco_mask.decode(encoded).astype(bool)
