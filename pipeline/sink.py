"""Redis Streams writer: the producer side of the wire contract (docs/wire-format.md).

Entry IDs are explicit (pipeline/wire.py): frame `i` of a source is written as `<i+1>-0`, its `eos` entry right
after the last frame. IDs increase strictly with the frame index (frames are written in order), and the same IDs
let a restarted job resume a file after the last frame in Redis.

Every write is a compare-and-append: one Lua script (`_APPEND`, one round trip for every source of a batch) checks
that each stream still ends where the writer left it before appending that source's entries, and otherwise writes
nothing to it. "Where a stream ends" is its last-generated ID, the ID Redis refuses to go below (`0-0` for no
stream), not its last entry: retention (`MAXLEN`, a consumer's XDEL or XTRIM) removes entries but keeps that ID,
so it is never taken for a loss. A stream that ends *earlier* lost its last entries: an in-memory Redis restarted
empty, an AOF with `appendfsync everysec` that lost its last second, a failover to a replica that lacked the last
writes, or someone deleted the stream. The write then returns where the stream ends, and the job repairs it
(pipeline/runner.py: a file decodes the lost frames again, a live source reports them in a `lost` event). So a
loss is noticed at the source's next write, whenever it happened. A stream that ends anywhere else (after what we
wrote) has another writer: an error. A write whose reply was lost and is then retried finds the stream already
ending with its own last entry and counts as written, so a retry never duplicates a frame.
A tracked source's write also sets its state key (`wire.state_key`) to the tracker's snapshot after the write's
last frame, in the same script. Redis runs a script as one unit and persists and replicates its effects as one
MULTI/EXEC block, so a restart, a truncated AOF or a failover keeps or loses the frames and their state together:
the state always belongs to the stream's last frame, and the job restores the tracker from it wherever it resumes
the source (pipeline/runner.py). A state key is only set with frames, never alone.
The check costs one XINFO STREAM per stream and write inside the script: measured on loopback, 0.33 ms per write
of 4 frames against 0.26-0.32 ms for the plain pipelined XADDs it replaced. The events and control streams keep
the IDs Redis assigns from its clock, so after an empty restart new control messages still sort after the job's
cursor and are obeyed; events Redis loses are not logged again.

Every command is retried while Redis is unreachable (restarting, loading its AOF, network gone), with exponential
backoff up to `Backoff.timeout_s`. The runner's loop waits meanwhile, and since everything upstream of the sink is
bounded (frames in flight per source, batches per worker, decoder buffers), the wait turns into backpressure:
file decoders block, live decoders drop their oldest frames and count them.

A FrameResult whose JSON exceeds `max_result_bytes` (a panoptic PNG of a huge frame, say) is still written under
its frame index, so the stream has no gap, but with empty `detections`, `panoptic` null and `error` saying why;
an `error` event names the frame.
"""
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, TypeVar

import redis

from pipeline.config import RedisConfig
from pipeline.redis_url import client_for
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
    state_key,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")
NO_ENTRY = "0-0"  # where a stream with no entry ever ends (or none at all)
Entry = tuple[str, str, str]  # a frames stream entry: ID, type, json

# KEYS: per source, its frames stream and its state key. ARGV[1]: MAXLEN (approximate); ARGV[2], ARGV[3]: the
# entries' two field names; then per stream: the ID it should end with, the number n of its new entries, the state
# to SET with them ('': leave the key as it is), and n (ID, type, json) triples. Appends a stream's entries, and
# sets its state, only if it ends where it should; returns where each stream ended before.
_APPEND = """
local ends, a = {}, 4
for k = 1, #KEYS, 2 do
  local key, last = KEYS[k], '0-0'
  if redis.call('EXISTS', key) == 1 then
    local info = redis.call('XINFO', 'STREAM', key)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then last = info[i + 1] end
    end
  end
  local n = tonumber(ARGV[a + 1])
  if last == ARGV[a] then
    for i = a + 3, a + 3 * n, 3 do
      redis.call('XADD', key, 'MAXLEN', '~', ARGV[1], ARGV[i], ARGV[2], ARGV[i + 1], ARGV[3], ARGV[i + 2])
    end
    if ARGV[a + 2] ~= '' then redis.call('SET', KEYS[k + 1], ARGV[a + 2]) end
  end
  ends[#ends + 1] = last
  a = a + 3 + 3 * n
end
return ends
"""


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.1
    max_s: float = 5.0
    timeout_s: float = 600.0


@dataclass
class StreamState:
    last_frame_index: int | None  # None: no frame written yet
    finished: bool  # the stream ends with an eos entry

    @classmethod
    def ending_at(cls, entry_id: str) -> "StreamState":
        """The state of a stream whose last-generated ID is `entry_id`."""
        index = frame_index_of(entry_id)
        # The eos entry shares the ms part of the last frame, but its ms part 0 means "no frames at all".
        return cls(None if index < 0 else index, _order(entry_id)[1] == 1)


