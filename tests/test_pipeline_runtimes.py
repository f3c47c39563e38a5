"""`model.runtime`: the worker's model in ONNX Runtime and OpenVINO gives the FrameResults of the PyTorch runtime.

`Detector` parity on a padded batch (frames of two sizes), then `cdetr run --runtime X` over one short video per
runtime (real Ray, real redis-server), checked for exactly-once, in-order delivery and against the torch run's
results. Tolerances: scores within 1e-4 (the export's own check), boxes within 0.05 source pixels.
"""
import json

import pytest
import torch
import yaml

from helpers import encode_video
from pipeline.cli import main
from pipeline.config import ModelSettings
from pipeline.wire import frames_key
from pipeline.worker import Detector

RUNTIMES = ("torch", "onnxruntime", "openvino")
SCORE_TOLERANCE = 1e-4
BOX_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


def assert_same_detections(actual, expected) -> None:
    assert [d["label"] for d in actual] == [d["label"] for d in expected]
    for a, e in zip(actual, expected):
        assert abs(a["score"] - e["score"]) < SCORE_TOLERANCE
        assert max(abs(x - y) for x, y in zip(a["box"], e["box"])) < BOX_TOLERANCE


@pytest.mark.parametrize("runtime", RUNTIMES[1:])
def test_detector_results_match_the_torch_runtime_on_a_padded_batch(tiny_model, export_cache, runtime):
    generator = torch.Generator().manual_seed(3)
    frames = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
              for shape in ((72, 128, 3), (128, 96, 3))]
    sizes = [(720, 1280), (1280, 960)]
    settings = {"path": tiny_model, "threshold": 0.0, "top_k": 5, "export_cache": export_cache}
    expected, _ = Detector(ModelSettings(**settings))(frames, sizes)
    actual, timings = Detector(ModelSettings(**settings, runtime=runtime))(frames, sizes)
    assert {"inference", "postprocess"} <= timings.keys()
    for (detections, panoptic), (reference, _) in zip(actual, expected):
        assert panoptic is None and len(detections) == 5
        assert_same_detections([d.model_dump() for d in detections], [d.model_dump() for d in reference])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, redis_server, redis_client, ray_session, tiny_model, export_cache):
    """`cdetr run --runtime X` on one 14-frame video per runtime: {runtime: its Redis stream}."""
    folder = tmp_path_factory.mktemp("runtimes")
    video = encode_video(folder / "clip.mp4", 14, (160, 96))
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump({
        "batching": {"max_batch_size": 4},
        "decoder": {"num_cpus": 0.1},
        "model": {"path": str(tiny_model), "threshold": 0.0, "top_k": 3, "export_cache": str(export_cache)},
        "tracking": {"enabled": False}}))
    streams = {}
    for runtime in RUNTIMES:
        assert main(["run", str(video), "--source-id", f"clip-{runtime}", "--runtime", runtime, "--config",
                     str(config), "--redis-url", redis_server["url"]]) == 0
        streams[runtime] = redis_client.xrange(frames_key("cdetr", f"clip-{runtime}"))
    return streams


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_cdetr_run_writes_every_frame_exactly_once_in_order(runs, runtime):
    stream = runs[runtime]
    assert [fields["type"] for _, fields in stream] == ["frame"] * 14 + ["eos"]
    assert [entry_id for entry_id, _ in stream] == [f"{i + 1}-0" for i in range(14)] + ["14-1"]
    assert [json.loads(fields["json"])["frame_index"] for _, fields in stream[:-1]] == list(range(14))


@pytest.mark.parametrize("runtime", RUNTIMES[1:])
def test_cdetr_run_results_match_the_torch_runtime(runs, runtime):
    for (_, fields), (_, reference) in zip(runs[runtime][:-1], runs["torch"][:-1]):
        actual, expected = json.loads(fields["json"]), json.loads(reference["json"])
        assert len(actual["detections"]) == 3
        assert_same_detections(actual["detections"], expected["detections"])
