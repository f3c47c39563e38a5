"""Everything configurable about a pipeline run, as one pydantic model.

Layers, later ones win: a YAML/JSON file, then environment variables, then command-line flags.
Environment variables are `CDETR_<FIELD>` for top-level fields and `CDETR_<SECTION>__<FIELD>` for nested ones
(e.g. `CDETR_BATCHING__MAX_BATCH_SIZE=4`, `CDETR_REDIS__URL=redis://host:6379/0`); values are parsed as YAML
scalars, so `CDETR_SOURCES='[{"id": "cam1", "url": "rtsp://..."}]'` works too.
Invalid values raise `ConfigError` naming the field before anything starts.
"""
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline import geometry
from pipeline.redis_url import check_redis_url
from pipeline.sources import parse_source_url, redact
from pipeline.wire import DEFAULT_PREFIX

ENV_PREFIX = "CDETR_"
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent.parent / "model" / "weights" / "shapes-tiny"


class ConfigError(ValueError):
    """Invalid configuration; the message names every bad field."""


class _Section(BaseModel):
    # Unknown keys are typos, never silently ignored.
    model_config = ConfigDict(extra="forbid")


Point = tuple[FiniteFloat, FiniteFloat]  # NaN or infinite coordinates make no geometry
Anchor = Literal["bottom_center", "center"]


class LineConfig(_Section):
    """A counting line: a track crossing it from one side to the other counts once per crossing."""
    name: str = Field(min_length=1, max_length=64)
    points: tuple[Point, Point] = Field(description="[[x0, y0], [x1, y1]] in source-frame pixels")
    in_side: Literal["left", "right"] = Field(
        description="side of the directed line p0->p1 (as drawn on the image) that counts as `in`")
    labels: list[str] | None = Field(None, description="count only these classes (label_name); None: all thing "
                                                       "classes")
    anchor: Anchor = Field("bottom_center", description="point of the box that must cross the line")

    @field_validator("points")
    @classmethod
    def _not_degenerate(cls, points: tuple[Point, Point]) -> tuple[Point, Point]:
        if points[0] == points[1]:
            raise ValueError("a line needs two distinct points")
        return points


class ZoneConfig(_Section):
    """A region: its occupancy per class each frame, and enter/leave events with the time spent inside."""
    name: str = Field(min_length=1, max_length=64)
    polygon: list[Point] = Field(min_length=3, description="[[x, y], ...] vertices in source-frame pixels, in "
                                                          "order; the last connects back to the first")
    labels: list[str] | None = Field(None, description="count only these classes (label_name); None: all thing "
                                                       "classes")
    anchor: Anchor = Field("bottom_center", description="point of the box that must be inside the zone")

    @field_validator("polygon")
    @classmethod
    def _simple_polygon(cls, polygon: list[Point]) -> list[Point]:
        if geometry.polygon_area(polygon) == 0:
            raise ValueError("the polygon has zero area")
        if not geometry.is_simple_polygon(polygon):
            raise ValueError("the polygon intersects itself")
        return polygon


class SourceConfig(_Section):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="stream name: cdetr:frames:<id>")
    url: str = Field(description="file path, file://, http(s)://, rtsp(s)://, udp:// or tcp:// (MPEG-TS); user and "
                     "password may be ${ENV_NAME}, set where the decoders run (docs/security.md)")
    fps: float | None = Field(None, gt=0, description="sample at most this many frames per second (None: all)")
    policy: Literal["block", "drop_oldest"] | None = Field(
        None, description="backpressure: block (default for files) or drop_oldest (default for live sources)")
    tracking: bool | None = Field(None, description="track objects and count lines/zones on this source (None: "
                                                    "tracking.enabled; every source is a video)")
    lines: list[LineConfig] = Field(default_factory=list, description="counting lines (tracking only)")
    zones: list[ZoneConfig] = Field(default_factory=list, description="occupancy zones (tracking only)")
    transport: Literal["auto", "tcp", "udp"] = Field(
        "auto", description="RTSP media transport: auto tries TCP, then UDP when the camera offers only that "
        "(pipeline/sources.py transports); rtsp:// only")
    ca_file: str | None = Field(None, description="CA certificates (PEM) an https:// or rtsps:// server's "
                                "certificate is verified against, on the decoders' nodes (None: the system's)")

    @field_validator("lines", "zones")
    @classmethod
    def _unique_names(cls, items: list[LineConfig] | list[ZoneConfig]) -> list[LineConfig] | list[ZoneConfig]:
        names = [item.name for item in items]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate names: {', '.join(duplicates)}")
        return items

    @field_validator("url")
    @classmethod
    def _allowed_url(cls, url: str) -> str:
        source = parse_source_url(url)
        # Decoder actors may run in another directory (or on another node): relative to where cdetr was run.
        if source.scheme == "file" and not url.startswith("file:"):
            return str(Path(source.target).resolve())
        return url

    @model_validator(mode="after")
    def _applies_to_url(self) -> "SourceConfig":
        scheme = parse_source_url(self.url).scheme
        if self.transport != "auto" and scheme != "rtsp":
            raise ValueError(f"transport {self.transport!r} applies to rtsp:// sources only (rtsps:// is always TCP)")
        if self.ca_file is not None and scheme not in ("https", "rtsps"):
            raise ValueError("ca_file applies to https:// and rtsps:// sources only")
        return self

    @property
    def live(self) -> bool:
        return parse_source_url(self.url).live

    @property
    def backpressure(self) -> str:
        return self.policy or ("drop_oldest" if self.live else "block")


