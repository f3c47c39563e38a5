"""Batching across sources for one pool of workers (the nvstreammux rule, research note §0.1).

A batch is sent when it holds `max_batch_size` frames, or `timeout_s` after its first chunk arrived. Each chunk
comes from one source and holds at most the per-source cap (the runner asks decoders for no more), and a batch
takes at most one chunk per source, so one busy source cannot fill every batch (nvstreammux's
max-same-source-frames). Chunks wait in arrival order, which keeps sources round-robin.
Pure bookkeeping: no Ray here, so the rules are tested on their own.
"""
from dataclasses import dataclass
from typing import Any


@dataclass
class Chunk:
    source_id: str
    size: int  # frames in the chunk
    info: Any  # decoder.ChunkInfo
    frames: Any  # ObjectRef of the (n, h, w, 3) uint8 array; never fetched by the runner
    arrived: float
    results: list | None = None  # the chunk's FrameResults, once its batch has been inferred


class Batcher:
    def __init__(self, max_batch_size: int, timeout_s: float):
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self._waiting: list[Chunk] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, chunk: Chunk) -> None:
        if not 0 < chunk.size <= self.max_batch_size:
            raise ValueError(f"chunk of {chunk.size} frames does not fit a batch of {self.max_batch_size}")
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

    def remove(self, chunk: Chunk) -> None:
        self._waiting = [c for c in self._waiting if c is not chunk]

    def deadline(self) -> float | None:
        """When the oldest waiting chunk's batch times out (None if nothing waits)."""
        return self._waiting[0].arrived + self.timeout_s if self._waiting else None

    def _assemble(self) -> list[Chunk]:
        batch: list[Chunk] = []
        room = self.max_batch_size
        sources: set[str] = set()
        for chunk in self._waiting:
            if chunk.source_id in sources or chunk.size > room:
                continue
            batch.append(chunk)
            sources.add(chunk.source_id)
            room -= chunk.size
            if room == 0:
                break
        return batch
