"""Per-source metrics: exported through `ray.util.metrics` (Prometheus, `ray_` prefix) and kept for the summary.

fps and latency are measured where results are written to Redis, so latency is end to end: from the moment the
decoder produced the frame to the moment its result is in Redis. `frames` counts the frames of this job that Redis
has: those it lost (pipeline/source_state.py, `lost`) no longer count, and are counted in `lost` when nothing
writes them again (a live source's).
"""
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from ray.util.metrics import Counter, Gauge, Histogram

from pipeline.schema import FrameResult

_LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]
_FPS_WINDOW_S = 2.0
_LATENCY_SAMPLES = 100_000  # the summary's percentiles cover a live source's most recent frames
_WRITTEN_KEPT = 100_000  # frame indices kept to count what Redis loses: as many as `redis.maxlen` keeps by default


@dataclass
class SourceStats:
    frames: int = 0
    dropped: int = 0
    lost: int = 0  # frames Redis lost that nothing wrote again
    first_at: float | None = None
    last_at: float | None = None
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_SAMPLES))
    window: deque[float] = field(default_factory=deque)  # write times within the last _FPS_WINDOW_S
    written: deque[int] = field(default_factory=lambda: deque(maxlen=_WRITTEN_KEPT))  # their newest indices

    def summary(self) -> dict[str, float | int | None]:
        span = (self.last_at - self.first_at) if self.frames > 1 else 0.0
        latency = np.array(self.latencies_ms) if self.latencies_ms else None
        return {"frames": self.frames, "fps": round((self.frames - 1) / span, 2) if span > 0 else None,
                "p50_ms": None if latency is None else round(float(np.percentile(latency, 50)), 1),
                "p95_ms": None if latency is None else round(float(np.percentile(latency, 95)), 1),
                "dropped": self.dropped, "lost": self.lost}


class PipelineMetrics:
    def __init__(self):
        tags = ("source",)
        self._frames = Counter("cdetr_frames", "frames written to Redis", tag_keys=tags)
        self._fps = Gauge("cdetr_fps", f"frames written per second over {_FPS_WINDOW_S:.0f} s", tag_keys=tags)
        self._latency = Histogram("cdetr_latency_ms", "decode-to-Redis latency per frame",
                                  boundaries=_LATENCY_BOUNDARIES_MS, tag_keys=tags)
        self._queue = Gauge("cdetr_queue_depth", "frames decoded but not yet written", tag_keys=tags)
        self._dropped = Counter("cdetr_dropped_frames", "frames dropped by the drop_oldest policy", tag_keys=tags)
        self._lost = Counter("cdetr_lost_frames", "frames Redis lost that were not written again", tag_keys=tags)
        self.sources: dict[str, SourceStats] = {}

    def written(self, results: list[FrameResult]) -> None:
        now = time.time()
        for r in results:
            stats = self.sources.setdefault(r.source_id, SourceStats())
            stats.frames += 1
            stats.first_at = stats.first_at or now
            stats.last_at = now
            stats.window.append(now)
            stats.written.append(r.frame_index)
            latency = (now - r.captured_at) * 1e3
            stats.latencies_ms.append(latency)
            self._latency.observe(latency, tags={"source": r.source_id})
        for source_id in {r.source_id for r in results}:
            stats = self.sources[source_id]
            while now - stats.window[0] > _FPS_WINDOW_S:
                stats.window.popleft()
            self._frames.inc(sum(r.source_id == source_id for r in results), tags={"source": source_id})
            self._fps.set(len(stats.window) / _FPS_WINDOW_S, tags={"source": source_id})

    def queue_depth(self, source_id: str, frames: int) -> None:
        self._queue.set(frames, tags={"source": source_id})

    def dropped(self, source_id: str, total: int) -> int:
        """Record the decoder's running drop count; returns how many are new since the last call."""
        stats = self.sources.setdefault(source_id, SourceStats())
        new = total - stats.dropped
        if new > 0:
            stats.dropped = total
            self._dropped.inc(new, tags={"source": source_id})
        return max(new, 0)

    def lost(self, source_id: str, tail: int | None, for_good: bool) -> int:
        """Redis lost the source's frames after frame `tail` (None: all): they no longer count as written, and count
        as lost `for_good` (nothing writes them again). Returns how many of them this job had written."""
        stats = self.sources.setdefault(source_id, SourceStats())
        count = 0
        while stats.written and (tail is None or stats.written[-1] > tail):
            stats.written.pop()
            count += 1
        stats.frames -= count
        if for_good and count:
            stats.lost += count
            self._lost.inc(count, tags={"source": source_id})
        return count

    def summary(self) -> dict[str, dict]:
        return {source_id: stats.summary() for source_id, stats in self.sources.items()}
