"""Batching across sources for one pool of workers (the nvstreammux rule: docs/streaming-notes.md §1).

A batch is sent when it holds `max_batch_size` frames, or `timeout_s` after its first chunk arrived. Each chunk
comes from one source, and a batch takes at most `max_frames_per_source` frames of one source, so one busy source
cannot fill every batch (nvstreammux's max-same-source-frames). Chunks wait in arrival order, which keeps sources
round-robin. A source may have several chunks in one batch: a compute-bound job reads small chunks (a decoder is
asked for as many frames as have just been written), and one chunk per source would cap the batch at the number
of sources (bench/RESULTS.md §5, "Batching fix").
Pure bookkeeping: no Ray here, so the rules are tested on their own.
"""
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.frames import ChunkInfo
from pipeline.schema import FrameResult

if TYPE_CHECKING:  # for the annotation only: the batcher runs without Ray
    import ray


@dataclass
class Chunk:
    source_id: str
    size: int  # frames in the chunk
    info: ChunkInfo
    frames: "ray.ObjectRef"  # of the chunk's (n, ...) uint8 array; never fetched by the runner
    arrived: float
    results: list[FrameResult] | None = None  # once its batch has been inferred


class Batcher:
    def __init__(self, max_batch_size: int, timeout_s: float, max_frames_per_source: int | None = None):
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self.max_frames_per_source = max_frames_per_source or max_batch_size
        self._waiting: list[Chunk] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, chunk: Chunk) -> None:
        if not 0 < chunk.size <= self.max_frames_per_source:
            raise ValueError(f"chunk of {chunk.size} frames does not fit a batch's {self.max_frames_per_source} "
                             f"frames per source")
        self._waiting.append(chunk)

    def next_batch(self, now: float) -> list[Chunk] | None:
        """The next batch if it is full or its first chunk has waited `timeout_s`; otherwise None."""
        batch = self._assemble()
        if not batch:
            return None
        full = sum(c.size for c in batch) >= self.max_batch_size
        if not full and now - batch[0].arrived < self.timeout_s:
            return None
        for chunk in batch:
            self.remove(chunk)
        return batch

    def holds(self, source_id: str) -> bool:
        """Whether a chunk of `source_id` is waiting for a batch."""
        return any(c.source_id == source_id for c in self._waiting)

    def remove(self, chunk: Chunk) -> None:
        self._waiting = [c for c in self._waiting if c is not chunk]

    def deadline(self) -> float | None:
        """When the oldest waiting chunk's batch times out (None if nothing waits)."""
        return self._waiting[0].arrived + self.timeout_s if self._waiting else None

    def _assemble(self) -> list[Chunk]:
        batch: list[Chunk] = []
        room = self.max_batch_size
        taken: dict[str, int] = {}  # frames per source in this batch
        skipped: set[str] = set()  # a source's later chunks must not overtake one left out
        for chunk in self._waiting:
            so_far = taken.get(chunk.source_id, 0)
            if chunk.source_id in skipped or chunk.size > room or so_far + chunk.size > self.max_frames_per_source:
                skipped.add(chunk.source_id)
                continue
            batch.append(chunk)
            taken[chunk.source_id] = so_far + chunk.size
            room -= chunk.size
            if room == 0:
                break
        return batch
