"""`python -m pipeline.demo` (`make demo`): a shapes video through the whole pipeline, rendered back from Redis.

Uses the bundled model `model/weights/shapes-tiny/`. If it is missing, the demo still runs end to end with a
randomly initialized tiny model and says so loudly: its detections are then meaningless.
"""
import sys
from pathlib import Path

from model.segmentation import has_panoptic_head
from model.training.random_model import save_random_tiny_model
from model.training.shapes import write_sample_video
from pipeline.cli import log_to_stderr
from pipeline.config import DEFAULT_MODEL_PATH, PipelineConfig
from pipeline.redis_server import resolve_redis_url
from pipeline.render import render_video
from pipeline.run_command import print_summary
from pipeline.runner import run_job
from pipeline.sink import RedisSink, connect

OUT = Path("demo-out")
SOURCE_ID = "demo-shapes"


def _model_path() -> Path:
    if (DEFAULT_MODEL_PATH / "config.json").is_file():
        return DEFAULT_MODEL_PATH
    banner = "!" * 100
    print(f"{banner}\n!! {DEFAULT_MODEL_PATH} does not exist: this demo uses a RANDOMLY INITIALIZED tiny model.\n"
          f"!! Its detections are MEANINGLESS; only the plumbing (decode -> batch -> infer -> Redis -> render) is "
          f"real.\n{banner}", file=sys.stderr)
    return save_random_tiny_model(OUT / "random-tiny-model", {"shortest_edge": 256, "longest_edge": 448},
                                  panoptic=True)


def main() -> int:
    log_to_stderr()
    OUT.mkdir(exist_ok=True)
    video = write_sample_video(OUT / "shapes.mp4", seconds=4.0, size=(640, 360), seed=0)
    model_path = _model_path()
    config = PipelineConfig.model_validate({
        "sources": [{"id": SOURCE_ID, "url": str(video)}],
        "model": {"path": str(model_path), "panoptic": has_panoptic_head(model_path)},
        "redis": {"url": resolve_redis_url(None)},
    })
    sink = RedisSink(connect(config.redis.url), config.redis.prefix)
    sink.client.delete(sink.frames_key(SOURCE_ID))  # a fresh run, not a resume of the previous demo
    summary = run_job(config, progress=True)
    print_summary(summary)
    annotated = render_video(sink, SOURCE_ID, OUT / "shapes-annotated.mp4", str(video))
    print(f"\nsample video:     {video} (ground truth {video}.gt.json)\n"
          f"model:            {config.model.path} (panoptic head: {'on' if config.model.panoptic else 'off'})\n"
          f"results in Redis: {config.redis.url} stream {sink.frames_key(SOURCE_ID)}, events {sink.events_key}\n"
          f"annotated video:  {annotated}\n"
          f"read them:        cdetr subscribe {SOURCE_ID} --redis-url {config.redis.url}")
    return 0 if summary[SOURCE_ID]["status"] == "eos" else 1


if __name__ == "__main__":
    sys.exit(main())
