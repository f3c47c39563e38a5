"""The Redis side of the wire format (docs/wire-format.md): stream keys, entry fields and entry IDs.

The messages inside the entries are pipeline/schema.py's models. The pipeline and the tests name streams and
entry IDs through these functions, so the format is spelled out in one place. No imports: pipeline/config.py
takes its default prefix from here, and pipeline/schema.py imports pipeline/config.py.
"""
DEFAULT_PREFIX = "cdetr"  # `redis.prefix`

# Entries of the frames and events streams have both fields; control entries only `json`.
TYPE_FIELD = "type"  # frames stream: `frame` or `eos`; events stream: the event's type
JSON_FIELD = "json"  # the message, as JSON text


def frames_key(prefix: str, source_id: str) -> str:
    """One stream per source: its FrameResults in frame order, then an `eos` entry once it ends."""
    return f"{prefix}:frames:{source_id}"


def events_key(prefix: str) -> str:
    """One stream of lifecycle events (schema.Event) for every source of the pipelines under `prefix`."""
    return f"{prefix}:events"


def control_key(prefix: str) -> str:
    """The stream of commands to a running job (schema.ControlMessage)."""
    return f"{prefix}:control"


def state_key(prefix: str, source_id: str) -> str:
    """A tracked source's tracker state: JSON `{"frame_index": i, "snapshot": {...}}`, the state after frame `i`,
    set by the same Lua call that appends frame `i` to the frames stream (pipeline/sink.py), so it always matches
    the stream's last frame. The job reads it back wherever it resumes the source."""
    return f"{prefix}:state:{source_id}"


# Entry IDs of a frames stream are set by the producer, never by Redis: frame `i` is `<i+1>-0`, and the `eos`
# entry is `<last+1>-1` right after the last frame `last` (`0-1` when the source had no frame). The 1-based frame
# index in the ms part makes IDs grow strictly with the frame index and never depend on clocks (pipeline/sink.py
# relies on that to write idempotently and to resume).

def frame_entry_id(frame_index: int) -> str:
    return f"{frame_index + 1}-0"


def eos_entry_id(last_frame_index: int | None) -> str:
    return f"{0 if last_frame_index is None else last_frame_index + 1}-1"


def frame_index_of(entry_id: str) -> int:
    """Inverse of `frame_entry_id` (works for the eos entry too: the frame before it)."""
    return int(entry_id.split("-")[0]) - 1
