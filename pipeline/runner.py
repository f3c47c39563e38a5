"""The main job: StreamDecoder actors → Batcher → DetectorWorker actors → RedisSink, driven by one loop.

The loop runs in the driver and only ever holds small objects: chunk metadata and FrameResults. Frame arrays go
from a decoder's object store straight to a worker (the ObjectRefs are passed as top-level task arguments).
- Reads: one outstanding `read()` per source, for at most the per-source cap, and never more than
  `max_in_flight_per_source` frames between decoding and Redis: this is what bounds memory and propagates
  backpressure to the decoder's buffer. A live (`drop_oldest`) source is read only when none of its frames wait in
  the batcher, its fair share of a batch at a time: its backlog stays in the decoder, which keeps the newest frames.
- Placement: each source has a home node, one its workers run on; its decoder starts there and its chunks are
  batched per home node and sent only to that node's workers, so frames stay in one node's object store
  (pipeline/placement.py).
- Batches: at most `batches_in_flight_per_worker` per worker, so actor queues stay short.
- Writes: results are written per source strictly in frame order (explicit entry IDs need it), so a chunk that
  finishes early waits for the chunks before it.
- Control: `cdetr:control` is polled for add/remove/stop messages.
Ctrl-C (or a `stop` message) stops reading, waits for the batches already running, writes them in order and ends;
unfinished file sources then resume from the last written frame on the next run.
"""
import argparse
import math
import os
import re
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import ray
import redis
from pydantic import ValidationError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from pipeline.batcher import Batcher, Chunk
from pipeline.config import ConfigError, PipelineConfig, SourceConfig, load_config
from pipeline.decoder import ChunkInfo, StreamDecoder
from pipeline.metrics import PipelineMetrics
from pipeline.placement import Placement, node_of, worker_count
from pipeline.redis_server import resolve_redis_url
from pipeline.schema import AddSource, ControlMessage, Event, FrameResult, RemoveSource, Stop
from pipeline.sink import RedisSink, connect
from pipeline.worker import DetectorWorker, check_model_path, load_processor

_READ_WAIT_S = 0.5  # how long a decoder's read() waits for a first frame
_CONTROL_POLL_S = 0.5
_DROP_EVENT_INTERVAL_S = 1.0

Decoder = ray.remote(StreamDecoder)
Worker = ray.remote(DetectorWorker)


@dataclass
class SourceRun:
    config: SourceConfig
    decoder: ray.actor.ActorHandle
    home: str  # node id of the workers that serve it (pipeline/placement.py)
    read: list | None = None  # [info_ref, frames_ref] of the outstanding read()
    in_flight: int = 0  # frames read from the decoder but not yet written
    pending: deque[Chunk] = field(default_factory=deque)  # read but not yet written, in frame order
    decoded_all: bool = False
    status: str = "running"  # running, then eos | error | removed | stopped
    last_index: int | None = None
    next_index: int = 0  # after the last frame read from the decoder: where a recreated decoder resumes
    restarts: int = 0  # decoder actors recreated after dying
    decoder_start: int = 0  # the first frame index of the current decoder
    last_drop_event: float = 0.0
    progress: tqdm | None = None

    @property
    def active(self) -> bool:
        return not self.decoded_all or self.read is not None or bool(self.pending)


