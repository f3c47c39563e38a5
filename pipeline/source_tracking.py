"""A tracked source's tracker inside the job (pipeline/runner.py), kept in step with the source's stream in Redis.

The tracker (pipeline/tracking.py) sees each frame once, in frame order, when the job takes it for writing
(`SourceState.take_ready`), and its snapshot is written in the same Lua call as those frames (pipeline/sink.py), so
the source's state key always holds the state after the stream's last frame. One rule then restores the tracker
wherever the job resumes a source: when the frames to write do not follow the last frame the tracker saw (a new run
after the driver died or stopped, frames that Redis lost), the tracker is rebuilt from the state key. A recreated
decoder or a chunk decoded again needs nothing: the tracker only ever sees frames that are about to be written,
after the ones it has seen.
"""
import json
from pathlib import Path
from typing import Callable

from pipeline.config import SourceConfig, TrackingConfig
from pipeline.schema import FrameResult
from pipeline.tracking import SourceTracker


def stuff_labels(model_path: Path) -> frozenset[int]:
    """The checkpoint's `stuff_labels` (classes nobody tracks: grass, sky), read from its config.json without
    loading the weights; an original `.pth` file records none."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return frozenset()
    return frozenset(int(label) for label in json.loads(config.read_text()).get("stuff_labels", []))


def restorable(stored: dict | None, last_written: int | None) -> dict | None:
    """The snapshot to restore for a stream that ends after frame `last_written` (None: no frame), from its state
    key's value `stored`. The stored snapshot belongs to the stream's last frame, or to an earlier one when tracking
    was off for the frames between (then the tracker sees a gap in time, as after dropped frames). None, a new
    tracker, when there is none, when the stream has no frame, or when it is from after the stream's end (someone
    deleted the stream but not its state)."""
    if stored is None or last_written is None or stored["frame_index"] > last_written:
        return None
    return stored["snapshot"]


class StateError(ValueError):
    """The state key holds a snapshot that this version cannot restore (another version's, or not ours)."""


class TrackedSource:
    """One source's tracker and the last frame it has seen."""

    def __init__(self, settings: TrackingConfig, source: SourceConfig, threshold: float, stuff: frozenset[int]):
        self.settings, self.source, self.threshold, self.stuff = settings, source, threshold, stuff
        self.tracker: SourceTracker | None = None  # built at the first write: the state key is read then
        self.last_frame: int | None = None

    def track(self, results: list[FrameResult], last_written: int | None,
              stored: Callable[[], dict | None]) -> tuple[list[FrameResult], dict]:
        """`results` (the frames to write after frame `last_written`, in order) with their track IDs and analytics,
        and the snapshot to write with them. `stored` reads the state key, when the tracker must be rebuilt."""
        if self.tracker is None or self.last_frame != last_written:
            self.tracker = self._restored(stored, last_written)
        tracked = [self.tracker.update(result) for result in results]
        self.last_frame = results[-1].frame_index
        return tracked, self.tracker.snapshot()

    def _restored(self, stored: Callable[[], dict | None], last_written: int | None) -> SourceTracker:
        try:
            return SourceTracker(self.settings, self.source, self.threshold, self.stuff,
                                 restorable(stored(), last_written))
        except (ValueError, KeyError, TypeError) as e:  # JSON or snapshot of another shape or version
            raise StateError(f"its tracker state cannot be restored ({type(e).__name__}: {e})") from None
