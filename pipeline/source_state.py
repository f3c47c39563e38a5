"""One source's state in a running job, as a small state machine. The job (pipeline/runner.py) changes it only
through the methods here, so the rules that put every frame into Redis exactly once, in order, are all in this file.

A source's frames go: its decoder --`read()`--> `pending` chunks --a worker's batch--> results --> Redis.

Invariants:
- At most one `read()` is outstanding (`read`), and none once the decoder has reported its last frame
  (`decoded_all`). Replacing the decoder (`restart`) forgets the old one's outstanding read, so its frames never
  enter `pending`.
- `pending` holds the chunks read but not yet written, in frame order, with no chunk missing between them:
  `accept` takes only a chunk that starts at or after `next_index` (where the current decoder goes on), then moves
  `next_index` past it.
- `in_flight`, the frames between decoding and Redis, is the sum of the pending chunks' sizes (derived, not kept).
- Frames are written strictly in frame order, each once: only `take_ready` removes chunks for writing, and only
  the completed ones at the head of `pending`, so a chunk whose batch came back early waits for those before it
  (the explicit Redis entry IDs need this order).
- `last_written` is where the source's stream in Redis ends, the last frame of the last write Redis accepted
  (`written`); the sink appends only to a stream that still ends there. It only grows, except in `lost`.
- `rewind(chunk)` (the chunk's batch failed for good) drops `chunk` and every later chunk and moves `next_index`
  back to `chunk`'s first frame, where the next decoder starts: exactly the dropped frames are decoded again.
  Results that still come back for a dropped chunk are ignored (`inferred`).
- `fail` drops everything pending: what was written stays a prefix with no gap, and no eos follows it.
- `lost(tail)` (Redis lost the frames after `tail`: restarted empty, an AOF that lost its last second, a failover,
  the stream deleted) moves `last_written` back to `tail`. A live source goes on after it: the lost frames cannot
  come back. A file source drops every pending chunk; if it is still running, `next_index` goes back to the frame
  after `tail`, where a new decoder starts (`restart`), so exactly the lost and the dropped frames are decoded and
  written again; otherwise (stopped, removed, in error) it reads no more, its stream ends at `tail` without eos,
  and a later run resumes it there.
- The source is `finished` when its decoder has reported its last frame, no read is outstanding and nothing is
  pending; only then does the job `end` it, which says whether its stream gets an eos entry.

Status, `running` at first:
    running -> eos                   every frame decoded and written (terminal)
    running -> stopped               the job stops (Ctrl-C, a `stop` message); a later run resumes the source
    running -> removed               a `remove` message; ends with eos after the frames already decoded
    running | stopped | removed -> error   the decoder failed for good, or a batch did while nothing more is
                                     decoded (terminal)
    removed -> stopped               Redis lost frames of a removed file source: no eos, a later run resumes it
"""
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.batcher import Chunk
from pipeline.config import SourceConfig
from pipeline.schema import FrameResult

Status = Literal["running", "stopped", "removed", "eos", "error"]
_NEXT: dict[Status, set[Status]] = {  # the allowed status changes; staying is always allowed
    "running": {"stopped", "removed", "eos", "error"},
    "stopped": {"error"},
    "removed": {"stopped", "error"},
    "eos": set(),
    "error": set(),
}


def resume_index(last_written: int | None) -> int:
    """Where a source's decoding starts: after its last frame in Redis (a resumed run skips what is there)."""
    return 0 if last_written is None else last_written + 1


@dataclass(frozen=True)
class Loss:
    """What `SourceState.lost` found and did."""
    first_frame_index: int  # the first frame Redis lost (right after where its stream ends now)
    last_frame_index: int  # the last frame written before
    dropped: list[Chunk]  # pending chunks dropped (a file source's): their batches' results are ignored
    decode_again: bool  # a file source still running: a new decoder goes on from `next_index` (`restart`)