class Job:
    def __init__(self, config: PipelineConfig, sink: RedisSink, progress: bool = False):
        self.config = config
        self.sink = sink
        self.show_progress = progress
        self.metrics = PipelineMetrics()
        self.placement: Placement | None = None  # known once the workers run
        self.batchers: dict[str, Batcher] = {}  # per worker node: its sources' chunks, for its workers only
        self.size = load_processor(config.model).size
        self.sources: dict[str, SourceRun] = {}
        self.finished: dict[str, SourceRun] = {}
        self.workers: list[ray.actor.ActorHandle] = []
        self.batches: dict[ray.ObjectRef, tuple[int, list[Chunk]]] = {}  # in flight: worker index, chunks
        self.stopping = False
        self._control_cursor = "0-0"
        self._next_control_poll = 0.0

    # --- lifecycle ---

    def run(self) -> dict[str, dict]:
        """Process until every source has ended (or a stop); returns the per-source summary."""
        workers_ready = self._start_workers()
        self._control_cursor = self.sink.control_tail()
        try:
            # A model that fails to load fails here. Decoders wait for the workers' nodes, to start next to them.
            self._place(ray.get(workers_ready))
            for source in self.config.sources:
                self.add_source(source)
            while True:
                try:
                    if self._step():
                        break
                except KeyboardInterrupt:
                    if self.stopping:
                        raise  # a second Ctrl-C: give up on the in-flight batches
                    print("cdetr: stopping; writing the batches in flight (Ctrl-C again to abort)", file=sys.stderr)
                    self.stop()
        finally:
            self._shutdown()
        return self.summary()

    def stop(self) -> None:
        """Stop reading and end once the batches in flight are written. Call it from the loop's thread (Ctrl-C and
        the `stop` control message do); from elsewhere, send the control message."""
        self.stopping = True
        for run in self.sources.values():
            run.status = "stopped" if run.status == "running" else run.status
            run.decoder.stop.remote()

    def summary(self) -> dict[str, dict]:
        stats = self.metrics.summary()
        runs = {**self.finished, **self.sources}
        return {source_id: {"status": run.status, **stats.get(source_id, {"frames": 0, "fps": None, "p50_ms": None,
                                                                          "p95_ms": None, "dropped": 0})}
                for source_id, run in runs.items()}

    def add_source(self, source: SourceConfig) -> None:
        if source.id in self.sources:
            self.sink.event(Event(type="error", source_id=source.id, message="a source with this id is running"))
            return
        state = self.sink.state(source.id)
        if state.finished:
            print(f"cdetr: {source.id}: already complete in Redis ({self.sink.frames_key(source.id)} ends with eos);"
                  " skipped", file=sys.stderr)
            return
        start = 0 if state.last_frame_index is None else state.last_frame_index + 1
        strategy = self.placement.assign(source.id)
        self.sources[source.id] = SourceRun(source, self._decoder(source, start, strategy), strategy.node_id,
                                            last_index=state.last_frame_index, next_index=start, decoder_start=start)

    def _decoder(self, source: SourceConfig, start: int,
                 strategy: NodeAffinitySchedulingStrategy) -> ray.actor.ActorHandle:
        cfg = self.config.decoder.model_copy(update={"output": self.config.decoder_output})
        return Decoder.options(num_cpus=cfg.num_cpus, resources=cfg.resources,
                               scheduling_strategy=strategy).remote(source, self.size, cfg, start)

    def remove_source(self, source_id: str) -> None:
        run = self.sources.get(source_id)
        if run is None:
            self.sink.event(Event(type="error", source_id=source_id, message="no running source with this id"))
            return
        run.status = "removed"
        run.decoder.stop.remote()

    def _start_workers(self) -> list[ray.ObjectRef]:
        """Start the workers; returns refs to their node ids, which resolve once each has loaded the model."""
        check_model_path(self.config.model)
        w = self.config.workers
        actor = Worker.options(num_cpus=w.num_cpus, num_gpus=w.num_gpus, resources=w.resources,
                               max_restarts=w.max_restarts, max_task_retries=w.max_task_retries)
        count = worker_count(len(self.config.sources), w.streams_per_worker, w.count)
        self.workers = [actor.remote(self.config.model, max(1, int(w.num_cpus)), self.config.batching.max_batch_size)
                        for _ in range(count)]
        return [node_of(worker) for worker in self.workers]

    def _place(self, worker_nodes: list[str]) -> None:
        self.placement = Placement(worker_nodes)
        batching = self.config.batching
        self.batchers = {node: Batcher(batching.max_batch_size, batching.timeout_ms / 1e3, batching.source_cap)
                         for node in self.placement.nodes}

    def _shutdown(self) -> None:
        for run in self.sources.values():
            self._release(run)
        for worker in self.workers:
            ray.kill(worker)

    @staticmethod
    def _release(run: SourceRun) -> None:
        if run.progress is not None:
            run.progress.close()
        ray.kill(run.decoder)

    # --- the loop ---

    def _step(self) -> bool:
        """One turn of the loop; True when the job is over."""
        if not self.stopping:
            self._issue_reads()
        self._wait(self._timeout())
        if not self.stopping:
            self._dispatch()
            self._poll_control()
        if self.stopping:
            return not self.batches
        return not self.config.keep_running and not self.sources and not self.batches

    def _issue_reads(self) -> None:
        cap, limit = self.config.batching.source_cap, self.config.batching.max_in_flight_per_source
        live_sources = Counter(run.home for run in self.sources.values() if run.config.backpressure == "drop_oldest")
        for run in self.sources.values():
            if run.read is not None or run.decoded_all or run.in_flight >= limit:
                continue
            n = min(cap, limit - run.in_flight)
            if run.config.backpressure == "drop_oldest":
                # A live source's frames should wait in its decoder, where drop_oldest keeps only the newest; read
                # here they would age in the batcher (measured: p50 latency 5.6 s with 4 cameras over capacity,
                # 1.8 s with this rule; bench/RESULTS.md 5b). So take its next frames only once the last ones have left the batcher, and
                # only its fair share of a batch.
                if self.batchers[run.home].holds(run.config.id):
                    continue
                n = min(n, math.ceil(self.config.batching.max_batch_size / live_sources[run.home]))
            run.read = run.decoder.read.options(num_returns=2).remote(n, _READ_WAIT_S)

    def _timeout(self) -> float:
        """Until the next batch is due; while every worker is busy, a finishing batch is what to wait for."""
        deadlines = [batcher.deadline() for node, batcher in self.batchers.items()
                     if self._free_worker(node) is not None]
        deadlines = [d for d in deadlines if d is not None]
        if not deadlines:
            return _READ_WAIT_S
        return min(_READ_WAIT_S, max(0.0, min(deadlines) - time.time()))

    def _wait(self, timeout: float) -> None:
        reads = {run.read[0]: run for run in self.sources.values() if run.read is not None}
        refs = [*reads, *self.batches]
        if not refs:
            time.sleep(timeout)
            return
        ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=False)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            if ref in reads:
                self._on_read(reads[ref])
            else:
                self._on_batch(ref)

    def _on_read(self, run: SourceRun) -> None:
        info_ref, frames_ref = run.read
        run.read = None
        try:
            info: ChunkInfo = ray.get(info_ref)
        except ray.exceptions.RayActorError as e:
            self._restart_decoder(run, e)
            return
        except ray.exceptions.RayError as e:
            self._fail(run, f"decoder failed: {e}")
            return
        for event in info.events:
            self._on_decoder_event(run, event)
        self._on_drops(run, info.dropped)
        if info.frames:
            run.next_index = info.frames[-1].frame_index + 1
            chunk = Chunk(run.config.id, len(info.frames), info, frames_ref, time.time())
            self.batchers[run.home].add(chunk)
            run.pending.append(chunk)
            run.in_flight += chunk.size
            self.metrics.queue_depth(run.config.id, run.in_flight)
        if info.finished:
            run.decoded_all = True
            self._finish_if_done(run)

    def _restart_decoder(self, run: SourceRun, error: Exception, what: str = "decoder died",
                         counted: bool = True) -> None:
        """A dead decoder is recreated at `next_index`: the frames before it were read and are on their way to
        Redis, what the dead one had buffered is decoded again, so every frame is written once, with no gap."""
        if counted and run.restarts >= self.config.decoder.max_restarts:
            self._fail(run, f"{what} {run.restarts + 1} times (decoder.max_restarts = "
                            f"{self.config.decoder.max_restarts}); last: {type(error).__name__}: {error}")
            return
        if counted:
            run.restarts += 1
        run.decoder = self._decoder(run.config, run.next_index, self.placement.strategy(run.config.id))
        run.decoder_start = run.next_index
        self.sink.event(Event(type="recovered", source_id=run.config.id, message=f"{what}; decoder recreated",
                              details={"restarts": run.restarts, "start_index": run.next_index}))

    def _redecode(self, run: SourceRun, chunk: Chunk, error: Exception) -> None:
        """A batch failed for good (its frames were on a node that is gone, or its worker gave up): the source's
        frames from `chunk` on are decoded again by a new decoder. Its later chunks are dropped (batches in
        flight with them are ignored), so every frame is still written once, in order."""
        if run.status != "running":  # removed or stopping: nothing more is decoded
            self._fail(run, f"inference failed: {error}")
            return
        pending = list(run.pending)
        kept = pending[:next(i for i, c in enumerate(pending) if c is chunk)]
        for dropped in pending[len(kept):]:
            self.batchers[run.home].remove(dropped)
        run.pending = deque(kept)
        run.in_flight = sum(c.size for c in kept)
        run.read, run.decoded_all = None, False
        run.next_index = chunk.info.frames[0].frame_index
        ray.kill(run.decoder)
        # One lost node fails every batch in flight with its frames: only a chunk of the current decoder counts
        # against max_restarts (earlier ones are fallout of a failure already counted, and finitely many).
        self._restart_decoder(run, error, "inference failed", counted=run.next_index >= run.decoder_start)

    def _on_decoder_event(self, run: SourceRun, event: Event) -> None:
        self.sink.event(event)
        if event.type == "error":
            run.status = "error"
            print(f"cdetr: {run.config.id}: {event.message}", file=sys.stderr)
        elif event.type == "started" and self.show_progress and not run.config.live and run.progress is None:
            run.progress = tqdm(total=_expected_frames(run.config, event.details), desc=run.config.id,
                                unit="frame")

    def _on_drops(self, run: SourceRun, total: int) -> None:
        new = self.metrics.dropped(run.config.id, total)
        now = time.time()
        if new and now - run.last_drop_event >= _DROP_EVENT_INTERVAL_S:
            run.last_drop_event = now
            self.sink.event(Event(type="dropped", source_id=run.config.id, details={"total": total}))

    def _dispatch(self) -> None:
        for node, batcher in self.batchers.items():
            while (worker := self._free_worker(node)) is not None:
                batch = batcher.next_batch(time.time())
                if batch is None:
                    break
                ref = self.workers[worker].infer.remote([c.info for c in batch], *[c.frames for c in batch])
                self.batches[ref] = (worker, batch)

    def _free_worker(self, node: str) -> int | None:
        """The least busy of the node's workers, unless all of them have their batches in flight."""
        load = dict.fromkeys(self.placement.workers_on(node), 0)
        for worker, _ in self.batches.values():
            if worker in load:
                load[worker] += 1
        best = min(load, key=load.__getitem__)
        return best if load[best] < self.config.batches_in_flight_per_worker else None

    def _on_batch(self, ref: ray.ObjectRef) -> None:
        _, batch = self.batches.pop(ref)
        try:
            per_chunk: list[list[FrameResult]] = ray.get(ref)
        except ray.exceptions.RayError as e:
            for chunk in batch:
                run = self.sources.get(chunk.source_id)
                if run is not None and any(c is chunk for c in run.pending):  # not dropped by an earlier failure
                    self._redecode(run, chunk, e)
            return
        for chunk, results in zip(batch, per_chunk):
            chunk.results = results
        self._write_ready({chunk.source_id for chunk in batch})

    def _write_ready(self, source_ids: set[str]) -> None:
        """Write every source's completed chunks that have no unfinished chunk before them, in one round trip."""
        runs = [self.sources[i] for i in source_ids if i in self.sources]
        batches = []
        for run in runs:
            while run.pending and run.pending[0].results is not None:
                batches.append((run, run.pending.popleft().results))
        self.sink.write_frames([r for _, results in batches for r in results])
        self.metrics.written([r for _, results in batches for r in results])
        for run, results in batches:
            run.in_flight -= len(results)
            run.last_index = results[-1].frame_index
            self.metrics.queue_depth(run.config.id, run.in_flight)
            if run.progress is not None:
                run.progress.update(len(results))
        for run in runs:
            self._finish_if_done(run)

    def _finish_if_done(self, run: SourceRun) -> None:
        if run.active:
            return
        if run.status in ("running", "removed"):
            frames = self.metrics.sources.get(run.config.id)
            self.sink.write_eos(run.config.id, run.last_index, frames.frames if frames else 0)
            run.status = "eos" if run.status == "running" else run.status
        self.finished[run.config.id] = self.sources.pop(run.config.id)
        self.placement.release(run.config.id)
        self._release(run)  # a long-running job must not accumulate idle decoder actors

    def _fail(self, run: SourceRun, message: str) -> None:
        self.sink.event(Event(type="error", source_id=run.config.id, message=message))
        run.status = "error"
        run.decoder.stop.remote()
        for chunk in run.pending:  # drop what this source still has in the batcher
            self.batchers[run.home].remove(chunk)
        run.pending.clear()
        run.read, run.decoded_all, run.in_flight = None, True, 0
        self._finish_if_done(run)

    # --- control stream ---

    def _poll_control(self) -> None:
        now = time.monotonic()
        if now < self._next_control_poll:
            return
        self._next_control_poll = now + _CONTROL_POLL_S
        for entry_id, fields in self.sink.read_control(self._control_cursor):
            self._control_cursor = entry_id
            self._on_control(fields.get("json", ""))

    def _on_control(self, raw: str) -> None:
        try:
            message = ControlMessage.validate_json(raw)
        except ValidationError as e:
            self.sink.event(Event(type="error", message=f"invalid control message: {e.errors()[0]['msg']}",
                                  details={"raw": raw[:1000]}))
            return
        if isinstance(message, AddSource):
            self.add_source(message.source)
        elif isinstance(message, RemoveSource):
            self.remove_source(message.source_id)
        elif isinstance(message, Stop):
            self.stop()


