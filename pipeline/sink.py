"""Redis Streams writer: the producer side of the wire contract (docs/wire-format.md).

Entry IDs are explicit (pipeline/wire.py): frame `i` of a source is written as `<i+1>-0`, its `eos` entry right
after the last frame. IDs increase strictly with the frame index (frames are written in order), so a retried write
is rejected by Redis ("equal or smaller than the target stream top item") instead of duplicating a frame; the sink
then checks the entry exists and counts it as written. The same IDs let a restarted job resume a file after the
last frame in Redis.

Every command is retried while Redis is unreachable (restarting, loading its AOF, network gone), with exponential
backoff up to `Backoff.timeout_s`. The runner's loop waits meanwhile, and since everything upstream of the sink is
bounded (frames in flight per source, batches per worker, decoder buffers), the wait turns into backpressure:
file decoders block, live decoders drop their oldest frames and count them. Because entry IDs are explicit, a
pipeline that was half applied before the connection broke is simply written again.

A FrameResult whose JSON exceeds `max_result_bytes` (a panoptic PNG of a huge frame, say) is still written under
its frame index, so the stream has no gap, but with empty `detections`, `panoptic` null and `error` saying why;
an `error` event names the frame.
"""
import logging
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import redis

from pipeline.config import RedisConfig
from pipeline.schema import Event, FrameResult
from pipeline.sources import redact
from pipeline.wire import (
    DEFAULT_PREFIX,
    JSON_FIELD,
    TYPE_FIELD,
    control_key,
    eos_entry_id,
    events_key,
    frame_entry_id,
    frame_index_of,
    frames_key,
)

logger = logging.getLogger(__name__)
_ID_TOO_SMALL = "equal or smaller"
T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.1
    max_s: float = 5.0
    timeout_s: float = 600.0


@dataclass
class StreamState:
    last_frame_index: int | None  # None: no frame written yet
    finished: bool  # the stream ends with an eos entry