class BatchingConfig(_Section):
    max_batch_size: int = Field(8, ge=1, description="frames per model call")
    timeout_ms: float = Field(10.0, ge=0, description="send a partial batch this long after its first frame")
    max_frames_per_source: int | None = Field(
        None, ge=1, description="fair share: most frames one source puts in a batch (None: max_batch_size)")
    max_in_flight_per_source: int = Field(32, ge=1, description="decoded but not yet written frames per source")
    batches_in_flight_per_worker: int | None = Field(
        None, ge=1, description="batches sent to a worker before its results come back (None: 2 when "
        "workers.num_gpus > 0, so that Ray fetches a batch's frames while the GPU computes the previous one; 1 on "
        "CPU workers, where a second batch only waits, aging live frames)")

    @property
    def source_cap(self) -> int:
        return min(self.max_frames_per_source or self.max_batch_size, self.max_batch_size)


def _custom_resources(resources: dict[str, float]) -> dict[str, float]:
    """Ray refuses its predefined resources in `resources=`: they have their own fields."""
    predefined = sorted(set(resources) & {"CPU", "GPU", "memory", "object_store_memory"})
    if predefined:
        raise ValueError(f"{', '.join(predefined)} cannot be custom resources (use num_cpus / num_gpus)")
    return resources


# Ray custom resources an actor requests, e.g. {decoder: 1}; only nodes that advertise them can take the actor.
Resources = Annotated[dict[str, Annotated[float, Field(ge=0)]], AfterValidator(_custom_resources)]


class DecoderConfig(_Section):
    num_cpus: float = Field(0.25, ge=0, description="Ray CPU reservation per StreamDecoder actor")
    resources: Resources = Field(
        default_factory=dict, description="Ray custom resources per StreamDecoder actor, e.g. {decoder: 1} "
        "(deploy/README.md, Placement)")
    buffer_size: int = Field(64, ge=1, description="decoded frames buffered per source")
    # What a decoder hands the workers (pipeline/decoder.py). swscale's RGB conversion and resize cost ~2x the
    # decoding itself; a GPU worker converts and resizes the YUV planes in a few kernels (bench/RESULTS.md).
    output: Literal["rgb", "yuv420"] | None = Field(
        None, description="rgb: RGB scaled to model input size by swscale; yuv420: the decoded YUV 4:2:0 planes, "
        "converted and resized on the worker's device (None: yuv420 when workers.num_gpus > 0, else rgb)")
    open_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(5.0, gt=0)
    reconnect_initial_s: float = Field(1.0, gt=0, description="first reconnect delay; doubles per failure")
    reconnect_max_s: float = Field(30.0, gt=0)
    watchdog_s: float = Field(10.0, gt=0, description="reconnect a live source that yields no frame this long")
    # Many cameras lock an account after 5-7 failed logins: a wrong password is retried a handful of times an hour.
    auth_retry_s: float = Field(900.0, gt=0, description="wait after a live source refused our credentials (401, "
                                "403) before trying again")
    # Hostile input: the header's frame size is checked before anything is decoded (a 16k x 16k frame is 400 MB
    # of YUV), and only common camera/file codecs reach FFmpeg (its rarely used decoders are where its CVEs are).
    max_pixels: int = Field(7680 * 4320, ge=1, description="refuse streams whose frames have more pixels (8K)")
    allowed_codecs: list[str] = Field(
        ["h264", "hevc", "mpeg4", "mpeg2video", "mpeg1video", "vp8", "vp9", "av1", "mjpeg"], min_length=1,
        description="video codecs that are decoded; anything else is refused")
    max_restarts: int = Field(3, ge=0, description="times a dead decoder actor is recreated (resuming) per source")


