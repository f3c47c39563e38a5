"""`cdetr detect` on still images with the tiny model: a FrameResult JSON and an annotated PNG per image."""
import base64
import json

import numpy as np
import torch
from PIL import Image

from helpers import TINY_MODEL_SIZE, detect_still
from model.coco_format import decode_id_png
from model.image_processor import get_resize_output_size
from model.training.shapes import STUFF_IDS
from pipeline.cli import main
from pipeline.config import ModelSettings
from pipeline.schema import FrameResult
from pipeline.worker import Detector


def test_detect_writes_json_and_png(tmp_path, tiny_model, capsys):
    image = tmp_path / "scene.png"
    pixels = np.zeros((90, 120, 3), np.uint8)
    pixels[20:60, 30:80] = (250, 200, 30)
    Image.fromarray(pixels).save(image)
    out = tmp_path / "out"
    code = main(["detect", str(image), str(tmp_path / "missing.png"), "--model", str(tiny_model),
                 "--threshold", "0", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1 and "missing.png" in captured.err  # the bad image is reported, the good one processed
    result = FrameResult.model_validate(json.loads((out / "scene.json").read_text()))
    assert (result.width, result.height, result.source_id) == (120, 90, "scene")
    assert result.detections and all(0 <= (d.box[0] + d.box[2]) / 2 <= 120 for d in result.detections)
    assert json.loads(captured.out.splitlines()[0])["source_id"] == "scene"
    drawn = np.asarray(Image.open(out / "scene.png"))
    assert drawn.shape == (90, 120, 3) and not np.array_equal(drawn, pixels)  # boxes were drawn


def test_detect_with_a_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["detect", "x.png", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_detect_panoptic_gives_a_coco_png_and_segments(tmp_path, tiny_panoptic_model, tiny_model, capsys):
    result = detect_still(tmp_path, np.full((60, 150, 3), 90, np.uint8), tiny_panoptic_model, "--panoptic")
    # The PNG is at model input size: 60x150 scaled to the tiny model's 96 px longest edge.
    ids = decode_id_png(base64.b64decode(result.panoptic.png))
    assert ids.shape == get_resize_output_size(60, 150, TINY_MODEL_SIZE) == (38, 96)
    assert result.panoptic.segments and {s.id for s in result.panoptic.segments} == set(np.unique(ids)) - {0}
    for segment in result.panoptic.segments:
        assert segment.area == (ids == segment.id).sum() and segment.label_name
        # stuff classes come from the checkpoint's config.stuff_labels; each is fused into one segment
        assert segment.isthing == (segment.category_id not in STUFF_IDS)
    stuff = [s.category_id for s in result.panoptic.segments if not s.isthing]
    assert len(stuff) == len(set(stuff))
    # (the random tiny model may yield no stuff segment at all: the worker's stuff set is checked directly)
    assert Detector(ModelSettings(path=str(tiny_panoptic_model), panoptic=True)).stuff == set(STUFF_IDS)
    assert Detector(ModelSettings(path=str(tiny_model))).stuff == set()
    # A detection checkpoint has no panoptic head: a clear error before any work.
    assert main(["detect", str(tmp_path / "still.png"), "--model", str(tiny_model), "--panoptic"]) == 2
    assert "ConditionalDetrForSegmentation" in capsys.readouterr().err


def test_a_segmentation_checkpoint_serves_detection_alone(tmp_path, tiny_panoptic_model):
    """Without --panoptic, a segmentation checkpoint runs its detector only: same detections, no panoptic."""
    from pipeline.config import ModelSettings
    from pipeline.worker import Detector

    frame = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (38, 96, 3), dtype=np.uint8))
    detection = Detector(ModelSettings(path=str(tiny_panoptic_model), threshold=0.0))
    panoptic = Detector(ModelSettings(path=str(tiny_panoptic_model), threshold=0.0, panoptic=True))
    assert type(detection.model).__name__ == "ConditionalDetrForObjectDetection"
    (detections, no_panoptic), = detection([frame], [(60, 150)])[0]
    (panoptic_detections, with_panoptic), = panoptic([frame], [(60, 150)])[0]
    assert no_panoptic is None and with_panoptic is not None
    assert detections and [d.box for d in detections] == [d.box for d in panoptic_detections]


def test_detector_gives_the_model_a_mask_only_for_padded_batches(tiny_model):
    """Frames of different sizes are padded into one batch, and the padded frame's detections are those of the
    model given the processor's mask; a batch of one size runs without a mask (no host sync) to the same result."""
    detector = Detector(ModelSettings(path=str(tiny_model), threshold=0.0))
    rng = np.random.default_rng(1)
    # Padded enough to show in the stride-32 mask the attention reads (the model input is at most 64x96).
    small, large = (torch.from_numpy(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in ((20, 96, 3),
                                                                                                 (64, 64, 3)))
    sizes = [(60, 150), (130, 162)]
    for frames in ([small, large], [small, small]):
        results, _ = detector(frames, sizes)
        with torch.inference_mode():
            outputs = detector.model(**detector.processor.preprocess_frames(frames))
        expected = detector.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes,
                                                                    top_k=detector.settings.top_k)
        for (detections, _), reference in zip(results, expected):
            assert detections
            np.testing.assert_allclose([d.score for d in detections], reference["scores"].numpy(), atol=1e-5)
            np.testing.assert_allclose([d.box for d in detections], reference["boxes"].numpy(), atol=1e-3)


def test_compiled_detector_gives_the_eager_detections(tiny_model):
    """`model.compile` as the pipeline's workers run it: batches padded to the largest batch, no mask for frames
    of one size, a mask for frames of different sizes; the same detections as without it."""
    eager = Detector(ModelSettings(path=str(tiny_model), threshold=0.0))
    compiled = Detector(ModelSettings(path=str(tiny_model), threshold=0.0, compile=True), batch_size=3)
    rng = np.random.default_rng(2)
    small, large = (torch.from_numpy(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in ((20, 96, 3),
                                                                                                 (64, 64, 3)))
    for frames in ([large], [large, large], [small, large]):
        sizes = [tuple(frame.shape[:2]) for frame in frames]
        for (ours, _), (expected, _) in zip(compiled(frames, sizes)[0], eager(frames, sizes)[0]):
            assert ours and len(ours) == len(expected)
            for detection in ours:  # matched by label and score, not by rank: near-ties may swap places
                assert any(d.label == detection.label and abs(d.score - detection.score) < 1e-4
                           and np.allclose(d.box, detection.box, atol=1e-2) for d in expected)
