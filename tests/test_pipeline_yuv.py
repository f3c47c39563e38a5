"""`decoder.output: yuv420` end to end on a real local Ray and redis-server: the decoder sends its YUV planes, the
worker converts and resizes them, and the bundled model finds what it finds in the default RGB frames."""
import json

from model.training.shapes import write_sample_video
from pipeline.config import PipelineConfig
from pipeline.runner import run_job
from pipeline.schema import FrameResult
from pipeline.wire import frames_key


def results(redis_server, redis_client, video, output: str) -> list[FrameResult]:
    prefix = f"yuv-test-{output}"
    config = PipelineConfig.model_validate({
        "sources": [{"id": "cam", "url": str(video)}], "decoder": {"num_cpus": 0.1, "output": output},
        "batching": {"max_batch_size": 4}, "redis": {"url": redis_server["url"], "prefix": prefix}})
    assert run_job(config)["cam"]["status"] == "eos"
    return [FrameResult.model_validate(json.loads(fields["json"]))
            for _, fields in redis_client.xrange(frames_key(prefix, "cam")) if fields["type"] == "frame"]


def test_yuv420_frames_give_the_detections_of_rgb_frames(tmp_path, redis_server, redis_client, ray_session):
    video = write_sample_video(tmp_path / "shapes.mp4", seconds=1.0, size=(480, 270), seed=3)
    rgb = results(redis_server, redis_client, video, "rgb")
    yuv = results(redis_server, redis_client, video, "yuv420")
    assert len(rgb) == len(yuv) >= 10
    assert sum(len(r.detections) for r in rgb) >= 2 * len(rgb)  # real detections to compare
    for a, b in zip(rgb, yuv):
        assert (a.frame_index, a.width, a.height) == (b.frame_index, 480, 270)
        # Same objects; the two paths' resizing and chroma filters differ by a grey level here and there.
        matched = [(d, e) for d in a.detections for e in b.detections
                   if d.label == e.label and max(abs(p - q) for p, q in zip(d.box, e.box)) <= 4]
        assert len(matched) >= len(a.detections) - 1 and len(matched) >= len(b.detections) - 1
        assert all(abs(d.score - e.score) < 0.1 for d, e in matched)
