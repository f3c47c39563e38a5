"""The main job: StreamDecoder actors → Batcher → DetectorWorker actors → RedisSink, driven by one loop.

The loop runs in the driver and only ever holds small objects: chunk metadata and FrameResults. Frame arrays go
from a decoder's object store straight to a worker (the ObjectRefs are passed as top-level task arguments).
Each source's state, and the invariants that write every frame once and in order, are in
pipeline/source_state.py; the decisions of what to read and which worker gets a batch in pipeline/scheduling.py.
- Reads: one outstanding `read()` per source, sized so that memory stays bounded and backpressure reaches the
  decoders; a live (`drop_oldest`) source's backlog stays in its decoder, which keeps the newest frames.
- Placement: each source has a home node, one its workers run on; its decoder starts there and its chunks are
  batched per home node and sent only to that node's workers, so frames stay in one node's object store
  (pipeline/placement.py).
- Batches: at most `batches_in_flight_per_worker` per worker, so actor queues stay short.
- Writes: results are written per source strictly in frame order (explicit entry IDs need it), so a chunk that
  finishes early waits for the chunks before it.
- Failures: a dead decoder is recreated where the frames read so far end; a batch that fails for good makes its
  source decode again from that batch's frames (`SourceState.rewind`).
- Redis losing writes (restarted without persistence, an AOF that lost its last second, a failover, a stream
  deleted): each write appends only where the stream still ends (pipeline/sink.py), so the loss shows at the
  source's next write, and `SourceState.lost` repairs it: a file decodes the lost frames again, a live source goes
  on after them; a `lost` event names them either way.
- Tracking: a tracked source's results go through its tracker in frame order as they are taken for writing, and
  the tracker's snapshot is written with them in one Lua call; where the job resumes a source, the tracker is
  restored from it (pipeline/source_tracking.py), so track IDs, counts and events are written exactly once too.
- Control: `cdetr:control` is polled for add/remove/stop messages.
Ctrl-C (or a `stop` message) stops reading, waits for the batches already running, writes them in order and ends;
unfinished file sources then resume from the last written frame on the next run.
"""
import logging
import os
import time
from collections import Counter

import ray
from pydantic import ValidationError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from pipeline.batcher import Batcher, Chunk
from pipeline.config import PipelineConfig, SourceConfig
from pipeline.decoder import StreamDecoder
from pipeline.frames import ChunkInfo
from pipeline.metrics import PipelineMetrics
from pipeline.placement import Placement, node_of, worker_count
from pipeline.redis_server import resolve_redis_url
from pipeline.scheduling import free_worker, read_size
from pipeline.schema import AddSource, ControlMessage, Event, FrameResult, RemoveSource, Stop
from pipeline.sink import RedisSink, connect
from pipeline.source_state import SourceState, resume_index
from pipeline.source_tracking import StateError, TrackedSource, stuff_labels
from pipeline.sources import redact
from pipeline.wire import JSON_FIELD
from pipeline.worker import DetectorWorker, check_model_path, load_processor

logger = logging.getLogger(__name__)

_READ_WAIT_S = 0.5  # how long a decoder's read() waits for a first frame
_CONTROL_POLL_S = 0.5
_DROP_EVENT_INTERVAL_S = 1.0

Decoder = ray.remote(StreamDecoder)
Worker = ray.remote(DetectorWorker)


