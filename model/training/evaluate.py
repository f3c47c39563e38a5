"""Evaluation on a COCO-format dataset: bbox / segm AP with pycocotools' COCOeval, panoptic quality computed here.

Panoptic quality (Kirillov et al. 2019, eq. 1): a predicted and a ground-truth segment of the same category match
when their IoU > 0.5 (unique by construction); per category PQ = sum of matched IoUs / (TP + FP/2 + FN/2) = SQ x RQ,
then averaged over the categories that occur. As in panopticapi, ground-truth void (id 0) pixels are left out of
the IoU and a prediction mostly (> 50 %) on void or on a crowd region of its category is not a false positive.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model.box_ops import box_iou, box_xywh_to_xyxy, box_xyxy_to_xywh
from model.coco_format import decode_id_png, mask_to_rle

COCO_STATS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large")


def coco_metrics(annotation_file: str | Path, results: list[dict], iou_type: str = "bbox") -> dict[str, float]:
    """COCOeval summary (the 12 standard numbers, in [0, 1]) of `results` in the COCO results format."""
    if not results:
        return {name: 0.0 for name in COCO_STATS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO(str(annotation_file))
        evaluator = COCOeval(truth, truth.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(COCO_STATS, evaluator.stats)}


def _image_matches(gt_ids, gt_segments, pred_ids, pred_segments, stats):
    """Accumulate per-category (TP, FP, FN, IoU sum) of one image into `stats`."""
    gt = {s["id"]: s for s in gt_segments}
    pred = {s["id"]: s for s in pred_segments}
    unknown = set(np.unique(pred_ids).tolist()) - set(pred) - {0}
    if unknown:
        raise ValueError(f"predicted panoptic map has segment ids {sorted(unknown)} missing from its segments_info")
    # Pixel counts of every (gt id, pred id) pair in one pass.
    base = int(pred_ids.max()) + 1
    pairs, counts = np.unique(gt_ids.astype(np.int64) * base + pred_ids, return_counts=True)
    inter = {(int(p // base), int(p % base)): int(c) for p, c in zip(pairs, counts)}
    gt_area = {i: sum(c for (g, _), c in inter.items() if g == i) for i in gt}
    pred_area = {i: sum(c for (_, p), c in inter.items() if p == i) for i in pred}

    matched_gt, matched_pred = set(), set()
    for (g, p), count in inter.items():
        if g not in gt or p not in pred or gt[g].get("iscrowd", 0):
            continue
        if gt[g]["category_id"] != pred[p]["category_id"]:
            continue
        union = pred_area[p] + gt_area[g] - count - inter.get((0, p), 0)
        iou = count / union
        if iou > 0.5:
            category = stats.setdefault(gt[g]["category_id"], [0, 0, 0, 0.0])
            category[0] += 1
            category[3] += iou
            matched_gt.add(g)
            matched_pred.add(p)
    for g, segment in gt.items():
        if g not in matched_gt and not segment.get("iscrowd", 0):
            stats.setdefault(segment["category_id"], [0, 0, 0, 0.0])[2] += 1
    crowd = {s["category_id"]: i for i, s in gt.items() if s.get("iscrowd", 0)}
    for p, segment in pred.items():
        if p in matched_pred or pred_area.get(p, 0) == 0:
            continue
        ignored = inter.get((0, p), 0) + inter.get((crowd.get(segment["category_id"], -1), p), 0)
        if ignored <= 0.5 * pred_area[p]:
            stats.setdefault(segment["category_id"], [0, 0, 0, 0.0])[1] += 1


def panoptic_quality(ground_truth: list[tuple[np.ndarray, list[dict]]],
                     predictions: list[tuple[np.ndarray, list[dict]]], categories: list[dict]) -> dict:
    """PQ / SQ / RQ over all, thing and stuff categories, plus per-category values.

    ground_truth / predictions: per image (id map (H, W), COCO `segments_info` with id and category_id).
    """
    if len(ground_truth) != len(predictions):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(predictions)} predictions")
    stats: dict[int, list] = {}
    for (gt_ids, gt_segments), (pred_ids, pred_segments) in zip(ground_truth, predictions):
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(f"prediction of shape {pred_ids.shape} for a ground truth of shape {gt_ids.shape}")
        _image_matches(gt_ids, gt_segments, pred_ids, pred_segments, stats)

    per_class = {}
    for category_id, (tp, fp, fn, iou_sum) in stats.items():
        denominator = tp + 0.5 * fp + 0.5 * fn
        per_class[category_id] = {"PQ": iou_sum / denominator if denominator else 0.0,
                                  "SQ": iou_sum / tp if tp else 0.0, "RQ": tp / denominator if denominator else 0.0}
    isthing = {c["id"]: bool(c["isthing"]) for c in categories}
    result = {"per_class": per_class}
    for name, selected in (("", per_class), ("_th", {k: v for k, v in per_class.items() if isthing.get(k)}),
                           ("_st", {k: v for k, v in per_class.items() if not isthing.get(k)})):
        for metric in ("PQ", "SQ", "RQ"):
            values = [v[metric] for v in selected.values()]
            result[metric + name] = float(np.mean(values)) if values else 0.0
    return result


def _instance_results(outputs, pixel_mask: torch.Tensor, infos: list[dict], top_k: int = 100) -> list[dict]:
    """COCO segm results the way DETR's `PostProcessSegm` makes them: the top-k (query, class) pairs by sigmoid
    score, each with its query's own mask (overlaps allowed, unlike the panoptic / instance post-processing, which
    lets every pixel go to one query), cropped to the unpadded input, resized to the image and cut at p > 0.5."""
    probs = outputs.logits.sigmoid().flatten(1)  # (B, Q * C)
    num_classes = outputs.logits.shape[-1]
    scores, index = probs.topk(min(top_k, probs.shape[1]), dim=1)
    masks = F.interpolate(outputs.pred_masks, size=pixel_mask.shape[-2:], mode="bilinear", align_corners=False)
    results = []
    for b, info in enumerate(infos):
        height, width = int(pixel_mask[b].any(1).sum()), int(pixel_mask[b].any(0).sum())
        queries = (index[b] // num_classes).tolist()
        kept = sorted(set(queries))
        resized = F.interpolate(masks[b, kept, :height, :width][None], size=(info["height"], info["width"]),
                                mode="bilinear", align_corners=False)[0]
        rles = {q: mask_to_rle(m > 0) for q, m in zip(kept, resized)}  # logit > 0 <=> probability > 0.5
        for score, flat, query in zip(scores[b].tolist(), index[b].tolist(), queries):
            results.append({"image_id": info["id"], "category_id": flat % num_classes,
                            "segmentation": rles[query], "score": score})
    return results


def matched_boxes(truth: list[dict], detections: list[dict], threshold: float) -> dict[str, float]:
    """How the boxes a user sees (score >= threshold) fit: per image and category, each detection (best score
    first) takes the unmatched ground-truth box it overlaps most, if IoU >= 0.5. Returns the median IoU of those
    matches (how tight the boxes are, which AP50 hides), precision and recall. Boxes are COCO xywh."""
    boxes: dict[tuple[int, int], list] = {}
    for ann in truth:
        boxes.setdefault((ann["image_id"], ann["category_id"]), []).append(ann["bbox"])
    free = {key: box_xywh_to_xyxy(torch.tensor(value, dtype=torch.float32)) for key, value in boxes.items()}
    shown = sorted((d for d in detections if d["score"] >= threshold), key=lambda d: -d["score"])
    ious = []
    for detection in shown:
        key = (detection["image_id"], detection["category_id"])
        if key not in free:
            continue
        overlaps = box_iou(box_xywh_to_xyxy(torch.tensor([detection["bbox"]], dtype=torch.float32)), free[key])[0][0]
        best = int(overlaps.argmax())
        if overlaps[best] >= 0.5:
            ious.append(float(overlaps[best]))
            free[key][best] = torch.tensor([-2.0, -2.0, -1.0, -1.0])  # taken: overlaps nothing any more
    return {"median_IoU": float(np.median(ious)) if ious else 0.0,
            "precision": len(ious) / len(shown) if shown else 0.0,
            "recall": len(ious) / len(truth) if truth else 0.0}


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def evaluate(model, processor, data_dir: str | Path, batch_size: int = 8, device: str = "cpu",
             threshold: float = 0.5) -> dict:
    """bbox AP of any detection model on `data_dir`, and how its boxes scoring >= `threshold` fit
    (`matched_boxes`); with a segmentation model (outputs with `pred_masks`) also segm AP (masks of the top-100
    detections, when the ground truth has masks) and panoptic quality (the processor's panoptic post-processing
    with `threshold` on the sigmoid scores, stuff categories fused)."""
    data_dir = Path(data_dir)
    coco = json.loads((data_dir / "annotations.json").read_text())
    panoptic_json = data_dir / "panoptic.json"
    if isinstance(model, torch.nn.Module):  # not an exported graph's runtime (model/runtime.py)
        model.eval().to(device)
    detections, instances, panoptic_pairs = [], [], []
    panoptic = json.loads(panoptic_json.read_text()) if panoptic_json.is_file() else None
    panoptic_by_image = {a["image_id"]: a for a in panoptic["annotations"]} if panoptic else {}
    stuff_ids = [c["id"] for c in panoptic["categories"] if not c["isthing"]] if panoptic else []

    for infos in _batches(coco["images"], batch_size):
        images = [Image.open(data_dir / "images" / info["file_name"]).convert("RGB") for info in infos]
        inputs = processor(images, return_tensors="pt")
        outputs = model(pixel_values=inputs["pixel_values"].to(device), pixel_mask=inputs["pixel_mask"].to(device))
        sizes = [(info["height"], info["width"]) for info in infos]
        # Every top-100 (query, class) pair counts for AP, so no score threshold here.
        for info, result in zip(infos, processor.post_process_object_detection(outputs, threshold=0.0,
                                                                                 target_sizes=sizes)):
            for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(),
                                         box_xyxy_to_xywh(result["boxes"]).tolist()):
                detections.append({"image_id": info["id"], "category_id": label, "bbox": box, "score": score})
        if getattr(outputs, "pred_masks", None) is None:
            continue
        instances.extend(_instance_results(outputs, inputs["pixel_mask"], infos))
        if panoptic:
            for info, result in zip(infos, processor.post_process_panoptic_segmentation(
                    outputs, threshold=threshold, label_ids_to_fuse=set(stuff_ids), target_sizes=sizes)):
                truth = panoptic_by_image[info["id"]]
                segments = [{"id": s["id"], "category_id": s["label_id"]} for s in result["segments_info"]]
                panoptic_pairs.append(((decode_id_png(data_dir / "panoptic" / truth["file_name"]),
                                        truth["segments_info"]),
                                       (result["segmentation"].cpu().numpy(), segments)))

    metrics = {"num_images": len(coco["images"]), "bbox": coco_metrics(data_dir / "annotations.json", detections)}
    metrics["bbox"].update(matched_boxes(coco["annotations"], detections, threshold))
    if instances and all("segmentation" in a for a in coco["annotations"]):  # video ground truth has boxes only
        metrics["segm"] = coco_metrics(data_dir / "annotations.json", instances, "segm")
    if panoptic_pairs:
        quality = panoptic_quality(*zip(*panoptic_pairs), panoptic["categories"])
        metrics["panoptic"] = {k: v for k, v in quality.items() if k != "per_class"}
        names = {c["id"]: c["name"] for c in panoptic["categories"]}
        metrics["panoptic"]["per_class"] = {names.get(k, str(k)): v for k, v in quality["per_class"].items()}
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json + model.safetensors)")
    parser.add_argument("--data", required=True, nargs="+",
                        help="a COCO dataset directory (model.training.shapes.write_dataset, "
                             "model.training.holdout_shapes), or videos of `cdetr sample-video` with their .gt.json "
                             "beside them (every frame evaluated)")
    parser.add_argument("--panoptic", action="store_true",
                        help="the model is a ConditionalDetrForSegmentation: also report segm AP and PQ")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="score threshold of the panoptic output and of the matched boxes (median IoU, "
                             "precision, recall)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                        help="evaluate the model as the pipeline runs it with model.precision: optimize() (batch "
                        "norm folded, channels-last) and autocast to bf16 / fp16 (auto: model/precision.py)")
    parser.add_argument("--runtime", choices=["torch", "onnxruntime", "openvino"], default="torch",
                        help="evaluate the detector as the pipeline runs it with model.runtime: exported to ONNX "
                        "(model/export.py) and run in ONNX Runtime or OpenVINO at --precision (CPU; not --panoptic)")
    parser.add_argument("--out", help="also write the metrics JSON to this file")


def run(args: argparse.Namespace) -> int:
    """`cdetr eval`: print the metrics as JSON."""
    from model import ConditionalDetrForSegmentation, ConditionalDetrImageProcessor
    from model.export import export_detector
    from model.optimize import InferenceOptions, optimize
    from model.precision import TORCH_DTYPES, detect_hardware, resolve_precision
    from model.runtime import ExportedDetector
    from model.segmentation import load_detector
    from model.training.shapes import video_to_dataset

    model = (ConditionalDetrForSegmentation.from_pretrained(args.model) if args.panoptic
             else load_detector(args.model)).to(args.device)
    precision = resolve_precision(args.precision or "fp32", detect_hardware(args.device), args.runtime)
    if args.runtime != "torch" and (args.panoptic or args.device != "cpu"):
        raise SystemExit(f"--runtime {args.runtime} runs the exported detector on the CPU: no --panoptic (the mask "
                         "head is not exported), --device cpu")
    if args.runtime == "torch" and args.precision:
        model = optimize(model, InferenceOptions(dtype=TORCH_DTYPES[precision]))
    processor = ConditionalDetrImageProcessor.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as frames:
        if args.runtime != "torch":
            graph = export_detector(model, Path(frames) / "detector.onnx").path
            model = ExportedDetector(graph, model.config, args.runtime, precision, torch.get_num_threads())
        if len(args.data) == 1 and Path(args.data[0]).is_dir():
            data = args.data[0]
        elif all(Path(path).is_file() for path in args.data):
            data = video_to_dataset(args.data, frames)
        else:
            raise SystemExit(f"--data takes one dataset directory or video files; got {args.data}")
        metrics = evaluate(model, processor, data, args.batch_size, args.device, args.threshold)
    text = json.dumps(metrics, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
