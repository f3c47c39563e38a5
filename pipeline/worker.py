"""DetectorWorker: loads the model once and turns batches of decoded frames into FrameResults.

Frames arrive as the decoders send them (pipeline/decoder.py): RGB at model input size, or YUV 4:2:0 planes that
the worker converts (model/yuv.py) and the processor resizes, on the worker's device.

`Detector` is the model + processor + post-processing without Ray (also used by `cdetr detect`); the model is
PyTorch's or, with `model.runtime`, the exported detector in ONNX Runtime or OpenVINO (model/runtime.py), between
the same pre- and post-processing;
`DetectorWorker` is the Ray actor around it that also fills in the per-frame metadata and timings.
"""
import base64
import time
from pathlib import Path

import numpy as np
import torch

from model import ConditionalDetrForSegmentation, ConditionalDetrImageProcessor
from model.coco_format import panoptic_to_coco
from model.export import cached_export
from model.image_size import get_resize_output_size
from model.optimize import InferenceOptions, frames_to_device, optimize
from model.post_processing import post_process_detection_masks
from model.precision import TORCH_DTYPES, Hardware, detect_hardware, resolve_precision
from model.runtime import ExportedDetector
from model.segmentation import has_panoptic_head, load_detector
from model.yuv import yuv420_to_rgb
from pipeline.config import ModelSettings
from pipeline.frames import ChunkInfo, FrameFormat
from pipeline.schema import RLE, Detection, FrameResult, Panoptic, Segment


def load_processor(settings: ModelSettings) -> ConditionalDetrImageProcessor:
    """The checkpoint's processor (preprocessor_config.json) if it has one, with the `size` override applied."""
    path = Path(settings.path)
    overrides = {} if settings.size is None else {"size": dict(settings.size)}
    if (path / "preprocessor_config.json").is_file():
        return ConditionalDetrImageProcessor.from_pretrained(path, **overrides)
    return ConditionalDetrImageProcessor(**overrides)


def check_model_path(settings: ModelSettings) -> None:
    """Fail before any actor starts when the checkpoint is missing or has no mask head but masks are asked for."""
    path = Path(settings.path)
    if not path.exists():
        raise FileNotFoundError(f"model checkpoint {path} does not exist")
    if settings.needs_masks and not has_panoptic_head(path):
        asked = " and ".join(name for name, on in (("panoptic output", settings.panoptic),
                                                   ("instance masks", settings.instance_masks)) if on)
        raise ValueError(f"{asked}: needs a ConditionalDetrForSegmentation checkpoint; {path} is a detection "
                         f"checkpoint (see `architectures` in its config.json)")


def load_model(settings: ModelSettings) -> torch.nn.Module:
    """The model for the asked outputs; a segmentation checkpoint serves detection too (`load_detector`)."""
    if settings.needs_masks:
        return ConditionalDetrForSegmentation.from_pretrained(settings.path)
    return load_detector(settings.path)


def inference_options(settings: ModelSettings, batch_size: int | None = None,
                      hardware: Hardware | None = None) -> InferenceOptions:
    """The model settings' speed switches as `optimize` takes them; `batch_size`: the largest batch the model
    will be given (a compiled backbone pads smaller ones to it: one compiled shape per frame size); `hardware`:
    what `precision: auto` is resolved for (None: this machine's CPU)."""
    precision = resolve_precision(settings.precision, hardware or detect_hardware("cpu"), settings.runtime)
    return InferenceOptions(compile=settings.compile, batch_size=batch_size if settings.compile else None,
                            dtype=TORCH_DTYPES[precision])


def load_inference_model(settings: ModelSettings, device: torch.device, batch_size: int | None = None
                         ) -> torch.nn.Module | ExportedDetector:
    """The model as `model.runtime` runs it, called alike: (pixel_values, pixel_mask) -> outputs with `logits` and
    `pred_boxes` (and masks from a torch segmentation model); its `config` holds the labels."""
    hardware = detect_hardware(device)
    model = load_model(settings)
    if settings.runtime == "torch":
        # Batch norm folded into the convs, channels-last backbone: same outputs (1e-4), 1.4x faster on CPU
        # (bench/RESULTS.md); optimize() also puts the model in eval mode.
        return optimize(model.to(device), inference_options(settings, batch_size, hardware))
    graph = cached_export(model, settings.path, settings.export_cache.expanduser())
    precision = resolve_precision(settings.precision, hardware, settings.runtime)
    return ExportedDetector(graph, model.config, settings.runtime, precision, torch.get_num_threads())