def _expected_frames(source: SourceConfig, details: dict) -> int | None:
    """Frames the progress bar expects, from the container's header (None when it does not say)."""
    if source.fps is not None and details.get("duration_s"):
        return int(details["duration_s"] * source.fps)
    frames = details.get("frames")
    return None if frames is None else max(0, frames - details.get("start_index", 0))


def run_job(config: PipelineConfig, progress: bool = False) -> dict[str, dict]:
    """Connect to (or start) Redis and Ray, run the job, return the per-source summary."""
    sink = RedisSink.from_config(connect(resolve_redis_url(config.redis.url)), config.redis)
    if not ray.is_initialized():
        if config.ray_address is None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster needs no tokens
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False)
    return Job(config, sink, progress).run()


# --- `cdetr run` ---

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", metavar="SOURCE", help="file path or http(s)/rtsp/udp/tcp URL")
    parser.add_argument("--source-id", action="append", default=[], metavar="ID",
                        help="stream id per SOURCE, in order (default: derived from the file name)")
    parser.add_argument("--model", type=Path, help="checkpoint dir or .pth (default: the bundled shapes-tiny)")
    parser.add_argument("--panoptic", action="store_true", default=None, help="also run the panoptic head")
    parser.add_argument("--instance-masks", action="store_true", default=None,
                        help="also attach a COCO RLE mask to each detection (segmentation checkpoint)")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"],
                        help="run the model under autocast to this dtype (faster; check accuracy with cdetr eval)")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the detector as one graph (one CUDA graph on a GPU; batches padded to "
                        "the batch size: each frame size compiles once, at its first batch)")
    parser.add_argument("--redis-url", help="redis:// or rediss:// URL (default: local, started if needed)")
    parser.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--config", type=Path, help="YAML/JSON config file (see pipeline/config.py)")
    parser.add_argument("--fps", type=float, help="sample every source at most at this rate")
    parser.add_argument("--batch-size", type=int, help="frames per model call")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, overrides=_overrides(args))
        check_model_path(config.model)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"cdetr run: {e}", file=sys.stderr)
        return 2
    if not config.sources and not config.keep_running:
        print("cdetr run: no sources (give SOURCE arguments or `sources` in --config)", file=sys.stderr)
        return 2
    try:
        summary = run_job(config, progress=True)
    except (ConnectionError, redis.exceptions.NoPermissionError) as e:
        # Redis unreachable (past redis.retry_timeout_s), refusing our password, or an ACL without our keys: the
        # messages name the problem and never the password.
        print(f"cdetr run: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0 if all(s["status"] in ("eos", "removed") for s in summary.values()) else 1


def _overrides(args: argparse.Namespace) -> dict:
    if args.source_id and len(args.source_id) != len(args.sources):
        raise ConfigError(f"{len(args.source_id)} --source-id for {len(args.sources)} sources")
    ids = args.source_id or _default_ids(args.sources)
    overrides: dict = {}
    if args.sources:
        overrides["sources"] = [{"id": i, "url": url, **({"fps": args.fps} if args.fps else {})}
                                for i, url in zip(ids, args.sources)]
    model = {k: v for k, v in (("path", args.model), ("panoptic", args.panoptic),
                               ("instance_masks", args.instance_masks), ("autocast", args.autocast),
                               ("compile", args.compile)) if v is not None}
    if model:
        overrides["model"] = model
    if args.redis_url:
        overrides["redis"] = {"url": args.redis_url}
    if args.ray_address:
        overrides["ray_address"] = args.ray_address
    if args.batch_size is not None:
        overrides["batching"] = {"max_batch_size": args.batch_size}
    return overrides


def _default_ids(urls: list[str]) -> list[str]:
    """`video.mp4` → `video`; sanitized to the id alphabet; numbered when two would collide."""
    ids = []
    for i, url in enumerate(urls):
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(url.rstrip("/")).stem)[:60] or f"source{i}"
        ids.append(stem if stem not in ids else f"{stem}-{i}")
    return ids


def print_summary(summary: dict[str, dict]) -> None:
    print(f"{'source':<24} {'status':<8} {'frames':>7} {'fps':>7} {'p50 ms':>8} {'p95 ms':>8} {'dropped':>8}")
    for source_id, s in summary.items():
        cells = [s["frames"], s["fps"], s["p50_ms"], s["p95_ms"], s["dropped"]]
        print(f"{source_id:<24} {s['status']:<8} " + " ".join(
            f"{'-' if v is None else v:>{w}}" for v, w in zip(cells, (7, 7, 8, 8, 8))))