class WorkersConfig(_Section):
    count: int = Field(1, ge=1, description="DetectorWorker actors (the most, with streams_per_worker)")
    streams_per_worker: int | None = Field(
        None, ge=1, description="start ceil(sources / this) workers, 1 to `count`, for the sources the job starts "
        "with (None: always `count`); sources added later share them")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per worker; fractional shares a GPU; 0 runs on CPU")
    num_cpus: float = Field(1.0, ge=0)
    resources: Resources = Field(
        default_factory=dict, description="Ray custom resources per worker, e.g. {gpu_standin: 1}")
    max_restarts: int = Field(3, ge=-1, description="Ray restarts of a dead worker (-1: forever)")
    max_task_retries: int = Field(3, ge=-1, description="retries of a batch whose worker died (sink is idempotent)")


class ModelSettings(_Section):
    path: Path = Field(DEFAULT_MODEL_PATH, description="checkpoint dir (config.json + weights) or .pth file")
    threshold: float = Field(0.5, ge=0, le=1)
    top_k: int = Field(100, ge=1)
    panoptic: bool = Field(False, description="also run the panoptic head (needs a segmentation checkpoint)")
    instance_masks: bool = Field(
        False, description="also attach a COCO RLE mask to each detection (needs a segmentation checkpoint)")
    size: dict[str, int] | None = Field(
        None, description="processor resize rule override, e.g. {shortest_edge: 480, longest_edge: 800}")
    # model/optimize.py InferenceOptions; the always-on ones (batch-norm folding, channels-last) have no setting.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32; bf16 / fp16 (torch: autocast, outputs back in float32; openvino: its "
        "INFERENCE_PRECISION_HINT), not within 1e-4 of fp32 (task accuracy: model/weights/EVAL.md, `cdetr eval "
        "--precision`); auto: bf16 on CPUs with AMX and on GPUs of compute capability >= 8.0, else fp32 "
        "(model/precision.py)")
    compile: bool = Field(
        False, description="torch.compile the detector (backbone, transformer, heads) as one graph, on a GPU also "
        "replayed as one CUDA graph; every batch is padded to batching.max_batch_size, so each frame size compiles "
        "once, at its first batch (~20 s on a CPU)")
    runtime: Literal["torch", "onnxruntime", "openvino"] = Field(
        "torch", description="what runs the model: torch, or the detector exported to ONNX (model/export.py) run "
        "by ONNX Runtime (fp32) or OpenVINO, on CPU workers; detection only (no panoptic / instance masks)")
    export_cache: Path = Field(
        Path("~/.cache/cdetr/onnx"), description="with runtime onnxruntime / openvino: where each worker's node "
        "keeps the exported graph (exported at the first worker start, ~20 s for the bundled model)")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: Any) -> Any:
        if isinstance(values, dict) and "autocast" in values:
            raise ValueError("autocast was replaced by precision (bfloat16 -> bf16, float16 -> fp16; auto picks the "
                             "hardware's fast one)")
        return values

    @model_validator(mode="after")
    def _runtime_can_serve(self) -> "ModelSettings":
        if self.runtime == "torch":
            return self
        if self.needs_masks:
            raise ValueError(f"runtime {self.runtime}: panoptic output and instance masks need the mask head, "
                             "which is not exported; use runtime torch")
        if self.compile:
            raise ValueError(f"compile is torch.compile, for runtime torch only (got runtime {self.runtime})")
        if self.runtime == "onnxruntime" and self.precision in ("bf16", "fp16"):
            raise ValueError(f"runtime onnxruntime runs fp32 only, got precision {self.precision} (openvino runs "
                             "bf16)")
        return self

    @property
    def needs_masks(self) -> bool:
        """Whether the outputs asked for need the segmentation model's masks."""
        return self.panoptic or self.instance_masks


class TrackingConfig(_Section):
    """The per-source tracker (pipeline/tracker.py, docs/tracking.md): ByteTrack's two-stage association."""
    enabled: bool = Field(True, description="track every source whose `tracking` is not set (a source's "
                                            "`tracking` overrides this)")
    low_threshold: float = Field(
        0.1, ge=0, le=1, description="workers also send detections down to this score; below model.threshold they "
        "are only kept when they continue a confirmed track (second association stage)")
    high_threshold: float | None = Field(
        None, ge=0, le=1, description="detections from this score are matched first and may start tracks (None: "
        "model.threshold)")
    match_iou: float = Field(0.2, gt=0, le=1, description="least IoU of a high-score match")
    low_match_iou: float = Field(0.3, gt=0, le=1, description="least IoU of a low-score (second stage) match")
    min_hits: int = Field(2, ge=1, description="matched frames in a row before a track is confirmed (gets its ID)")
    max_lost_s: float = Field(1.0, ge=0, description="a track unmatched this long (in pts seconds) ends")
    class_aware: bool = Field(True, description="match detections only to tracks of their class")

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> "TrackingConfig":
        if self.high_threshold is not None and self.high_threshold <= self.low_threshold:
            raise ValueError(f"high_threshold ({self.high_threshold}) must exceed low_threshold "
                             f"({self.low_threshold})")
        return self