class Job:
    def __init__(self, config: PipelineConfig, sink: RedisSink, progress: bool = False):
        self.config = config
        self.sink = sink
        self.show_progress = progress
        self.metrics = PipelineMetrics()
        self.placement: Placement | None = None  # known once the workers run
        self.batchers: dict[str, Batcher] = {}  # per worker node: its sources' chunks, for its workers only
        self.size = load_processor(config.model).size
        self.stuff_labels = stuff_labels(config.model.path)
        self.sources: dict[str, SourceState] = {}
        self.finished: dict[str, SourceState] = {}
        self.workers: list[ray.actor.ActorHandle] = []
        self.batches: dict[ray.ObjectRef, tuple[int, list[Chunk]]] = {}  # in flight: worker index, chunks
        self.stopping = False
        self._control_cursor = "0-0"
        self._next_control_poll = 0.0

    # --- lifecycle ---

    def process(self) -> dict[str, dict]:
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
                    logger.info("stopping; writing the batches in flight (Ctrl-C again to abort)")
                    self.stop()
        finally:
            self._shutdown()
        return self.summary()

    def stop(self) -> None:
        """Stop reading and end once the batches in flight are written. Call it from the loop's thread (Ctrl-C and
        the `stop` control message do); from elsewhere, send the control message."""
        self.stopping = True
        for state in self.sources.values():
            state.stop()
            state.decoder.stop.remote()

    def summary(self) -> dict[str, dict]:
        stats = self.metrics.summary()
        states = {**self.finished, **self.sources}
        empty = {"frames": 0, "fps": None, "p50_ms": None, "p95_ms": None, "dropped": 0, "lost": 0}
        return {source_id: {"status": "auth_failed" if state.auth_failed else state.status,
                            **stats.get(source_id, empty)}
                for source_id, state in states.items()}

    def add_source(self, source: SourceConfig) -> None:
        if source.id in self.sources:
            self.sink.event(Event(type="error", source_id=source.id, message="a source with this id is running"))
            return
        if (source.lines or source.zones) and not self.config.tracks(source):
            self.sink.event(Event(type="error", source_id=source.id,
                                  message="lines and zones need tracking, which is off for this source"))
            return
        stored = self.sink.state(source.id)
        if stored.finished:
            logger.info("%s: already complete in Redis (%s ends with eos); skipped", source.id,
                        self.sink.frames_key(source.id))
            return
        strategy = self.placement.assign(source.id)
        decoder = self._decoder(source, resume_index(stored.last_frame_index), strategy)
        tracking = TrackedSource(self.config.tracking, source, self.config.model.threshold, self.stuff_labels) \
            if self.config.tracks(source) else None
        self.sources[source.id] = SourceState(source, decoder, strategy.node_id, last_written=stored.last_frame_index,
                                              tracking=tracking)

    def _decoder(self, source: SourceConfig, start: int,
                 strategy: NodeAffinitySchedulingStrategy) -> ray.actor.ActorHandle:
        cfg = self.config.decoder.model_copy(update={"output": self.config.decoder_output})
        return Decoder.options(num_cpus=cfg.num_cpus, resources=cfg.resources,
                               scheduling_strategy=strategy).remote(source, self.size, cfg, start)

    def remove_source(self, source_id: str) -> None:
        state = self.sources.get(source_id)
        if state is None:
            self.sink.event(Event(type="error", source_id=source_id, message="no running source with this id"))
            return
        state.remove()
        state.decoder.stop.remote()

    def _start_workers(self) -> list[ray.ObjectRef]:
        """Start the workers; returns refs to their node ids, which resolve once each has loaded the model."""
        check_model_path(self.config.model)
        w = self.config.workers
        actor = Worker.options(num_cpus=w.num_cpus, num_gpus=w.num_gpus, resources=w.resources,
                               max_restarts=w.max_restarts, max_task_retries=w.max_task_retries)
        count = worker_count(len(self.config.sources), w.streams_per_worker, w.count)
        self.workers = [actor.remote(self.config.model, max(1, int(w.num_cpus)), self.config.batching.max_batch_size,
                                     candidate_threshold(self.config))
                        for _ in range(count)]
        return [node_of(worker) for worker in self.workers]

    def _place(self, worker_nodes: list[str]) -> None:
        self.placement = Placement(worker_nodes)
        batching = self.config.batching
        self.batchers = {node: Batcher(batching.max_batch_size, batching.timeout_ms / 1e3, batching.source_cap)
                         for node in self.placement.nodes}

    def _shutdown(self) -> None:
        for state in self.sources.values():
            self._release(state)
        for worker in self.workers:
            ray.kill(worker)

    @staticmethod
    def _release(state: SourceState) -> None:
        if state.progress is not None:
            state.progress.close()
        ray.kill(state.decoder)

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
        """A read of every source that may read now, of the size `read_size` gives."""
        live = {i for i, state in self.sources.items() if state.config.backpressure == "drop_oldest"}
        live_on_node = Counter(self.sources[i].home for i in live)
        for source_id, state in self.sources.items():
            if not state.can_read:
                continue
            n = read_size(state.in_flight, self.config.batching, live_on_node[state.home] if source_id in live else 0,
                          source_id in live and self.batchers[state.home].holds(source_id))
            if n:
                state.reading(state.decoder.read.options(num_returns=2).remote(n, _READ_WAIT_S))

    def _timeout(self) -> float:
        """Until the next batch is due; while every worker is busy, a finishing batch is what to wait for."""
        deadlines = [batcher.deadline() for node, batcher in self.batchers.items()
                     if self._free_worker(node) is not None]
        deadlines = [d for d in deadlines if d is not None]
        if not deadlines:
            return _READ_WAIT_S
        return min(_READ_WAIT_S, max(0.0, min(deadlines) - time.time()))

    def _wait(self, timeout: float) -> None:
        reads = {state.read[0]: state for state in self.sources.values() if state.read is not None}
        refs = [*reads, *self.batches]
        if not refs:
            time.sleep(timeout)
            return
        ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=False)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        # Reads before batches (ray.wait keeps the order of `refs`): a failed batch may replace a source's decoder,
        # and with it forget its outstanding read.
        for ref in ready:
            if ref in reads:
                self._on_read(reads[ref])
            else:
                self._on_batch(ref)

    def _on_read(self, state: SourceState) -> None:
        info_ref, frames_ref = state.read
        try:
            info: ChunkInfo = ray.get(info_ref)
        except ray.exceptions.RayActorError as e:
            self._restart_decoder(state, e)
            return
        except ray.exceptions.RayError as e:
            self._fail(state, f"decoder failed: {e}")
            return
        for event in info.events:
            self._on_decoder_event(state, event)
        self._on_drops(state, info.dropped)
        chunk = Chunk(state.config.id, len(info.frames), info, frames_ref, time.time()) if info.frames else None
        state.accept(chunk, info.finished)
        if chunk is not None:
            self.batchers[state.home].add(chunk)
            self.metrics.queue_depth(state.config.id, state.in_flight)
        if state.finished:
            self._end(state)

    def _restart_decoder(self, state: SourceState, error: Exception, what: str = "decoder died",
                         counted: bool = True) -> None:
        """A dead decoder is recreated at `next_index`: the frames before it were read and are on their way to
        Redis, what the dead one had buffered is decoded again, so every frame is written once, with no gap."""
        limit = self.config.decoder.max_restarts
        if counted and state.restarts >= limit:
            self._fail(state, f"{what} {state.restarts + 1} times (decoder.max_restarts = {limit}); last: "
                              f"{type(error).__name__}: {error}")
            return
        state.restart(self._decoder(state.config, state.next_index, self.placement.strategy(state.config.id)),
                      counted)
        self.sink.event(Event(type="recovered", source_id=state.config.id, message=f"{what}; decoder recreated",
                              details={"restarts": state.restarts, "start_index": state.next_index}))

    def _redecode(self, state: SourceState, chunk: Chunk, error: Exception) -> None:
        """A batch failed for good (its frames were on a node that is gone, or its worker gave up): the source's
        frames from `chunk` on are decoded again by a new decoder. Its later chunks are dropped (batches in
        flight with them are ignored), so every frame is still written once, in order."""
        if state.status != "running":  # removed or stopping: nothing more is decoded
            self._fail(state, f"inference failed: {error}")
            return
        # One lost node fails every batch in flight with its frames: only a chunk of the current decoder counts
        # against max_restarts (earlier ones are fallout of a failure already counted, and finitely many).
        counted = state.from_current_decoder(chunk)
        for dropped in state.rewind(chunk):
            self.batchers[state.home].remove(dropped)
        ray.kill(state.decoder)
        self._restart_decoder(state, error, "inference failed", counted)

    def _on_decoder_event(self, state: SourceState, event: Event) -> None:
        self.sink.event(event)
        if event.type in ("auth_failed", "started", "recovered"):
            state.auth_failed = event.type == "auth_failed"
        if event.type in ("error", "auth_failed"):
            logger.error("%s: %s", state.config.id, event.message)
        if event.type == "error":
            state.decoder_failed()
        elif event.type == "started" and self.show_progress and not state.config.live and state.progress is None:
            state.progress = tqdm(total=_expected_frames(state.config, event.details), desc=state.config.id,
                                  unit="frame")

    def _on_drops(self, state: SourceState, total: int) -> None:
        new = self.metrics.dropped(state.config.id, total)
        now = time.time()
        if new and now - state.last_drop_event >= _DROP_EVENT_INTERVAL_S:
            state.last_drop_event = now
            self.sink.event(Event(type="dropped", source_id=state.config.id, details={"total": total}))

    def _dispatch(self) -> None:
        for node, batcher in self.batchers.items():
            while (worker := self._free_worker(node)) is not None:
                batch = batcher.next_batch(time.time())
                if batch is None:
                    break
                ref = self.workers[worker].infer.remote([c.info for c in batch], *[c.frames for c in batch])
                self.batches[ref] = (worker, batch)

    def _free_worker(self, node: str) -> int | None:
        return free_worker(self.placement.workers_on(node), (worker for worker, _ in self.batches.values()),
                           self.config.batches_in_flight_per_worker)

    def _on_batch(self, ref: ray.ObjectRef) -> None:
        _, batch = self.batches.pop(ref)
        try:
            per_chunk: list[list[FrameResult]] = ray.get(ref)
        except ray.exceptions.RayError as e:
            for chunk in batch:
                state = self.sources.get(chunk.source_id)
                if state is not None and state.holds(chunk):  # not dropped by an earlier failure
                    self._redecode(state, chunk, e)
            return
        for chunk, results in zip(batch, per_chunk):
            state = self.sources.get(chunk.source_id)
            if state is not None:
                state.inferred(chunk, results)
        self._write_ready({chunk.source_id for chunk in batch})

    def _write_ready(self, source_ids: set[str]) -> None:
        """Write every source's completed chunks that have no unfinished chunk before them, in one round trip."""
        states = [self.sources[i] for i in source_ids if i in self.sources]
        ready = {state.config.id: state.take_ready() for state in states}
        while ready := {i: results for i, results in ready.items() if results}:
            tracked, snapshots = {}, {}
            for i, results in ready.items():
                try:
                    tracked[i], snapshot = self._track(self.sources[i], results)
                except StateError as e:  # this source stops; the others go on
                    self._fail(self.sources[i], f"{e}: {self.sink.state_key(i)}")
                    continue
                if snapshot is not None:
                    snapshots[i] = snapshot
            lost = self.sink.write_frames([r for results in tracked.values() for r in results],
                                          after={i: self.sources[i].last_written for i in tracked}, snapshots=snapshots)
            for i, results in tracked.items():
                if i not in lost:
                    self._written(self.sources[i], results)
            for i, stored in lost.items():
                self._on_lost(self.sources[i], stored.last_frame_index)
            # A live source's results go again, after where its stream ends now (tracked again from the state Redis
            # kept with it); a file's are decoded again.
            ready = {i: ready[i] for i in lost if self.sources[i].config.live}
        for state in states:
            if state.finished and state.config.id in self.sources:  # not ended above (`_fail`)
                self._end(state)

    def _track(self, state: SourceState, results: list[FrameResult]) -> tuple[list[FrameResult], dict | None]:
        """The results to write after `state.last_written`, and the tracker snapshot to write with them (None:
        tracking is off for the source; the workers' low-score candidates are then dropped here)."""
        if state.tracking is not None:
            return state.tracking.track(results, state.last_written,
                                        lambda: self.sink.tracker_state(state.config.id))
        threshold = self.config.model.threshold
        if candidate_threshold(self.config) >= threshold:
            return results, None
        return [r.model_copy(update={"detections": [d for d in r.detections if d.score >= threshold]})
                for r in results], None

    def _written(self, state: SourceState, results: list[FrameResult]) -> None:
        state.written(results)
        self.metrics.written(results)
        self.metrics.queue_depth(state.config.id, state.in_flight)
        if state.progress is not None:
            state.progress.update(len(results))

    def _on_lost(self, state: SourceState, tail: int | None) -> None:
        """Redis lost the source's frames after `tail` (SourceState.lost): a file decodes them again, a live source
        cannot; a `lost` event says which frames either way."""
        loss = state.lost(tail)
        for chunk in loss.dropped:
            self.batchers[state.home].remove(chunk)
        if loss.decode_again:
            ray.kill(state.decoder)
            state.restart(self._decoder(state.config, state.next_index, self.placement.strategy(state.config.id)),
                          counted=False)
        frames = self.metrics.lost(state.config.id, tail, for_good=not loss.decode_again)
        if state.progress is not None:
            state.progress.update(-frames)
        then = ("decoding them again" if loss.decode_again else "a live source cannot send them again"
                if state.config.live else "its stream ends there without eos, and a later run resumes it")
        message = (f"Redis lost frames {loss.first_frame_index}-{loss.last_frame_index} (restarted without "
                   f"persistence, failed over, or the stream was deleted); {then}")
        logger.warning("%s: %s", state.config.id, message)
        self.sink.event(Event(type="lost", source_id=state.config.id, message=message, details={
            "first_frame_index": loss.first_frame_index, "last_frame_index": loss.last_frame_index,
            "frames": frames, "rewritten": loss.decode_again}))

    def _end(self, state: SourceState) -> None:
        """A finished source: its eos (if it gets one), and its decoder and home released. When the eos write finds
        frames lost, a file source decodes them again instead and ends later (`_on_lost`)."""
        while state.gets_eos:
            frames = self.metrics.sources.get(state.config.id)
            stored = self.sink.write_eos(state.config.id, state.last_written, frames.frames if frames else 0)
            if stored is None:
                break
            self._on_lost(state, stored.last_frame_index)
            if not state.finished:
                return
        state.end()
        self.finished[state.config.id] = self.sources.pop(state.config.id)
        self.placement.release(state.config.id)
        self._release(state)  # a long-running job must not accumulate idle decoder actors

    def _fail(self, state: SourceState, message: str) -> None:
        self.sink.event(Event(type="error", source_id=state.config.id, message=message))
        for chunk in state.fail():  # drop what this source still has in the batcher
            self.batchers[state.home].remove(chunk)
        state.decoder.stop.remote()
        self._end(state)

    # --- control stream ---

    def _poll_control(self) -> None:
        now = time.monotonic()
        if now < self._next_control_poll:
            return
        self._next_control_poll = now + _CONTROL_POLL_S
        for entry_id, fields in self.sink.read_control(self._control_cursor):
            self._control_cursor = entry_id
            self._on_control(fields.get(JSON_FIELD, ""))

    def _on_control(self, raw: str) -> None:
        try:
            message = ControlMessage.validate_json(raw)
        except ValidationError as e:
            self.sink.event(Event(type="error", message=f"invalid control message: {e.errors()[0]['msg']}",
                                  details={"raw": redact(raw[:1000])}))
            return
        if isinstance(message, AddSource):
            self.add_source(message.source)
        elif isinstance(message, RemoveSource):
            self.remove_source(message.source_id)
        elif isinstance(message, Stop):
            self.stop()


def candidate_threshold(config: PipelineConfig) -> float:
    """The score down to which workers keep detections: tracking.low_threshold when a source may be tracked (the
    tracker's second stage needs the low-score ones), else model.threshold. A source added later with `tracking`
    on while `tracking.enabled` is off gets no low-score candidates: its tracks are not bridged by them."""
    if config.tracking.enabled or any(config.tracks(source) for source in config.sources):
        return min(config.model.threshold, config.tracking.low_threshold)
    return config.model.threshold


def _expected_frames(source: SourceConfig, details: dict) -> int | None:
    """Frames the progress bar expects, from the container's header (None when it does not say)."""
    if source.fps is not None and details.get("duration_s"):
        return int(details["duration_s"] * source.fps)
    frames = details.get("frames")
    return None if frames is None else max(0, frames - details.get("start_index", 0))


def run_job(config: PipelineConfig, progress: bool = False) -> dict[str, dict]:
    """Connect to (or start) Redis and Ray, process the job, return the per-source summary."""
    sink = RedisSink.from_config(connect(resolve_redis_url(config.redis.url)), config.redis)
    if not ray.is_initialized():
        if config.ray_address is None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster needs no tokens
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False)
    return Job(config, sink, progress).process()