class RedisSink:
    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX, maxlen: int = 100_000,
                 max_result_bytes: int = 4 << 20, backoff: Backoff = Backoff()):
        self.client = client
        self.prefix = prefix
        self.maxlen = maxlen
        self.max_result_bytes = max_result_bytes
        self.backoff = backoff
        self.outages: list[float] = []  # seconds Redis was unreachable, per outage (the faults test reads them)

    @classmethod
    def from_config(cls, client: redis.Redis, cfg: RedisConfig) -> "RedisSink":
        return cls(client, cfg.prefix, cfg.maxlen, cfg.max_result_bytes,
                   Backoff(cfg.retry_initial_s, cfg.retry_max_s, cfg.retry_timeout_s))

    def frames_key(self, source_id: str) -> str:
        return frames_key(self.prefix, source_id)

    @property
    def events_key(self) -> str:
        return events_key(self.prefix)

    @property
    def control_key(self) -> str:
        return control_key(self.prefix)

    def state(self, source_id: str) -> StreamState:
        """Where a source's stream stands, read from its last entry (the resume point)."""
        last = self._retrying(lambda: self.client.xrevrange(self.frames_key(source_id), count=1))
        if not last:
            return StreamState(None, False)
        entry_id, fields = last[0]
        finished = fields.get(TYPE_FIELD) == "eos"
        index = frame_index_of(entry_id)
        # The eos entry shares the ms part of the last frame, but its ms part 0 means "no frames at all".
        return StreamState(None if index < 0 else index, finished)

    def write_frames(self, results: list[FrameResult]) -> None:
        """XADD each result with its explicit ID in one pipeline round trip; duplicates count as written."""
        if not results:
            return
        payloads = [self._payload(r) for r in results]

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for r, payload in zip(results, payloads):
                pipe.xadd(self.frames_key(r.source_id), {TYPE_FIELD: "frame", JSON_FIELD: payload},
                          id=frame_entry_id(r.frame_index), maxlen=self.maxlen, approximate=True)
            replies = pipe.execute(raise_on_error=False)
            for r, reply in zip(results, replies):
                if isinstance(reply, Exception):
                    self._check_duplicate(reply, self.frames_key(r.source_id), frame_entry_id(r.frame_index))

        self._retrying(write)

    def _payload(self, result: FrameResult) -> str:
        """The entry's JSON; an oversized result is replaced by the frame without its detections (see above)."""
        payload = result.model_dump_json()
        if len(payload) <= self.max_result_bytes:
            return payload
        message = (f"frame {result.frame_index}: result of {len(payload)} bytes exceeds redis.max_result_bytes = "
                   f"{self.max_result_bytes}; written without detections and panoptic")
        self.event(Event(type="error", source_id=result.source_id, message=message,
                         details={"frame_index": result.frame_index, "bytes": len(payload)}))
        return result.model_copy(update={"detections": [], "panoptic": None, "error": message}).model_dump_json()

    def write_eos(self, source_id: str, last_frame_index: int | None, frames: int) -> None:
        entry_id = eos_entry_id(last_frame_index)
        payload = Event(type="eos", source_id=source_id, details={"frames": frames,
                                                                  "last_frame_index": last_frame_index})

        def write() -> None:
            try:
                self.client.xadd(self.frames_key(source_id), {TYPE_FIELD: "eos", JSON_FIELD: payload.model_dump_json()},
                                 id=entry_id, maxlen=self.maxlen, approximate=True)
            except redis.ResponseError as e:
                self._check_duplicate(e, self.frames_key(source_id), entry_id)

        self._retrying(write)
        self.event(payload)

    def event(self, event: Event) -> None:
        # Events are a log, not keyed by frame: server-assigned IDs are right here (a retry after a lost reply
        # may log an event twice; frames never repeat).
        self._retrying(lambda: self.client.xadd(self.events_key, {TYPE_FIELD: event.type,
                                                                  JSON_FIELD: event.model_dump_json()},
                                                maxlen=self.maxlen, approximate=True))

    def control_tail(self) -> str:
        """ID of the newest control message (`0-0` if none): a job only obeys messages sent after it started."""
        last = self._retrying(lambda: self.client.xrevrange(self.control_key, count=1))
        return last[0][0] if last else "0-0"

    def read_control(self, cursor: str, count: int = 100) -> list[tuple[str, dict]]:
        """Control entries after `cursor`, oldest first. Their `json` field is text, parsed by the schema only."""
        reply = self._retrying(lambda: self.client.xread({self.control_key: cursor}, count=count))
        return reply[0][1] if reply else []

    def _retrying(self, operation: Callable[[], T]) -> T:
        """Run `operation` until Redis answers, waiting with exponential backoff; give up after `timeout_s`."""
        delay, down_since = self.backoff.initial_s, None
        while True:
            try:
                result = operation()
            except redis.AuthenticationError:
                raise  # a wrong password stays wrong (AuthenticationError is a ConnectionError in redis-py)
            except (redis.ConnectionError, redis.TimeoutError) as e:  # BusyLoadingError: the AOF is loading
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    logger.warning("Redis unreachable (%s: %s); retrying for up to %g s", type(e).__name__, e,
                                   self.backoff.timeout_s)
                elif now - down_since > self.backoff.timeout_s:
                    raise ConnectionError(f"Redis unreachable for {now - down_since:.0f} s: {e}") from None
                time.sleep(delay)
                delay = min(delay * 2, self.backoff.max_s)
                continue
            if down_since is not None:
                self.outages.append(time.monotonic() - down_since)
                logger.info("Redis reachable again after %.1f s", self.outages[-1])
            return result

    def _check_duplicate(self, error: Exception, key: str, entry_id: str) -> None:
        """A rejected explicit ID is fine only if that very entry is already there (a retried write)."""
        if _ID_TOO_SMALL in str(error) and self.client.xrange(key, entry_id, entry_id):
            return
        raise RuntimeError(f"XADD {key} {entry_id} failed: {error}") from error


def connect(url: str) -> redis.Redis:
    """A client for `redis://` / `rediss://` (TLS) / `unix://` URLs; user and password come from the URL.

    Replies are decoded to str: every field of the wire format is text (JSON)."""
    client = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5, health_check_interval=30)
    deadline = time.monotonic() + 5
    while True:  # a server that is still starting gets a few seconds
        try:
            client.ping()
            return client
        except (redis.AuthenticationError, redis.ResponseError) as e:
            raise ConnectionError(f"Redis at {redact(url)} refused us: {e}") from None
        except redis.ConnectionError as e:
            if time.monotonic() > deadline:
                raise ConnectionError(f"cannot reach Redis at {redact(url)}: {e}") from None
            time.sleep(0.2)