class RedisConfig(_Section):
    url: str | None = Field(None, description="redis://, rediss://, unix:// or redis+sentinel:// URL "
                            "(docs/wire-format.md, Connecting; None: the embedded local default)")
    prefix: str = Field(DEFAULT_PREFIX, pattern=r"^[A-Za-z0-9_.-]+$")
    maxlen: int = Field(100_000, ge=1, description="approximate retention per frames stream (MAXLEN ~)")
    max_result_bytes: int = Field(
        4 << 20, ge=1024, description="a larger FrameResult is written without detections/panoptic, with `error`")
    retry_initial_s: float = Field(0.1, gt=0, description="first wait when Redis is unreachable; doubles per try")
    retry_max_s: float = Field(5.0, gt=0, description="longest wait between tries")
    retry_timeout_s: float = Field(600.0, gt=0, description="give up (and fail the job) after this long down")

    @field_validator("url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is not None:
            check_redis_url(url)
        return url


class PipelineConfig(_Section):
    sources: list[SourceConfig] = Field(default_factory=list)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    model: ModelSettings = Field(default_factory=ModelSettings)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    ray_address: str | None = Field(None, description="Ray cluster address (None: start a local Ray)")
    keep_running: bool = Field(False, description="after the sources end, wait for control-stream messages")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _unique_ids(self) -> "PipelineConfig":
        ids = [s.id for s in self.sources]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate source ids: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _exported_runtimes_run_on_cpu(self) -> "PipelineConfig":
        if self.model.runtime != "torch" and self.workers.num_gpus > 0:
            raise ValueError(f"model.runtime {self.model.runtime} runs on CPU workers; with workers.num_gpus > 0 "
                             "use runtime torch")
        return self

    @model_validator(mode="after")
    def _analytics_need_tracking(self) -> "PipelineConfig":
        for source in self.sources:
            if (source.lines or source.zones) and not self.tracks(source):
                raise ValueError(f"source {source.id}: lines and zones need tracking, which is off for it")
        return self

    def tracks(self, source: SourceConfig) -> bool:
        """Whether `source` is tracked: its own `tracking`, else `tracking.enabled` (every source is a video)."""
        return self.tracking.enabled if source.tracking is None else source.tracking

    @property
    def batches_in_flight_per_worker(self) -> int:
        """`batching.batches_in_flight_per_worker`, with its default resolved by where the workers run. On CPU
        workers 1 and 2 gave the same throughput, and 1 cut live cameras' p50 latency from 1.8 to 1.1 s
        (bench/RESULTS.md 5b)."""
        return self.batching.batches_in_flight_per_worker or (2 if self.workers.num_gpus > 0 else 1)

    @property
    def decoder_output(self) -> str:
        """`decoder.output`, with its default resolved: the planes go to GPU workers, RGB to CPU workers."""
        return self.decoder.output or ("yuv420" if self.workers.num_gpus > 0 else "rgb")


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Build the config from a file, `CDETR_*` environment variables and explicit overrides (in that order)."""
    data: dict[str, Any] = _read_file(Path(path)) if path is not None else {}
    _merge(data, _from_env(os.environ if env is None else env))
    _merge(data, dict(overrides or {}))
    return validate_config(data)


def validate_config(data: Mapping[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError("invalid configuration:\n" + "\n".join(_describe(err) for err in e.errors())) from None


def _describe(err: Mapping[str, Any]) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return redact(f"  {field}: {err['msg']} (got {err.get('input')!r})")  # a bad URL may hold a password


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON: one parser for both
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at the top level")
    return data


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = name[len(ENV_PREFIX):].lower().split("__")
        if keys[0] not in PipelineConfig.model_fields:
            continue  # CDETR_* variables of other tools are not ours to reject
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"environment variable {name} is not a valid value: {e}") from None
        _merge(data, _nest(keys, value))
    return data


def _nest(keys: list[str], value: Any) -> dict[str, Any]:
    for key in reversed(keys):
        value = {key: value}
    return value


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
