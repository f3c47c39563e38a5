"""Pipeline throughput: N concurrent 720p file sources through the Ray pipeline vs a naive sequential loop.

All run in the same process on the same videos, weights and Redis (a private redis-server on a free port):
  naive     for each video in turn, one frame at a time: PyAV decode at full size -> preprocess (torch resize)
            -> model -> post-process -> one XADD, with our Detector in float32 (what a first version would run)
  naive_with_switches  the same loop with the pipeline's --precision / --compile / --runtime (when one is given)
  naive_transformers  the same loop with the reference: transformers' processor, model and post-processing
  pipeline  `run_job`: a StreamDecoder actor per source (`--decoder-output`: rgb, swscale to model size; yuv420,
            the decoder's planes, converted and resized by the worker), batches across sources, DetectorWorker
            actor(s), pipelined XADDs
  model_ceiling  the workers' compute limit: our Detector alone on batches of model-sized frames (no decode, Ray
            or Redis), one worker's threads, times the number of workers
With `--live S`, the sources are cameras instead of files: each video is looped in real time (30 frames/s) to its
own UDP port as MPEG-TS by a sender process, the pipeline reads them as live sources (`drop_oldest`) for S seconds and
then stops; it reports the frames/s it kept up with against the offered rate, the drops and the end-to-end latency
(decode to Redis) p50/p95 per source. File sources are read as fast as they decode, so their latency is mostly
time spent waiting in the bounded buffers: live sources give the latency a camera sees. (No naive loop in this mode:
one sequential loop cannot read N live streams at once.)
Reports frames/s of each (wall time from the first frame requested to the last result in Redis; the pipeline's
includes starting its actors, so it also reports `steady_fps`, from its first result to its last), the ratios
pipeline / each naive loop and pipeline / ceiling, the CPU milliseconds per frame that each role's processes used
during the pipeline run (driver, workers, decoders, ray, redis; from /proc, start-up included), and the pipeline's
per-source summary. Prints JSON.
Each pipeline worker runs the model with `--threads` torch threads (and reserves that many Ray CPUs); the naive loops
get `--threads` x `--workers` threads, the same cores. On a shared machine more intra-op threads than free cores make
every forward pass several times slower and noisier.

    python bench/bench_pipeline.py [--sources 4] [--seconds 8] [--batch-size 8] [--threads 1] [--workers 1]
                                   [--num-gpus 0] [--precision bf16] [--compile] [--model DIR] [--short-side N]
                                   [--decoder-output rgb|yuv420] [--naive-sources K] [--live S]
                                   [--batches-in-flight N]

The model is `model/weights/shapes-tiny` when it exists, otherwise a random tiny model (said in the output).
"""
import argparse
import json
import multiprocessing
import os
import platform
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import av  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from machine import cpu_model  # noqa: E402

from model.image_size import get_resize_output_size  # noqa: E402
from model.training.random_model import save_random_tiny_model  # noqa: E402
from model.training.shapes import write_sample_video  # noqa: E402
from pipeline.config import DEFAULT_MODEL_PATH, ModelSettings, PipelineConfig  # noqa: E402
from pipeline.redis_server import start_redis_server  # noqa: E402
from pipeline.runner import Job  # noqa: E402
from pipeline.schema import Detection, FrameResult, Stop  # noqa: E402
from pipeline.sink import RedisSink, connect  # noqa: E402
from pipeline.worker import Detector, load_model, load_processor  # noqa: E402

SIZE = (1280, 720)
SOURCE_FPS = 30  # the sources' frame rate, a camera's


Infer = Callable[[np.ndarray], tuple[list[Detection], dict]]