class Detector:
    def __init__(self, settings: ModelSettings, device: str = "cpu", batch_size: int | None = None,
                 candidate_threshold: float | None = None):
        self.settings = settings
        # Detections are kept down to this score (None: model.threshold). With tracking on it is lower: the
        # tracker's second stage continues tracks with low-score detections, and drops the others (pipeline/runner.py).
        self.candidate_threshold = settings.threshold if candidate_threshold is None else candidate_threshold
        self.device = torch.device(device)
        self.processor = load_processor(settings)
        self.model = load_inference_model(settings, self.device, batch_size)
        self.id2label: dict[int, str] = self.model.config.id2label
        # Merged into one panoptic segment per class; a checkpoint that does not record them fuses nothing.
        self.stuff = set(self.model.config.stuff_labels)
        self.name = Path(settings.path).name

    @torch.inference_mode()
    def __call__(self, frames: list[torch.Tensor], source_sizes: list[tuple[int, int]]
                 ) -> tuple[list[tuple[list[Detection], Panoptic | None]], dict[str, float]]:
        """Detections (boxes and instance masks in `source_sizes` pixels; masks None when off) and panoptic
        results (at model input size, None when off) for uint8 (h, w, 3) frames, and the batch's timings."""
        started = time.perf_counter()
        same_size = all(f.shape == frames[0].shape for f in frames)
        inputs = self.processor.preprocess_frames(torch.stack(frames) if same_size else frames)
        # Each frame's size after the processor's resize, before padding: the part of the mask maps that is image.
        processed = [get_resize_output_size(h, w, self.processor.size) for h, w in (f.shape[:2] for f in frames)]
        # Without padding the model gets no mask: its forward then never waits for the device (one CUDA graph).
        padded = any(size != tuple(inputs["pixel_values"].shape[-2:]) for size in processed)
        # The mask head computes masks only for the queries that can pass the threshold (pruned inference): every
        # detection's query is among them (barring exact score ties), since a query's best class score is at least
        # its detection's score; a detection whose query got no mask has mask None.
        pruning = {"score_threshold": self.candidate_threshold, "top_k": self.settings.top_k} \
            if self.settings.needs_masks else {}
        outputs = self.model(inputs["pixel_values"], inputs["pixel_mask"] if padded else None, **pruning)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        inferred = time.perf_counter()
        detections = self.processor.post_process_object_detection(
            outputs, threshold=self.candidate_threshold, target_sizes=source_sizes, top_k=self.settings.top_k)
        masks = post_process_detection_masks(outputs, detections, target_sizes=source_sizes,
                                             processed_sizes=processed) if self.settings.instance_masks \
            else [[None] * len(d["scores"]) for d in detections]
        panoptic = self._panoptic(outputs, processed) if self.settings.panoptic else [None] * len(frames)
        results = [(self._detections(d, m), p) for d, m, p in zip(detections, masks, panoptic)]
        timings = {"inference": (inferred - started) * 1e3, "postprocess": (time.perf_counter() - inferred) * 1e3}
        return results, timings

    def _panoptic(self, outputs, sizes: list[tuple[int, int]]) -> list[Panoptic]:
        """COCO panoptic PNG + segments per frame, at `sizes`: each frame's size after preprocessing (model input)."""
        results = self.processor.post_process_panoptic_segmentation(
            outputs, threshold=self.settings.threshold, label_ids_to_fuse=self.stuff, target_sizes=sizes,
            processed_sizes=sizes)
        panoptic = []
        for result in results:
            png, segments = panoptic_to_coco(result["segmentation"], result["segments_info"])
            panoptic.append(Panoptic(png=base64.b64encode(png).decode("ascii"), segments=[
                Segment(id=s["id"], category_id=s["category_id"],
                        label_name=self.id2label.get(s["category_id"], str(s["category_id"])),
                        isthing=s["category_id"] not in self.stuff, score=s.get("score", 0.0), area=s["area"],
                        bbox=tuple(s["bbox"])) for s in segments]))
        return panoptic

    def _detections(self, result: dict[str, torch.Tensor], masks: list[dict | None]) -> list[Detection]:
        return [Detection(label=label, label_name=self.id2label.get(label, str(label)), score=score,
                          box=tuple(box), mask=None if mask is None else RLE(**mask))
                for score, label, box, mask in zip(result["scores"].tolist(), result["labels"].tolist(),
                                                   result["boxes"].tolist(), masks)]


class DetectorWorker:
    """Ray actor: one model per worker; `num_gpus` comes from the actor options, CPU when there is no GPU."""

    def __init__(self, settings: ModelSettings, num_threads: int = 1, max_batch_size: int | None = None,
                 candidate_threshold: float | None = None):
        torch.set_num_threads(max(1, num_threads))
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"
        self.detector = Detector(settings, device, max_batch_size, candidate_threshold)

    def infer(self, infos: list[ChunkInfo], *chunks: np.ndarray) -> list[list[FrameResult]]:
        """One batch: chunk `i` holds the frames of `infos[i]`. Returns FrameResults per chunk, in order."""
        started = time.time()
        device = self.detector.device
        frames = [frame for info, chunk in zip(infos, chunks)
                  for frame in to_rgb(frames_to_device(chunk, device), info.format)]
        frames_of = [(info.source_id, m) for info in infos for m in info.frames]
        outputs, timings = self.detector(frames, [(m.height, m.width) for _, m in frames_of])
        results = [FrameResult(source_id=source_id, frame_index=m.frame_index, pts=m.pts, captured_at=m.captured_at,
                               width=m.width, height=m.height, model=self.detector.name, detections=detections,
                               panoptic=panoptic,
                               timings_ms={"decode": m.decode_ms, "queue": (started - m.captured_at) * 1e3,
                                           **timings})
                   for (source_id, m), (detections, panoptic) in zip(frames_of, outputs)]
        return _split(results, [len(info.frames) for info in infos])


def to_rgb(frames: torch.Tensor, fmt: FrameFormat) -> torch.Tensor:
    """A chunk's frames on the device as (n, h, w, 3) uint8 RGB, whichever form the decoder sent them in."""
    if fmt.pixels == "yuv420p":
        return yuv420_to_rgb(frames, fmt.matrix, fmt.full_range)
    return frames


def _split(items: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for size in sizes:
        out.append(items[start:start + size])
        start += size
    return out