def _order(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def _end_id(last_frame_index: int | None) -> str:
    """Where a stream ends after frame `last_frame_index` (None: no frame)."""
    return NO_ENTRY if last_frame_index is None else frame_entry_id(last_frame_index)


class RedisSink:
    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX, maxlen: int = 100_000,
                 max_result_bytes: int = 4 << 20, backoff: Backoff = Backoff()):
        self.client = client
        self.prefix = prefix
        self.maxlen = maxlen
        self.max_result_bytes = max_result_bytes
        self.backoff = backoff
        self.outages: list[float] = []  # seconds Redis was unreachable, per outage (the faults test reads them)
        self._append_script = client.register_script(_APPEND)

    @classmethod
    def from_config(cls, client: redis.Redis, cfg: RedisConfig) -> "RedisSink":
        return cls(client, cfg.prefix, cfg.maxlen, cfg.max_result_bytes,
                   Backoff(cfg.retry_initial_s, cfg.retry_max_s, cfg.retry_timeout_s))

    def frames_key(self, source_id: str) -> str:
        return frames_key(self.prefix, source_id)

    def state_key(self, source_id: str) -> str:
        return state_key(self.prefix, source_id)

    @property
    def events_key(self) -> str:
        return events_key(self.prefix)

    @property
    def control_key(self) -> str:
        return control_key(self.prefix)

    def state(self, source_id: str) -> StreamState:
        """Where a source's stream stands (the resume point), from where it ends: entries removed by retention do
        not move it back."""
        return StreamState.ending_at(self._retrying(lambda: self._append({source_id: (NO_ENTRY, [], "")}))[source_id])

    def tracker_state(self, source_id: str) -> dict | None:
        """The source's state key, `{"frame_index", "snapshot"}` (None: never set): what `write_frames` stored with
        its last write of the source's frames."""
        stored = self._retrying(lambda: self.client.get(self.state_key(source_id)))
        return None if stored is None else json.loads(stored)

    def write_frames(self, results: list[FrameResult], after: Mapping[str, int | None] | None = None,
                     snapshots: Mapping[str, dict] | None = None) -> dict[str, StreamState]:
        """Append each source's results (in frame order) to its stream, in one round trip, if the stream still ends
        after frame `after[source_id]` (None: no frame), the last one the caller wrote; with them, in the same Lua
        call, set the state key of each source in `snapshots` to its snapshot (the tracker's state after its last
        result here). Returns the sources whose stream ends earlier (Redis lost its last entries; nothing of theirs
        was written, state included) and where it ends. Without `after` (a one-off writer), each stream is
        expected to end where it ends now."""
        if not results:
            return {}
        payloads: dict[str, list[Entry]] = {}
        for r in results:
            payloads.setdefault(r.source_id, []).append((frame_entry_id(r.frame_index), "frame", self._payload(r)))
        if after is None:
            ends = self._retrying(lambda: self._append({i: (NO_ENTRY, [], "") for i in payloads}))
        else:
            ends = {i: _end_id(after[i]) for i in payloads}
        snapshots = snapshots or {}
        states = {i: json.dumps({"frame_index": frame_index_of(entries[-1][0]), "snapshot": snapshots[i]})
                  if i in snapshots else "" for i, entries in payloads.items()}
        return self._checked_append({i: (ends[i], entries, states[i]) for i, entries in payloads.items()})

    def write_eos(self, source_id: str, last_frame_index: int | None, frames: int) -> StreamState | None:
        """Append the `eos` entry after frame `last_frame_index` (None: no frame), if the stream still ends there;
        then log the event. Returns None, or where the stream ends when it ends earlier (nothing written)."""
        payload = Event(type="eos", source_id=source_id, details={"frames": frames,
                                                                  "last_frame_index": last_frame_index})
        entry = (eos_entry_id(last_frame_index), "eos", payload.model_dump_json())
        refused = self._checked_append({source_id: (_end_id(last_frame_index), [entry], "")})
        if refused:
            return refused[source_id]
        self.event(payload)
        return None

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

    def _checked_append(self, streams: dict[str, tuple[str, list[Entry], str]]) -> dict[str, StreamState]:
        """Compare-and-append: `streams` maps each source to the ID its stream should end with, its new entries and
        the state to set with them ("": none). Returns the sources whose stream ends earlier (see the module
        docstring) and where it ends."""
        for source_id, (end, entries, _) in streams.items():
            ids = [end, *(entry_id for entry_id, _, _ in entries)]
            if any(_order(a) >= _order(b) for a, b in zip(ids, ids[1:])):
                raise ValueError(f"{self.frames_key(source_id)}: entries {ids[1:]} do not follow {end} in order")
        found = self._retrying(lambda: self._append(streams))
        refused = {}
        for source_id, (end, entries, _) in streams.items():
            key = self.frames_key(source_id)
            if found[source_id] == end or (entries and found[source_id] == entries[-1][0]):
                continue  # written now (state included), or by an earlier try whose reply was lost
            if _order(found[source_id]) > _order(end):
                raise RuntimeError(f"{key} ends at {found[source_id]}, after {end} where this job left it: does "
                                   f"another job write this stream?")
            logger.warning("%s ends at %s, not at %s where this job left it: Redis lost its last entries", key,
                           found[source_id], end)
            refused[source_id] = StreamState.ending_at(found[source_id])
        return refused

    def _append(self, streams: dict[str, tuple[str, list[Entry], str]]) -> dict[str, str]:
        """One run of `_APPEND` over sources' streams: where each ended before (it appended only to those that
        ended as given)."""
        keys, args = [], [self.maxlen, TYPE_FIELD, JSON_FIELD]
        for source_id, (end, entries, state) in streams.items():
            keys += [self.frames_key(source_id), self.state_key(source_id)]
            args += [end, len(entries), state, *(value for entry in entries for value in entry)]
        return dict(zip(streams, self._append_script(keys=keys, args=args)))


def connect(url: str) -> redis.Redis:
    """A client for a Redis URL: one server, or the primary of a Sentinel deployment, followed through failovers
    (`pipeline/redis_url.py`); user and password come from the URL.

    Replies are decoded to str: every field of the wire format is text (JSON)."""
    client = client_for(url, decode_responses=True, socket_connect_timeout=5, health_check_interval=30)
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