def naive(videos: list[Path], infer: Infer, name: str, sink: RedisSink) -> dict:
    """The loop a first version would be: no batching, no overlap, full-size frames into the processor."""
    # One frame first, off the clock: its model is then warm (and compiled, with --compile), as the pipeline's
    # steady figure starts after its workers' first batch.
    with av.open(str(videos[0])) as container:
        infer(next(container.decode(video=0)).to_ndarray(format="rgb24"))
    frames = 0
    started = time.perf_counter()
    for source, video in enumerate(videos):
        with av.open(str(video)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                decoded = time.time()
                detections, timings = infer(frame.to_ndarray(format="rgb24"))
                result = FrameResult(source_id=f"naive-{name}-{source}", frame_index=index, pts=frame.time,
                                     captured_at=decoded, width=frame.width, height=frame.height, model=name,
                                     detections=detections, timings_ms=timings)
                sink.write_frames([result])
                frames += 1
    seconds = time.perf_counter() - started
    return {"frames": frames, "seconds": round(seconds, 2), "fps": round(frames / seconds, 2)}


def naive_loops(videos: list[Path], baseline: ModelSettings, settings: ModelSettings, work: Path,
                sink: RedisSink) -> dict[str, dict]:
    """The naive loop with our model in float32, with the pipeline's switches (when any), and with transformers."""
    results = {"naive": naive(videos, ours_infer(baseline), "ours", sink)}
    if settings != baseline:
        results["naive_with_switches"] = naive(videos, ours_infer(settings), "ours-switches", sink)
    results["naive_transformers"] = naive(videos, transformers_infer(baseline, work), "transformers", sink)
    return results


def ours_infer(settings: ModelSettings) -> Infer:
    """One frame through our Detector (the pipeline worker's model, processor and post-processing)."""
    detector = Detector(settings, "cuda" if torch.cuda.is_available() else "cpu")

    def infer(image: np.ndarray) -> tuple[list[Detection], dict]:
        [(detections, _)], timings = detector([torch.from_numpy(image).to(detector.device)], [image.shape[:2]])
        return detections, timings
    return infer


def model_ceiling(video: Path, settings: ModelSettings, args: argparse.Namespace) -> dict:
    """Our Detector alone on batches of the video's first frames, scaled to model size as the decoders do, with
    one worker's threads; the pipeline cannot beat `fps` (per worker x workers) on cores it has to itself."""
    torch.set_num_threads(args.threads)
    detector = Detector(settings, "cuda" if torch.cuda.is_available() else "cpu")
    with av.open(str(video)) as container:
        frames = []
        for frame in container.decode(video=0):
            height, width = get_resize_output_size(frame.height, frame.width, detector.processor.size)
            frames.append(torch.from_numpy(frame.to_ndarray(width=width, height=height, format="rgb24")))
            if len(frames) == args.batch_size:
                break
    sizes = [SIZE[::-1]] * len(frames)
    for _ in range(2):  # warm-up (and, with --compile, the compilation)
        detector([f.to(detector.device) for f in frames], sizes)
    repeats, started = 5, time.perf_counter()
    for _ in range(repeats):
        detector([f.to(detector.device) for f in frames], sizes)
    per_worker = repeats * len(frames) / (time.perf_counter() - started)
    return {"batch_size": len(frames), "threads": args.threads, "fps_per_worker": round(per_worker, 2),
            "fps": round(per_worker * args.workers, 2)}


def transformers_infer(settings: ModelSettings, work: Path) -> Infer:
    """One frame through the reference: transformers' processor, model and post-processing, same weights."""
    from transformers import ConditionalDetrForObjectDetection as HFDetection
    from transformers import ConditionalDetrImageProcessor as HFProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    load_model(settings).save_pretrained(work / "hf")
    load_processor(settings).save_pretrained(work / "hf")  # with the --short-side override
    model = HFDetection.from_pretrained(work / "hf").eval().to(device)
    processor = HFProcessor.from_pretrained(work / "hf")

    @torch.inference_mode()
    def infer(image: np.ndarray) -> tuple[list[Detection], dict]:
        inputs = processor(torch.from_numpy(image).permute(2, 0, 1), return_tensors="pt", device=device).to(device)
        [result] = processor.post_process_object_detection(model(**inputs), threshold=settings.threshold,
                                                           target_sizes=[image.shape[:2]])
        return [Detection(label=label, label_name=model.config.id2label.get(label, str(label)), score=score,
                          box=tuple(box)) for score, label, box in zip(
            result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist())], {}
    return infer


# Linux truncates a process name (/proc/PID/comm) to 15 characters; Ray names actor processes ray::<Class>.
ROLES = {"ray::DetectorWo": "workers", "ray::StreamDeco": "decoders", "raylet": "ray", "gcs_server": "ray",
         "redis-server": "redis"}


class CpuSampler:
    """CPU seconds (user + system) each role's processes use while it runs, from /proc every 0.05 s: the actors
    a job kills at its end are gone from /proc by then, so their last sample is what counts (0.05 s at most lost).
    Only the processes of a role are read at each sample, so the sampling itself stays cheap."""

    def __init__(self):
        self.roles: dict[int, str | None] = {}  # every pid seen: its role, None for the rest of the machine
        self.unsettled: set[int] = set()  # Ray worker processes take their actor's name after they start
        self.first: dict[int, float] = {}  # processes that existed at the start: their CPU seconds then
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._sample()
        self.first = dict(self.last)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        seconds: dict[str, float] = {}
        for pid, cpu in self.last.items():
            role = self.roles[pid]
            seconds[role] = seconds.get(role, 0.0) + cpu - self.first.get(pid, 0.0)
        return seconds

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()
        self._sample()

    def _sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            try:
                if pid not in self.roles or pid in self.unsettled:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                    self.roles[pid] = "driver" if pid == os.getpid() else ROLES.get(name)
                    if self.roles[pid] is None and name.startswith(("ray::", "python")):
                        self.unsettled.add(pid)
                    else:
                        self.unsettled.discard(pid)
                if self.roles[pid] is not None:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    fields = stat[stat.rindex(")") + 2:].split()  # utime and stime: the 14th and 15th fields
                    self.last[pid] = (int(fields[11]) + int(fields[12])) / tick
            except OSError:  # the process ended meanwhile
                continue


def live_cameras(videos: list[Path]) -> tuple[list[str], multiprocessing.Process]:
    """Each video looped in real time to its own UDP port as MPEG-TS, as a camera would send it, by a process of
    its own (one thread per camera), so that sending costs the driver nothing."""
    urls = []
    for _ in videos:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            urls.append(f"udp://127.0.0.1:{probe.getsockname()[1]}")
    sender = multiprocessing.get_context("spawn").Process(
        target=send_cameras, args=([str(v) for v in videos], urls), daemon=True)
    sender.start()
    return urls, sender


def send_cameras(videos: list[str], urls: list[str]) -> None:
    threads = [threading.Thread(target=send_camera, args=(video, url)) for video, url in zip(videos, urls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def send_camera(video: str, url: str) -> None:
    """Loop `video` to `url` (MPEG-TS over UDP): each packet is sent when its decoding timestamp comes due."""
    with av.open(f"{url}?pkt_size=1316", "w", format="mpegts") as output:
        target, offset, started = None, 0, time.monotonic()
        while True:
            with av.open(video) as source:
                stream = source.streams.video[0]
                target = target or output.add_stream_from_template(stream)
                end = 0
                for packet in source.demux(stream):
                    if packet.dts is None:  # the demuxer's final flush packet
                        continue
                    time.sleep(max(0.0, started + float((packet.dts + offset) * stream.time_base) - time.monotonic()))
                    end = max(end, packet.pts + packet.duration)
                    packet.pts, packet.dts, packet.stream = packet.pts + offset, packet.dts + offset, target
                    output.mux(packet)
                offset += end  # the next loop continues the timestamps


def stop_after(seconds: float, sink: RedisSink) -> threading.Timer:
    """Send the job the `stop` control message (as `cdetr` users do) after `seconds`."""
    message = {"json": Stop(op="stop").model_dump_json()}
    timer = threading.Timer(seconds, lambda: sink.client.xadd(sink.control_key, message))
    timer.start()
    return timer


def pipeline(urls: list[str], settings: ModelSettings, redis_url: str, args: argparse.Namespace) -> dict:
    config = PipelineConfig.model_validate({
        "sources": [{"id": f"pipe-{i}", "url": url} for i, url in enumerate(urls)],
        "batching": {"max_batch_size": args.batch_size, "batches_in_flight_per_worker": args.batches_in_flight},
        # Ray's CPU counts are reservations: the workers' threads take what the decoders do not use.
        "workers": {"count": args.workers, "num_cpus": args.threads, "num_gpus": args.num_gpus},
        "decoder": {"num_cpus": 0, "output": args.decoder_output},
        "model": settings.model_dump(), "redis": {"url": redis_url, "prefix": "bench"}})
    job = Job(config, RedisSink(connect(redis_url), "bench"))
    sampler = CpuSampler()
    started = time.perf_counter()
    if args.live:
        stop_after(args.live, job.sink)
    summary = job.process()
    seconds = time.perf_counter() - started
    cpu = sampler.stop()
    frames = sum(s["frames"] for s in summary.values())
    stats = job.metrics.sources.values()
    writing = max(s.last_at for s in stats) - min(s.first_at for s in stats)
    # Where the cores went, start-up included (workers: importing torch and loading the model, ~1.5 s each).
    cpu_ms_per_frame = {role: round(cpu[role] * 1e3 / frames, 2) for role in sorted(cpu)}
    return {"decoder_output": config.decoder_output,
            "batches_in_flight_per_worker": config.batches_in_flight_per_worker,
            "frames": frames, "seconds": round(seconds, 2), "fps": round(frames / seconds, 2),
            "steady_fps": round((frames - 1) / writing, 2),
            "cpu_ms_per_frame": cpu_ms_per_frame, "per_source": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each 30 fps source video")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per pipeline worker (the naive loops: threads x workers)")
    parser.add_argument("--workers", type=int, default=1, help="DetectorWorker actors (model replicas)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per pipeline worker")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="fp32",
                        help="the pipeline's model.precision")
    parser.add_argument("--runtime", choices=["torch", "onnxruntime", "openvino"], default="torch",
                        help="the pipeline's model.runtime")
    parser.add_argument("--compile", action="store_true", help="the pipeline's model.compile")
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled shapes-tiny)")
    parser.add_argument("--short-side", type=int, help="model input size: this short side, the long side at most "
                        "1333/800 times it (default: the checkpoint's processor config)")
    parser.add_argument("--decoder-output", choices=["rgb", "yuv420"],
                        help="the pipeline's decoder.output (default: yuv420 with --num-gpus, else rgb)")
    parser.add_argument("--batches-in-flight", type=int,
                        help="the pipeline's batching.batches_in_flight_per_worker (default: the pipeline's, 1 on "
                        "CPU workers, 2 on GPU workers)")
    parser.add_argument("--live", type=float, metavar="S", help="cameras instead of files: each source a real-time "
                        "UDP stream, processed for S seconds; reports latency and drops")
    parser.add_argument("--naive-sources", type=int, help="run the naive loops over the first K videos only (their "
                        "frames/s does not depend on the number of sources; default: all)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    random_weights = args.model is None and not (DEFAULT_MODEL_PATH / "config.json").is_file()
    model_path = (save_random_tiny_model(work / "random-tiny", {"shortest_edge": 256, "longest_edge": 448})
                  if random_weights else args.model or DEFAULT_MODEL_PATH)
    size = None if args.short_side is None else {"shortest_edge": args.short_side,
                                                 "longest_edge": args.short_side * 1333 // 800}
    baseline = ModelSettings(path=model_path, size=size)
    settings = ModelSettings(path=model_path, size=size, precision=args.precision, compile=args.compile,
                             runtime=args.runtime)
    # At most 8 distinct videos (encoding 50 takes minutes); further sources read them again under their own ids.
    distinct = [write_sample_video(work / f"src{i}.mp4", seconds=args.seconds, size=SIZE, seed=i, fps=SOURCE_FPS)
                for i in range(min(args.sources, 8))]
    videos = [distinct[i % len(distinct)] for i in range(args.sources)]
    port = 20000 + os.getpid() % 20000
    redis_process = start_redis_server(port, work / "redis")
    redis_url = f"redis://127.0.0.1:{port}/0"
    sender = None
    try:
        ray.init(num_cpus=os.cpu_count(), num_gpus=1 if torch.cuda.is_available() else 0,
                 include_dashboard=False, log_to_driver=False)
        ceiling = model_ceiling(videos[0], settings, args)
        # The sequential loops get the intra-op threads of all pipeline workers together: the same cores.
        torch.set_num_threads(min(args.threads * args.workers, os.cpu_count()))
        if args.live:
            naive_results = {}
            urls, sender = live_cameras(videos)
        else:
            sink = RedisSink(connect(redis_url), "bench")
            naive_results = naive_loops(videos[:args.naive_sources], baseline, settings, work, sink)
            urls = [str(v) for v in videos]
        pipeline_result = pipeline(urls, settings, redis_url, args)
    finally:
        if sender is not None:
            sender.terminate()
        ray.shutdown()
        redis_process.terminate()
    ratios = {}
    for name, result in naive_results.items():
        ratios[f"ratio_fps_pipeline_over_{name}"] = round(pipeline_result["fps"] / result["fps"], 2)
        ratios[f"ratio_steady_fps_pipeline_over_{name}"] = round(pipeline_result["steady_fps"] / result["fps"], 2)
    ratios["ratio_steady_fps_pipeline_over_model_ceiling"] = round(pipeline_result["steady_fps"] / ceiling["fps"], 2)
    print(json.dumps({
        "bench": "pipeline", "sources": args.sources, "source_size": list(SIZE), "seconds_per_source": args.seconds,
        "model": str(model_path), "random_weights": random_weights, "model_size": load_processor(settings).size,
        "precision": args.precision, "runtime": args.runtime, "compile": args.compile, "batch_size": args.batch_size,
        "naive_sources": 0 if args.live else len(videos[:args.naive_sources]), "live_seconds": args.live,
        "offered_fps": args.sources * SOURCE_FPS if args.live else None,
        "threads": args.threads, "workers": args.workers, "naive_threads": torch.get_num_threads(),
        **naive_results, "pipeline": pipeline_result, "model_ceiling": ceiling, **ratios,
        "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "av": av.__version__},
    }, indent=2))


if __name__ == "__main__":
    main()
