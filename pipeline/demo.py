"""`python -m pipeline.demo` (`make demo`): a shapes video through the whole pipeline, rendered back from Redis,
with its objects tracked and counted across a line and in a zone.

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
from pipeline.schema import Analytics, FrameResult
from pipeline.sink import RedisSink, connect
from pipeline.wire import JSON_FIELD, TYPE_FIELD

OUT = Path("demo-out")
SOURCE_ID = "demo-shapes"
# In the demo video's 640x360 pixels: a vertical line that three of its shapes cross (crossing it to the right
# is `in`), and the lower half.
LINE = {"name": "gate", "points": [[450, 0], [450, 360]], "in_side": "left"}
ZONE = {"name": "lower-half", "polygon": [[0, 180], [640, 180], [640, 360], [0, 360]]}


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
        "sources": [{"id": SOURCE_ID, "url": str(video), "lines": [LINE], "zones": [ZONE]}],
        "model": {"path": str(model_path), "panoptic": has_panoptic_head(model_path)},
        "redis": {"url": resolve_redis_url(None)},
    })
    sink = RedisSink(connect(config.redis.url), config.redis.prefix)
    sink.client.delete(sink.frames_key(SOURCE_ID), sink.state_key(SOURCE_ID))  # a fresh run, not a resume
    summary = run_job(config, progress=True)
    print_summary(summary)
    source = config.sources[0]
    annotated = render_video(sink, SOURCE_ID, OUT / "shapes-annotated.mp4", str(video), source.lines, source.zones)
    print(f"\ncounts at the last frame: {_describe(_last_analytics(sink))}")
    print(f"\nsample video:     {video} (ground truth {video}.gt.json)\n"
          f"model:            {config.model.path} (panoptic head: {'on' if config.model.panoptic else 'off'})\n"
          f"results in Redis: {config.redis.url} stream {sink.frames_key(SOURCE_ID)}, events {sink.events_key}\n"
          f"annotated video:  {annotated}\n"
          f"read them:        cdetr subscribe {SOURCE_ID} --redis-url {config.redis.url}")
    return 0 if summary[SOURCE_ID]["status"] == "eos" else 1


def _last_analytics(sink: RedisSink) -> Analytics | None:
    """The analytics of the stream's last frame: line counts are cumulative, so these are the totals."""
    for _, fields in sink.client.xrevrange(sink.frames_key(SOURCE_ID), count=2):
        if fields.get(TYPE_FIELD) == "frame":
            return FrameResult.model_validate_json(fields[JSON_FIELD]).analytics
    return None


def _describe(analytics: Analytics | None) -> str:
    if analytics is None:
        return "none (tracking is off)"
    lines = [f"line {c.name}: in {sum(c.counts_in.values())} {c.counts_in}, out {sum(c.counts_out.values())} "
             f"{c.counts_out}" for c in analytics.lines]
    zones = [f"zone {z.name}: {sum(z.occupancy.values())} inside {z.occupancy}" for z in analytics.zones]
    return "; ".join(lines + zones)


if __name__ == "__main__":
    sys.exit(main())
