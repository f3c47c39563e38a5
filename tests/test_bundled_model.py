"""The shipped model reproduces `model/weights/EVAL.md` on its three test sets, none of them seen in training: the
square set of its own generator (500 images, seed 2), 16:9 videos of `cdetr sample-video` (seeds 7, 8, 9, 12) and
the independent renderer's set (`model.training.holdout_shapes`, 200 images, seed 0); each is evaluated as `cdetr eval`
does.

Tolerances: float32 kernels differ between CPUs (AVX2, AVX-512, AMX) in the last bits, which reorders a near-tie of
scores now and then, so a documented number is checked to 0.003, not to its last digit; bf16 is checked against
float32 measured in the same test on the same machine, never against a number from another CPU.
"""
import re
from pathlib import Path

import pytest
import torch

from model import ConditionalDetrForSegmentation, ConditionalDetrImageProcessor
from model.optimize import InferenceOptions, optimize
from model.segmentation import load_detector
from model.training.evaluate import evaluate
from model.training.holdout_shapes import write_holdout_dataset
from model.training.shapes import video_to_dataset, write_dataset, write_sample_video
from pipeline.config import DEFAULT_MODEL_PATH

EVAL_MD = DEFAULT_MODEL_PATH.parent / "EVAL.md"
ANY_CPU = 0.003
VIDEO_SEEDS = (7, 8, 9, 12)


def _documented(test_set: str) -> dict[str, float]:
    """The row of EVAL.md's headline table: | set | bbox AP | AP50 | AP75 | median IoU | PQ |."""
    row = re.search(rf"^\| {test_set} [^|]*\|(.*)\|$", EVAL_MD.read_text(), re.MULTILINE)
    assert row, f"no '{test_set}' row in {EVAL_MD}"
    values = [cell.strip().strip("*") for cell in row.group(1).split("|")]
    return {name: float(value) for name, value in zip(("AP", "AP50", "AP75", "median_IoU", "PQ"), values)
            if value != "-"}


@pytest.fixture(scope="module")
def square_set(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("square"), 500, size=256, seed=2, workers=2)


@pytest.fixture(scope="module")
def video_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("video")
    videos = [write_sample_video(folder / f"seed{seed}.mp4", seconds=5, size=(1280, 720), seed=seed, fps=5)
              for seed in VIDEO_SEEDS]
    return video_to_dataset(videos, folder / "frames")


@pytest.fixture(scope="module")
def holdout_set(tmp_path_factory) -> Path:
    return write_holdout_dataset(tmp_path_factory.mktemp("holdout"), 200, seed=0)


def _evaluate(data: Path, panoptic: bool, options: InferenceOptions | None = None) -> dict:
    model = ConditionalDetrForSegmentation.from_pretrained(DEFAULT_MODEL_PATH) if panoptic else \
        load_detector(DEFAULT_MODEL_PATH)
    if options is not None:
        model = optimize(model, options)
    return evaluate(model, ConditionalDetrImageProcessor.from_pretrained(DEFAULT_MODEL_PATH), data)


def _check_documented(metrics: dict, test_set: str) -> None:
    documented = _documented(test_set)
    for name, value in documented.items():
        measured = metrics["panoptic"]["PQ"] if name == "PQ" else metrics["bbox"][name]
        assert measured == pytest.approx(value, abs=ANY_CPU), (test_set, name)


@pytest.fixture(scope="module")
def video_fp32(video_set: Path) -> dict:
    return _evaluate(video_set, panoptic=False)


# The model shipped before issue 16 (square 256x256 training images of one look), measured on the same sets:
FIRST_MODEL = {"video": {"AP": 0.241, "median_IoU": 0.630},
               "holdout": {"AP": 0.073, "median_IoU": 0.705}}


def test_square_set_reproduces_eval_md(square_set: Path):
    _check_documented(_evaluate(square_set, panoptic=True), "square")


def test_16_9_video_frames_it_never_trained_on(video_fp32: dict):
    """Issue 16's targets (AP >= 0.70, median IoU >= 0.85) are not met yet on video (EVAL.md); what holds: the
    boxes fit 16:9 frames far better than the square-trained first model's did."""
    _check_documented(video_fp32, "video")
    assert video_fp32["bbox"]["AP"] > 1.8 * FIRST_MODEL["video"]["AP"]
    assert video_fp32["bbox"]["median_IoU"] > FIRST_MODEL["video"]["median_IoU"] + 0.1


def test_the_independent_renderers_images(holdout_set: Path):
    metrics = _evaluate(holdout_set, panoptic=False)
    _check_documented(metrics, "holdout")
    assert metrics["bbox"]["AP"] > 5 * FIRST_MODEL["holdout"]["AP"]
    assert metrics["bbox"]["median_IoU"] > FIRST_MODEL["holdout"]["median_IoU"] + 0.1


# bf16 on CPUs without AMX tiles runs slower than float32 (EVAL.md), so its comparison uses the first 160 images
# of the square set (the generator seeds image i with (seed, i): the same images), float32 measured on them too.
BF16_SQUARE_IMAGES = 160


@pytest.fixture(scope="module")
def square_subset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("square-subset"), BF16_SQUARE_IMAGES, size=256, seed=2, workers=2)


def test_bfloat16_autocast_keeps_the_accuracy(square_subset: Path, video_set: Path, video_fp32: dict):
    """`model.precision: bf16` (the pipeline's fastest switch on some CPUs) changes logits by ~1e-2; what counts
    is that the task metrics stay where float32 puts them, both measured here, on this machine."""
    subset_fp32 = _evaluate(square_subset, panoptic=True)
    for data, panoptic, fp32 in ((square_subset, True, subset_fp32), (video_set, False, video_fp32)):
        bf16 = _evaluate(data, panoptic, InferenceOptions(dtype=torch.bfloat16))
        assert abs(bf16["bbox"]["AP"] - fp32["bbox"]["AP"]) < 0.01
        assert abs(bf16["bbox"]["median_IoU"] - fp32["bbox"]["median_IoU"]) < 0.01
        if panoptic:
            assert abs(bf16["panoptic"]["PQ"] - fp32["panoptic"]["PQ"]) < 0.01
