"""Model outputs -> detections, semantic maps, instance and panoptic segments.

`outputs` is the model's output object or a dict with `logits` (B,Q,C), `pred_boxes` (B,Q,4) normalized cxcywh and,
for segmentation, `pred_masks` mask logits at a fraction of the padded input size. The pruned panoptic inference
computes masks only for the queries that can survive the score threshold; it then also gives
`mask_query_indices`: per image, the query index of each mask (a list of 1-D tensors or a (B,K) tensor), with
`pred_masks[b]` holding at least that many masks (a list of (K_b,h,w) tensors or a (B,K,h,w) tensor; extra masks
past len(mask_query_indices[b]) are padding). Without it, `pred_masks[b, q]` is the mask of query q.

Conditional DETR is a sigmoid (focal loss) classifier with no "no-object" class. The segmentation post-processors
therefore score a query by its best sigmoid class probability over all classes. `transformers` copied DETR's
softmax and treats the last real class as "no-object", dropping every prediction of it
(docs/reference-compatibility.md, Q8).
"""
import torch
import torch.nn.functional as F

from model.box_ops import box_cxcywh_to_xyxy
from model.coco_format import mask_to_rle


def _field(outputs, name: str):
    return outputs.get(name) if isinstance(outputs, dict) else getattr(outputs, name, None)


def _size_list(sizes, batch_size: int, name: str) -> list[tuple[int, int]] | None:
    """A (B,2) tensor or a list of (height, width) -> list of int pairs, checked against the batch size."""
    if sizes is None:
        return None
    if len(sizes) != batch_size:
        raise ValueError(f"{name} has {len(sizes)} entries but the outputs hold a batch of {batch_size}")
    return [(int(h), int(w)) for h, w in (size.tolist() if isinstance(size, torch.Tensor) else size
                                          for size in sizes)]


def post_process_object_detection(outputs, threshold: float = 0.5, target_sizes=None, top_k: int = 100) -> list[dict]:
    """Top-k (query, class) pairs per image -> `{"scores", "labels", "boxes", "query_indices"}` with xyxy boxes.

    Identical to `transformers`: sigmoid over all Q*C logits, the `top_k` best pairs (a query may appear with
    several labels), then keep `score > threshold` (strict). With `target_sizes` ((B,2) tensor or list of
    (height, width)) boxes are scaled to pixels; they are not clipped to the image. `query_indices` (a key
    `transformers` does not return) is the query of each detection, which finds its mask in a segmentation output.
    """
    logits, boxes = _field(outputs, "logits"), _field(outputs, "pred_boxes")
    batch_size, _, num_classes = logits.shape
    if target_sizes is not None and len(target_sizes) != batch_size:
        raise ValueError(f"target_sizes has {len(target_sizes)} entries but the outputs hold a batch of {batch_size}")
    probs = logits.sigmoid().flatten(1)
    scores, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
    queries = torch.div(indices, num_classes, rounding_mode="floor")
    labels = indices % num_classes
    boxes = torch.gather(box_cxcywh_to_xyxy(boxes), 1, queries[..., None].expand(-1, -1, 4))
    if target_sizes is not None:
        if isinstance(target_sizes, torch.Tensor):
            heights, widths = target_sizes.unbind(1)
        else:
            heights = torch.tensor([size[0] for size in target_sizes], dtype=torch.float32)
            widths = torch.tensor([size[1] for size in target_sizes], dtype=torch.float32)
        scale = torch.stack([widths, heights, widths, heights], dim=1).to(boxes.device)
        boxes = boxes * scale[:, None, :]
    results = []
    for image_scores, image_labels, image_boxes, image_queries in zip(scores, labels, boxes, queries):
        keep = image_scores > threshold
        results.append({"scores": image_scores[keep], "labels": image_labels[keep], "boxes": image_boxes[keep],
                        "query_indices": image_queries[keep]})
    return results


def post_process_detection_masks(outputs, detections: list[dict], mask_threshold: float = 0.5, target_sizes=None,
                                 processed_sizes=None) -> list[list[dict | None]]:
    """COCO RLE mask (`{"size", "counts", "area"}`, `counts` an ASCII string) of each detection that
    `post_process_object_detection` made from these outputs, found by its `query_indices`; None for a detection
    whose query has no mask (pruned inference computed none for it).

    As DETR's PostProcessSegm: the sigmoid mask over the padded input, cropped to the processed size, resized to
    the target size and thresholded (`> mask_threshold`); DETR thresholds before a nearest resize, this after a
    bilinear one (`_fit_masks`, as the panoptic path), so edges follow the mask. `target_sizes` /
    `processed_sizes` as in `post_process_semantic_segmentation`. One mask is resized at a time, so memory stays
    one target-sized map however many detections there are; a query detected with several labels is encoded once.
    """
    targets, processed, padded = _per_image_sizes(outputs, target_sizes, processed_sizes)
    if len(detections) != len(targets):
        raise ValueError(f"detections has {len(detections)} entries but the outputs hold a batch of {len(targets)}")
    results = []
    for b, ((indices, masks), detection) in enumerate(zip(_query_masks(outputs), detections)):
        slot = {query: k for k, query in enumerate(indices.tolist())}  # query -> its row in `masks`
        queries = detection["query_indices"].tolist()
        encoded: dict[int, dict] = {}
        for query in set(queries) & slot.keys():
            k = slot[query]
            binary = _fit_masks(masks[k: k + 1].sigmoid(), processed[b], padded, targets[b])[0] > mask_threshold
            encoded[query] = {**mask_to_rle(binary), "area": int(binary.sum())}
        results.append([encoded.get(query) for query in queries])
    return results


