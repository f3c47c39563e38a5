"""What travels with decoded frames from a decoder to the batcher and a worker: plain dataclasses.

The frames themselves are one (n, ...) uint8 array per chunk, which the runner never fetches (it passes the
array's ObjectRef on to a worker); `ChunkInfo` is the small part next to it that the runner does fetch.
No PyAV and no Ray here, so the worker and the batcher import these without the decoder's dependencies.
"""
from dataclasses import dataclass, field

from pipeline.schema import Event


@dataclass
class FrameMeta:
    frame_index: int
    pts: float | None
    captured_at: float  # unix time when decoded
    width: int  # source frame size; the array itself is model-sized
    height: int
    decode_ms: float


@dataclass(frozen=True)
class FrameFormat:
    """How a frame array holds its pixels: `rgb24` (h, w, 3) or `yuv420p` (3h/2, w) with the frame's YUV matrix
    and range (model/yuv.py)."""
    pixels: str = "rgb24"
    matrix: str = "bt601"
    full_range: bool = False


RGB = FrameFormat()


@dataclass
class ChunkInfo:
    """What `StreamDecoder.read()` returns next to the (n, ...) uint8 frames: small, so the runner fetches it."""
    source_id: str
    frames: list[FrameMeta]
    format: FrameFormat = RGB  # of every frame in the chunk
    events: list[Event] = field(default_factory=list)
    dropped: int = 0  # total frames dropped by the drop_oldest policy so far
    finished: bool = False  # the source ended (EOF or error) and every frame has been read
