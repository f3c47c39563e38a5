"""The shipped model reproduces `model/weights/EVAL.md`: the held-out test set (500 images, seed 2) is generated
again and evaluated exactly as `cdetr eval --panoptic` does; the headline numbers must match the table's digits."""
import re
from pathlib import Path

import pytest
import torch

from model import ConditionalDetrForSegmentation, ConditionalDetrImageProcessor
from model.evaluate import evaluate
from model.inference import InferenceOptions, optimize
from model.shapes import write_dataset
from pipeline.config import DEFAULT_MODEL_PATH

EVAL_MD = DEFAULT_MODEL_PATH.parent / "EVAL.md"


def _documented(pattern: str) -> float:
    match = re.search(pattern, EVAL_MD.read_text())
    assert match, f"{pattern!r} not found in {EVAL_MD}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def test_set(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("shapes-test"), 500, size=256, seed=2, workers=2)


def _evaluate(data: Path, options: InferenceOptions | None = None) -> dict:
    model = ConditionalDetrForSegmentation.from_pretrained(DEFAULT_MODEL_PATH)
    if options is not None:
        model = optimize(model, options)
    return evaluate(model, ConditionalDetrImageProcessor.from_pretrained(DEFAULT_MODEL_PATH), data)


def test_bundled_model_reproduces_eval_md(test_set: Path):
    metrics = _evaluate(test_set)
    # the numbers EVAL.md states, to its 4 decimals
    assert metrics["bbox"]["AP"] == pytest.approx(_documented(r"\| bbox AP \(IoU \.50:\.95\) \| \*\*([\d.]+)\*\*"),
                                                  abs=5e-5)
    assert metrics["panoptic"]["PQ"] == pytest.approx(_documented(r"\| PQ \| \*\*([\d.]+)\*\*"), abs=5e-5)
    assert metrics["segm"]["AP"] == pytest.approx(_documented(r"\| segm AP / AP50 / AP75 [^|]*\| ([\d.]+)"),
                                                  abs=5e-5)
    # and they meet the targets of issue 5
    assert metrics["bbox"]["AP"] >= 0.70 and metrics["panoptic"]["PQ"] >= 0.60


def test_bfloat16_autocast_keeps_the_accuracy(test_set: Path):
    """`model.autocast: bfloat16` (the pipeline's fastest CPU switch) changes logits by ~1e-2; what counts is that
    the task metrics stay where float32 puts them (EVAL.md states both). bf16 digits depend on the CPU's kernels
    (oneDNN blocks its bf16 reductions per ISA): an Intel Xeon gave bbox AP 0.72685 where the AMD EPYC gave
    EVAL.md's 0.7269, so the bf16 figures are checked to 1e-3, not to their last digit."""
    bf16 = _evaluate(test_set, InferenceOptions(dtype=torch.bfloat16))
    assert bf16["bbox"]["AP"] == pytest.approx(_documented(r"- bfloat16 autocast: bbox AP ([\d.]+)"), abs=1e-3)
    assert bf16["panoptic"]["PQ"] == pytest.approx(_documented(r"- bfloat16 autocast: .*?PQ ([\d.]+)"), abs=1e-3)
    assert abs(bf16["bbox"]["AP"] - _documented(r"\| bbox AP \(IoU \.50:\.95\) \| \*\*([\d.]+)\*\*")) < 0.005
    assert abs(bf16["panoptic"]["PQ"] - _documented(r"\| PQ \| \*\*([\d.]+)\*\*")) < 0.005