@dataclass
class SourceState:
    config: SourceConfig
    decoder: Any  # the source's StreamDecoder actor
    home: str  # node id of the workers that serve it (pipeline/placement.py)
    last_written: int | None = None  # frame index of its last frame in Redis
    status: Status = "running"
    auth_failed: bool = False  # the camera refused our credentials and has not accepted them since (the summary)
    read: Any = None  # [info_ref, frames_ref] of the outstanding read()
    pending: deque[Chunk] = field(default_factory=deque)  # read but not yet written, in frame order
    decoded_all: bool = False  # the current decoder has reported its last frame
    next_index: int = field(init=False)  # after the last frame read: where a new decoder starts
    decoder_start: int = field(init=False)  # the first frame index of the current decoder
    restarts: int = 0  # decoders recreated after a failure that counts against decoder.max_restarts
    # Its tracker (pipeline/source_tracking.py) when tracking is on, None when off: it follows `last_written` on
    # its own (it sees results as they are taken for writing), so no transition here touches it.
    tracking: Any = None
    # The job's reporting, no part of the state machine:
    progress: Any = None  # its tqdm bar, if any
    last_drop_event: float = 0.0  # when the job last sent a `dropped` event for it

    def __post_init__(self):
        self.next_index = self.decoder_start = resume_index(self.last_written)

    @property
    def in_flight(self) -> int:
        """Frames read from the decoder but not yet written."""
        return sum(chunk.size for chunk in self.pending)

    @property
    def can_read(self) -> bool:
        return self.read is None and not self.decoded_all

    @property
    def finished(self) -> bool:
        return self.decoded_all and self.read is None and not self.pending

    def holds(self, chunk: Chunk) -> bool:
        """Whether `chunk` is still pending (not written, not dropped by `rewind` or `fail`)."""
        return any(c is chunk for c in self.pending)

    # --- reading ---

    def reading(self, read: Any) -> None:
        """A `read()` of the decoder was issued; `read` is its pair of refs."""
        if not self.can_read:
            raise RuntimeError(f"{self.config.id}: a read is outstanding or the decoder has reported its last frame")
        self.read = read

    def accept(self, chunk: Chunk | None, finished: bool) -> None:
        """The outstanding read returned `chunk` (None: no frames); `finished`: the decoder has no more."""
        self.read = None
        if chunk is not None:
            first = chunk.info.frames[0].frame_index
            if first < self.next_index:
                raise ValueError(f"{self.config.id}: a chunk from frame {first}, before {self.next_index}")
            self.pending.append(chunk)
            self.next_index = chunk.info.frames[-1].frame_index + 1
        if finished:
            self.decoded_all = True

    def restart(self, decoder: Any, counted: bool) -> None:
        """A new decoder goes on from `next_index` (the old one died, or `rewind` moved `next_index` back);
        `counted`: the failure counts against decoder.max_restarts."""
        if counted:
            self.restarts += 1
        self.decoder, self.decoder_start, self.read = decoder, self.next_index, None

    def from_current_decoder(self, chunk: Chunk) -> bool:
        """Whether the current decoder produced `chunk` (a chunk of an earlier one failed as fallout of a failure
        already counted)."""
        return chunk.info.frames[0].frame_index >= self.decoder_start

    # --- results ---

    def inferred(self, chunk: Chunk, results: list[FrameResult]) -> None:
        """A batch returned `chunk`'s results; those of a chunk that is no longer pending are ignored."""
        if self.holds(chunk):
            chunk.results = results

    def take_ready(self) -> list[FrameResult]:
        """Remove the completed chunks at the head of `pending` and return their results, in frame order, for the
        job to write now (after `last_written`)."""
        results: list[FrameResult] = []
        while self.pending and self.pending[0].results is not None:
            results.extend(self.pending.popleft().results)
        return results

    def written(self, results: list[FrameResult]) -> None:
        """Redis accepted the write of `results` (what `take_ready` returned)."""
        if results:
            self.last_written = results[-1].frame_index

    def rewind(self, chunk: Chunk) -> list[Chunk]:
        """`chunk`'s batch failed for good: drop it and every later chunk, and go back to its first frame (the job
        then starts a new decoder there, `restart`). Returns the dropped chunks."""
        pending = list(self.pending)
        kept = [c is chunk for c in pending].index(True)  # ValueError if it is not pending
        self.pending = deque(pending[:kept])
        self.read, self.decoded_all = None, False
        self.next_index = chunk.info.frames[0].frame_index
        return pending[kept:]

    def lost(self, tail: int | None) -> Loss:
        """Redis lost this source's frames after `tail` (None: all of them); see the module docstring. Returns which
        frames, and what the job must do about them."""
        if self.last_written is None or (tail is not None and tail >= self.last_written):
            raise ValueError(f"{self.config.id}: Redis cannot have lost frames after {tail}: {self.last_written} "
                             f"is the last one written")
        first, last = resume_index(tail), self.last_written
        self.last_written = tail
        if self.config.live:
            return Loss(first, last, dropped=[], decode_again=False)
        dropped = list(self.pending)
        self.pending.clear()
        self.read = None
        decode_again = self.status == "running"
        if decode_again:
            self.next_index, self.decoded_all = resume_index(tail), False
        else:
            self.decoded_all = True
            if self.status == "removed":
                self._become("stopped")
        return Loss(first, last, dropped, decode_again)

    # --- status ---

    def stop(self) -> None:
        if self.status == "running":
            self._become("stopped")

    def remove(self) -> None:
        if self.status == "running":
            self._become("removed")

    def decoder_failed(self) -> None:
        """The decoder reported an error it will not recover from: the frames already read are still written."""
        self._become("error")

    def fail(self) -> list[Chunk]:
        """Give up on the source now: drop what is pending and read no more. Returns the dropped chunks."""
        self._become("error")
        dropped = list(self.pending)
        self.pending.clear()
        self.read, self.decoded_all = None, True
        return dropped

    @property
    def gets_eos(self) -> bool:
        """Whether its stream ends with an eos entry once it has finished: it ran to its end, or was removed (what
        was decoded is then all there is). A stopped source resumes later; one in error has a gap or a broken
        input."""
        return self.status in ("running", "removed")

    def end(self) -> bool:
        """Its final status, once `finished`; returns `gets_eos`."""
        if not self.finished:
            raise RuntimeError(f"{self.config.id}: ended before it finished")
        eos = self.gets_eos
        if self.status == "running":
            self._become("eos")
        return eos

    def _become(self, status: Status) -> None:
        if status != self.status and status not in _NEXT[self.status]:
            raise RuntimeError(f"{self.config.id}: status {self.status} cannot become {status}")
        self.status = status
