"""Redis Streams writer: the producer side of the wire contract (DESIGN.md "Redis wire contract").

Entry IDs are explicit: frame `i` of a source is written as `<i+1>-0`, and the source's `eos` entry as
`<last+1>-1` right after its last frame `last` (`0-1` when no frame was written). The ms part is the 1-based frame
index, so IDs increase strictly with the frame index (frames are written in order), never depend on clocks, and a
retried write is rejected by Redis ("equal or smaller than the target stream top item") instead of duplicating a
frame; the sink then checks the entry exists and counts it as written. The same IDs let a restarted job resume a
file after the last frame in Redis.
"""
import time
from dataclasses import dataclass

import redis

from pipeline.schema import Event, FrameResult

_ID_TOO_SMALL = "equal or smaller"


def frame_entry_id(frame_index: int) -> str:
    return f"{frame_index + 1}-0"


def eos_entry_id(last_frame_index: int | None) -> str:
    return f"{0 if last_frame_index is None else last_frame_index + 1}-1"


def frame_index_of(entry_id: str) -> int:
    """Inverse of `frame_entry_id` (works for the eos entry too: the frame before it)."""
    return int(entry_id.split("-")[0]) - 1


@dataclass
class StreamState:
    last_frame_index: int | None  # None: no frame written yet
    finished: bool  # the stream ends with an eos entry


class RedisSink:
    def __init__(self, client: redis.Redis, prefix: str = "cdetr", maxlen: int = 100_000):
        self.client = client
        self.prefix = prefix
        self.maxlen = maxlen

    def frames_key(self, source_id: str) -> str:
        return f"{self.prefix}:frames:{source_id}"

    @property
    def events_key(self) -> str:
        return f"{self.prefix}:events"

    @property
    def control_key(self) -> str:
        return f"{self.prefix}:control"

    def state(self, source_id: str) -> StreamState:
        """Where a source's stream stands, read from its last entry (the resume point)."""
        last = self.client.xrevrange(self.frames_key(source_id), count=1)
        if not last:
            return StreamState(None, False)
        entry_id, fields = last[0]
        finished = fields.get("type") == "eos"
        index = frame_index_of(entry_id)
        # The eos entry shares the ms part of the last frame, but its ms part 0 means "no frames at all".
        return StreamState(None if index < 0 else index, finished)

    def write_frames(self, results: list[FrameResult]) -> None:
        """XADD each result with its explicit ID in one pipeline round trip; duplicates count as written."""
        if not results:
            return
        pipe = self.client.pipeline(transaction=False)
        for r in results:
            pipe.xadd(self.frames_key(r.source_id), {"type": "frame", "json": r.model_dump_json()},
                      id=frame_entry_id(r.frame_index), maxlen=self.maxlen, approximate=True)
        replies = pipe.execute(raise_on_error=False)
        for r, reply in zip(results, replies):
            if isinstance(reply, Exception):
                self._check_duplicate(reply, self.frames_key(r.source_id), frame_entry_id(r.frame_index))

    def write_eos(self, source_id: str, last_frame_index: int | None, frames: int) -> None:
        entry_id = eos_entry_id(last_frame_index)
        payload = Event(type="eos", source_id=source_id, details={"frames": frames,
                                                                  "last_frame_index": last_frame_index})
        try:
            self.client.xadd(self.frames_key(source_id), {"type": "eos", "json": payload.model_dump_json()},
                             id=entry_id, maxlen=self.maxlen, approximate=True)
        except redis.ResponseError as e:
            self._check_duplicate(e, self.frames_key(source_id), entry_id)
        self.event(payload)

    def event(self, event: Event) -> None:
        # Events are a log, not keyed by frame: server-assigned IDs are right here.
        self.client.xadd(self.events_key, {"type": event.type, "json": event.model_dump_json()},
                         maxlen=self.maxlen, approximate=True)

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
            raise ConnectionError(f"Redis at {_redact(url)} refused us: {e}") from None
        except redis.ConnectionError as e:
            if time.monotonic() > deadline:
                raise ConnectionError(f"cannot reach Redis at {_redact(url)}: {e}") from None
            time.sleep(0.2)


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
