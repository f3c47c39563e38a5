"""Optional COCO RLE instance masks on detections (`model.instance_masks`): the post-processor on hand-built outputs
whose masks are known, the Detector with the tiny panoptic model, config/CLI wiring and the clear errors."""
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from helpers import detect_still
from model import ConditionalDetrForSegmentation, ConditionalDetrImageProcessor
from model.coco_format import rle_to_mask
from model.post_processing import post_process_detection_masks, post_process_object_detection
from pipeline.cli import main
from pipeline.config import ModelSettings, load_config
from pipeline.worker import Detector, check_model_path


def _decode_with_pycocotools(rle) -> np.ndarray:
    return coco_mask.decode({"size": list(rle.size), "counts": rle.counts.encode("ascii")}).astype(bool)


def test_masks_follow_the_query_of_each_detection_and_crop_the_padding():
    """Two images padded to 20x30; the second's processed size is 10x30, so its bottom half is padding."""
    logits = torch.full((2, 3, 4), -10.0)
    logits[0, 0, 1] = logits[0, 0, 2] = 3.0  # query 0 detected with two labels: one mask, encoded once
    logits[0, 2, 3] = 2.0                     # query 2 has no mask (pruned away): mask None
    logits[1, 1, 0] = 4.0
    region = torch.zeros(20, 30, dtype=torch.bool)
    region[2:8, 3:12] = True
    # The second image's mask also covers the mirrored region, which lies in its padding.
    masks = torch.stack([region, region | region.flip(0)]).float() * 20 - 10
    outputs = {"logits": logits, "pred_boxes": torch.rand(2, 3, 4), "pred_masks": masks[:, None].repeat(1, 2, 1, 1),
               "mask_query_indices": [torch.tensor([0]), torch.tensor([1])]}
    detections = post_process_object_detection(outputs, threshold=0.5, target_sizes=[(40, 60), (20, 60)])
    assert detections[0]["query_indices"].tolist() == [0, 0, 2] and detections[1]["query_indices"].tolist() == [1]
    first, second = post_process_detection_masks(outputs, detections, target_sizes=[(40, 60), (20, 60)],
                                                 processed_sizes=[(20, 30), (10, 30)])
    # Bilinear x2 of a +-10 logit step, thresholded at 0.5, doubles the region exactly.
    doubled = region.repeat_interleave(2, 0).repeat_interleave(2, 1).numpy()
    assert first[0] == first[1] and first[2] is None
    assert np.array_equal(rle_to_mask(first[0]), doubled) and first[0]["area"] == doubled.sum()
    assert first[0]["size"] == [40, 60] and second[0]["size"] == [20, 60]
    assert np.array_equal(rle_to_mask(second[0]), doubled[:20])  # cropped to the image's top 10 rows, then x2
    with pytest.raises(ValueError, match="detections has 1 entries"):
        post_process_detection_masks(outputs, detections[:1])


def test_pruned_masks_are_the_same_as_masks_for_every_query(tiny_panoptic_model):
    """Pruned inference keeps the masks of the top queries only, in its own order; `query_indices` must still find
    each detection's mask, so the RLEs equal those from the unpruned output (a mask for every query)."""
    model = ConditionalDetrForSegmentation.from_pretrained(tiny_panoptic_model).eval()
    processor = ConditionalDetrImageProcessor.from_pretrained(tiny_panoptic_model)
    frames = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (2, 38, 96, 3), dtype=np.uint8))
    inputs = processor.preprocess_frames(frames)
    sizes = [(60, 150)] * 2
    with torch.inference_mode():
        every = model(inputs["pixel_values"], inputs["pixel_mask"])
        pruned = model(inputs["pixel_values"], inputs["pixel_mask"], score_threshold=0.0, top_k=4)
    detections = post_process_object_detection(pruned, threshold=0.0, target_sizes=sizes, top_k=4)
    for detection, logits in zip(detections, pruned.logits):  # scores and labels come from the detection's query
        torch.testing.assert_close(detection["scores"],
                                   logits.sigmoid()[detection["query_indices"], detection["labels"]])
    assert [len(i) for i in pruned.mask_query_indices] == [4, 4] and every.pred_masks.shape[1] == 10
    with_pruning = post_process_detection_masks(pruned, detections, target_sizes=sizes)
    without = post_process_detection_masks(every, detections, target_sizes=sizes)
    assert all(m is not None for image in with_pruning for m in image) and with_pruning == without


def test_detector_attaches_a_decodable_mask_to_every_detection(tiny_panoptic_model):
    detector = Detector(ModelSettings(path=str(tiny_panoptic_model), threshold=0.0, instance_masks=True))
    rng = np.random.default_rng(0)
    frames = [torch.from_numpy(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in ((38, 96, 3), (64, 80, 3))]
    source_sizes = [(60, 150), (130, 162)]
    results, _ = detector(frames, source_sizes)
    for (detections, panoptic), size in zip(results, source_sizes):
        assert detections and panoptic is None
        for detection in detections:
            decoded = _decode_with_pycocotools(detection.mask)
            assert decoded.shape == size and tuple(detection.mask.size) == size
            assert detection.mask.area == decoded.sum()
    # The masks are on by request only: the same checkpoint and frames give none by default.
    plain, _ = Detector(ModelSettings(path=str(tiny_panoptic_model), threshold=0.0))(frames, source_sizes)
    for (without, _), (detections, _) in zip(plain, results):
        assert without and all(d.mask is None for d in without)
        assert [d.box for d in without] == [d.box for d in detections]


def test_cdetr_detect_instance_masks_and_errors(tmp_path, tiny_panoptic_model, tiny_model, capsys):
    result = detect_still(tmp_path, np.full((50, 70, 3), 120, np.uint8), tiny_panoptic_model, "--instance-masks")
    assert result.detections and all(_decode_with_pycocotools(d.mask).shape == (50, 70) for d in result.detections)
    assert isinstance(json.loads((tmp_path / "out" / "still.json").read_text())["detections"][0]["mask"]["counts"],
                      str)
    capsys.readouterr()
    # A detection checkpoint has no mask head: a clear error before any work, from `detect` and from `run`.
    assert main(["detect", str(tmp_path / "still.png"), "--model", str(tiny_model), "--instance-masks"]) == 2
    assert "instance masks" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "video.mp4"), "--model", str(tiny_model), "--instance-masks"]) == 2
    assert "ConditionalDetrForSegmentation" in capsys.readouterr().err


def test_instance_masks_setting_from_env_and_schema(tiny_model, capsys):
    config = load_config(env={"CDETR_MODEL__INSTANCE_MASKS": "true", "CDETR_MODEL__PATH": str(tiny_model)})
    assert config.model.instance_masks and not ModelSettings().instance_masks
    with pytest.raises(ValueError, match="instance masks: needs a ConditionalDetrForSegmentation"):
        check_model_path(config.model)
    assert main(["schema", "frame"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["$defs"]["RLE"]["properties"]) == {"size", "counts", "area"}
    assert "mask" in schema["$defs"]["Detection"]["properties"]