def _query_masks(outputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image: (query indices (K,), mask logits (K,h,w)), from full or pruned mask outputs."""
    logits, masks = _field(outputs, "logits"), _field(outputs, "pred_masks")
    if masks is None:
        raise ValueError("segmentation post-processing needs outputs with pred_masks")
    indices = _field(outputs, "mask_query_indices")
    batch_size, num_queries = logits.shape[:2]
    if indices is None:
        if masks.shape[:2] != (batch_size, num_queries):
            raise ValueError(f"pred_masks of shape {tuple(masks.shape)} do not match logits {tuple(logits.shape)}; "
                             "pass mask_query_indices when masks cover only some queries")
        every_query = torch.arange(num_queries, device=logits.device)
        return [(every_query, masks[b]) for b in range(batch_size)]
    if len(indices) != batch_size or len(masks) != batch_size:
        raise ValueError(f"mask_query_indices ({len(indices)}) and pred_masks ({len(masks)}) need one entry per "
                         f"image ({batch_size})")
    per_image = []
    for image_indices, image_masks in zip(indices, masks):
        image_indices = torch.as_tensor(image_indices, dtype=torch.int64, device=logits.device)
        if len(image_indices) > len(image_masks):
            raise ValueError(f"{len(image_indices)} mask_query_indices but only {len(image_masks)} masks")
        if len(image_indices) and (image_indices.min() < 0 or image_indices.max() >= num_queries):
            raise ValueError(f"mask_query_indices must be in [0, {num_queries})")
        per_image.append((image_indices, image_masks[: len(image_indices)]))
    return per_image


def _fit_masks(masks: torch.Tensor, processed_size: tuple[int, int] | None, padded_size: tuple[int, int] | None,
               target_size: tuple[int, int] | None) -> torch.Tensor:
    """(K,h,w) mask maps over the padded input -> over the image: crop away the padding, then resize.

    As DETR's PostProcessSegm: upsample to the padded canvas, crop the image's processed (unpadded) size, then
    resize to the target size (bilinear, align_corners=False). Without `processed_size` the whole mask is used,
    which is right when the image filled its canvas (all frames of one video).
    """
    if len(masks) == 0:  # F.interpolate rejects empty batches
        height, width = target_size or processed_size or masks.shape[-2:]
        return masks.new_zeros((0, height, width))
    if processed_size is not None:
        masks = F.interpolate(masks[None], size=padded_size, mode="bilinear", align_corners=False)[0]
        masks = masks[:, : processed_size[0], : processed_size[1]]
    if target_size is not None and tuple(masks.shape[-2:]) != target_size:
        masks = F.interpolate(masks[None], size=target_size, mode="bilinear", align_corners=False)[0]
    return masks


def _per_image_sizes(outputs, target_sizes, processed_sizes) -> tuple[list, list, tuple | None]:
    batch_size = _field(outputs, "logits").shape[0]
    targets = _size_list(target_sizes, batch_size, "target_sizes") or [None] * batch_size
    processed = _size_list(processed_sizes, batch_size, "processed_sizes")
    if processed is None:
        return targets, [None] * batch_size, None
    # The batch was padded to its largest processed height and width (the processor's default).
    padded = (max(h for h, _ in processed), max(w for _, w in processed))
    return targets, processed, padded


def post_process_semantic_segmentation(outputs, target_sizes=None, processed_sizes=None) -> list[torch.Tensor]:
    """-> one (h,w) map of class ids per image: argmax over classes of sum_q p(class | q) * sigmoid(mask_q).

    p is the sigmoid class probability (not `transformers`' softmax: docs/reference-compatibility.md, Q8). With
    pruned masks only the queries that have masks contribute. `processed_sizes` ((h, w) of each image after
    resizing, before padding) crops the padding away, which matters when images of different sizes were batched.
    """
    probs = _field(outputs, "logits").sigmoid()
    targets, processed, padded = _per_image_sizes(outputs, target_sizes, processed_sizes)
    maps = []
    for b, (indices, masks) in enumerate(_query_masks(outputs)):
        weights = probs[b, indices]  # (K, C)
        # Resizing is linear, so mixing masks into class maps before or after it gives the same result: resize
        # whichever are fewer, the K masks or the C class maps.
        if len(indices) <= weights.shape[1]:
            class_maps = torch.einsum("kc,khw->chw", weights, _fit_masks(masks.sigmoid(), processed[b], padded,
                                                                         targets[b]))
        else:
            class_maps = _fit_masks(torch.einsum("kc,khw->chw", weights, masks.sigmoid()), processed[b], padded,
                                    targets[b])
        maps.append(class_maps.argmax(0))
    return maps


def post_process_instance_segmentation(outputs, threshold: float = 0.5, mask_threshold: float = 0.5,
                                       overlap_mask_area_threshold: float = 0.8, target_sizes=None,
                                       return_coco_annotation: bool = False, processed_sizes=None) -> list[dict]:
    """-> per image `{"segmentation": (h,w) int32 segment ids (0 = none), "segments_info": [{"id", "label_id",
    "was_fused", "score"}]}`; see `post_process_panoptic_segmentation` for the rules (no class is fused here).

    With `return_coco_annotation`, `segmentation` is instead a list of COCO RLE dicts (`counts` an ASCII string),
    one per entry of `segments_info`, in order. (`transformers` returns its own uncompressed run lists there.)
    """
    results = post_process_panoptic_segmentation(outputs, threshold, mask_threshold, overlap_mask_area_threshold,
                                                 set(), target_sizes, processed_sizes)
    if return_coco_annotation:
        for result in results:
            segmentation = result["segmentation"]
            result["segmentation"] = [mask_to_rle(segmentation == segment["id"])
                                      for segment in result["segments_info"]]
    return results


def post_process_panoptic_segmentation(outputs, threshold: float = 0.5, mask_threshold: float = 0.5,
                                       overlap_mask_area_threshold: float = 0.8, label_ids_to_fuse=None,
                                       target_sizes=None, processed_sizes=None) -> list[dict]:
    """-> per image `{"segmentation": (h,w) int32 segment ids, 0 = no segment, "segments_info": [{"id",
    "label_id", "was_fused", "score"}]}`, convertible to COCO with `model.coco_format.panoptic_to_coco`.

    As `transformers` (from MaskFormer): keep queries whose best sigmoid class score is `> threshold`; each pixel
    goes to the query with the highest `score * sigmoid(mask)`; a query becomes a segment if it wins some pixels
    and those are more than `overlap_mask_area_threshold` of its own mask (`sigmoid(mask) >= mask_threshold`).
    Queries of a class in `label_ids_to_fuse` (stuff) share one segment per class. Differences from
    `transformers`, all deliberate:
      * scores are sigmoid probabilities over all classes, no class is dropped as "no-object"
        (docs/reference-compatibility.md, Q8);
      * a query's own mask is thresholded on its mask probability, not on probability * score (MaskFormer; the
        reference's in-place multiply makes low-score segments shrink);
      * a fused class yields one `segments_info` entry (score = best of its queries) and new ids never reuse a
        fused segment's id;
      * an image with no segment gets an int32 map of zeros, not float32 -1.
    `target_sizes` / `processed_sizes`: as in `post_process_semantic_segmentation`.
    """
    fuse = set() if label_ids_to_fuse is None else set(label_ids_to_fuse)
    scores, labels = _field(outputs, "logits").sigmoid().max(-1)
    targets, processed, padded = _per_image_sizes(outputs, target_sizes, processed_sizes)
    results = []
    for b, (indices, masks) in enumerate(_query_masks(outputs)):
        keep = scores[b, indices] > threshold
        mask_probs = _fit_masks(masks[keep].sigmoid(), processed[b], padded, targets[b])
        results.append(_segments(mask_probs, scores[b, indices][keep], labels[b, indices][keep], mask_threshold,
                                 overlap_mask_area_threshold, fuse))
    return results


def _segments(mask_probs: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, mask_threshold: float,
              overlap_mask_area_threshold: float, fuse: set[int]) -> dict:
    segmentation = torch.zeros(mask_probs.shape[-2:], dtype=torch.int32, device=mask_probs.device)
    if len(scores) == 0:
        return {"segmentation": segmentation, "segments_info": []}
    owner = (mask_probs * scores[:, None, None]).argmax(0)
    segments, fused = [], {}
    for k, (score, label) in enumerate(zip(scores.tolist(), labels.tolist())):
        won = owner == k
        won_area = int(won.sum())
        own_area = int((mask_probs[k] >= mask_threshold).sum())
        if won_area == 0 or own_area == 0 or won_area / own_area <= overlap_mask_area_threshold:
            continue
        if label in fused:
            segment = fused[label]
            segment["score"] = max(segment["score"], round(score, 6))
        else:
            segment = {"id": len(segments) + 1, "label_id": label, "was_fused": label in fuse,
                       "score": round(score, 6)}
            segments.append(segment)
            if label in fuse:
                fused[label] = segment
        segmentation[won] = segment["id"]
    return {"segmentation": segmentation, "segments_info": segments}
