"""One source's state machine (pipeline/source_state.py): the rules that write every frame once, in order, and
the status changes. No Ray: the decoder and the read refs are stand-ins."""
import pytest

from pipeline.batcher import Chunk
from pipeline.config import SourceConfig
from pipeline.frames import ChunkInfo, FrameMeta
from pipeline.schema import FrameResult
from pipeline.source_state import SourceState


def state(last_written: int | None = None) -> SourceState:
    return SourceState(SourceConfig(id="a", url="a.mp4"), "decoder-1", "node", last_written=last_written)


def chunk(first: int, size: int) -> Chunk:
    frames = [FrameMeta(i, pts=None, captured_at=0.0, width=64, height=48, decode_ms=0.0)
              for i in range(first, first + size)]
    return Chunk("a", size, ChunkInfo("a", frames), frames=None, arrived=0.0)


def results(c: Chunk) -> list[FrameResult]:
    return [FrameResult(source_id="a", frame_index=m.frame_index, pts=None, captured_at=0.0, width=64, height=48,
                        model="m", detections=[]) for m in c.info.frames]


def read(s: SourceState, c: Chunk | None, finished: bool = False) -> None:
    s.reading("read-refs")
    s.accept(c, finished)


def indices(rs: list[FrameResult]) -> list[int]:
    return [r.frame_index for r in rs]


def write(s: SourceState) -> list[int]:
    """What the job does with the ready chunks when Redis accepts the write."""
    rs = s.take_ready()
    s.written(rs)
    return indices(rs)


def test_frames_are_written_in_frame_order_once_each():
    s = state(last_written=9)  # a resumed source: frames 0-9 are in Redis
    assert s.next_index == 10 and s.decoder_start == 10
    first, second = chunk(10, 4), chunk(14, 2)
    read(s, first)
    read(s, second)
    assert s.in_flight == 6 and s.next_index == 16
    s.inferred(second, results(second))
    assert s.take_ready() == [] and s.in_flight == 6  # the later chunk waits for the earlier one
    s.inferred(first, results(first))
    assert write(s) == list(range(10, 16))
    assert s.take_ready() == [] and s.in_flight == 0 and s.last_written == 15


def test_one_read_at_a_time_and_none_after_the_last_frame():
    s = state()
    s.reading("read-refs")
    with pytest.raises(RuntimeError, match="outstanding"):
        s.reading("another")
    s.accept(chunk(0, 2), finished=True)
    assert not s.can_read and not s.finished  # its frames still have to be written
    with pytest.raises(RuntimeError):
        s.reading("after-the-end")
    c = s.pending[0]
    s.inferred(c, results(c))
    s.take_ready()
    assert s.finished


def test_a_chunk_from_before_the_frames_already_read_is_refused():
    s = state()
    read(s, chunk(0, 4))
    s.reading("read-refs")
    with pytest.raises(ValueError, match="before 4"):
        s.accept(chunk(2, 4), finished=False)


def test_rewind_drops_the_failed_chunk_and_the_later_ones_and_decodes_them_again():
    s = state()
    chunks = [chunk(0, 4), chunk(4, 4), chunk(8, 4)]
    for c in chunks:
        read(s, c)
    s.inferred(chunks[0], results(chunks[0]))
    s.reading("read-refs")  # outstanding when the batch with chunks[1] fails
    assert s.from_current_decoder(chunks[1])
    assert s.rewind(chunks[1]) == chunks[1:]
    assert list(s.pending) == chunks[:1] and s.in_flight == 4 and s.next_index == 4
    assert s.read is None and not s.decoded_all
    s.inferred(chunks[2], results(chunks[2]))  # a dropped chunk's batch comes back late: ignored
    assert chunks[2].results is None
    s.restart("decoder-2", counted=True)
    assert (s.decoder, s.decoder_start, s.restarts) == ("decoder-2", 4, 1)
    assert not s.from_current_decoder(chunks[0])  # its failure now would be fallout of the one counted
    again = chunk(4, 8)
    read(s, again, finished=True)
    s.inferred(again, results(again))
    assert indices(s.take_ready()) == list(range(12))
    assert s.finished and s.end() and s.status == "eos"


def test_restart_forgets_the_dead_decoders_read():
    s = state()
    read(s, chunk(0, 2))
    s.reading("read-of-decoder-1")
    s.restart("decoder-2", counted=False)
    assert s.read is None and s.restarts == 0 and s.decoder_start == 2 and s.in_flight == 2


def test_fail_drops_what_is_pending_and_ends_without_eos():
    s = state()
    first, second = chunk(0, 2), chunk(2, 2)
    read(s, first)
    read(s, second)
    s.inferred(first, results(first))
    assert write(s) == [0, 1]
    s.reading("read-refs")
    assert s.fail() == [second]
    assert s.finished and s.in_flight == 0 and s.status == "error"
    assert s.end() is False and s.status == "error" and s.last_written == 1


@pytest.mark.parametrize("change, status, eos", [
    (lambda s: None, "eos", True),  # ran to its end
    (SourceState.stop, "stopped", False),  # the next run resumes it
    (SourceState.remove, "removed", True),
    (SourceState.decoder_failed, "error", False),
    (lambda s: (s.remove(), s.decoder_failed()), "error", False),
    (lambda s: (s.stop(), s.remove()), "stopped", False),  # a stopped source is not removed as well
    (lambda s: (s.decoder_failed(), s.stop(), s.remove()), "error", False),  # error is terminal
])
def test_status_changes_and_which_end_gets_eos(change, status, eos):
    s = state()
    read(s, None, finished=True)
    change(s)
    assert s.end() is eos and s.status == status


def test_a_source_ends_only_once_finished_and_eos_is_terminal():
    s = state()
    read(s, chunk(0, 1), finished=True)
    with pytest.raises(RuntimeError, match="before it finished"):
        s.end()
    s.inferred(s.pending[0], results(s.pending[0]))
    s.take_ready()
    assert s.end() and s.status == "eos"
    with pytest.raises(RuntimeError, match="eos cannot become error"):
        s.decoder_failed()


def test_a_file_source_decodes_again_what_redis_lost():
    s = state()
    chunks = [chunk(0, 4), chunk(4, 4), chunk(8, 4)]
    for c in chunks:
        read(s, c)
    for c in chunks[:2]:
        s.inferred(c, results(c))
    assert s.take_ready() and s.last_written is None  # taken, not yet written: Redis has not accepted it
    s.written(results(chunks[1]))
    s.reading("read-refs")
    loss = s.lost(3)  # Redis kept frames 0-3 only (an AOF that lost its last second)
    assert (loss.first_frame_index, loss.last_frame_index, loss.dropped, loss.decode_again) == (4, 7, chunks[2:], True)
    assert s.last_written == 3 and s.next_index == 4 and s.in_flight == 0 and s.read is None and s.can_read
    s.inferred(chunks[2], results(chunks[2]))  # a dropped chunk's batch comes back late: ignored
    assert chunks[2].results is None
    s.restart("decoder-2", counted=False)  # a new decoder from frame 4, not counted against max_restarts
    assert (s.decoder_start, s.restarts) == (4, 0)
    again = chunk(4, 8)
    read(s, again, finished=True)
    s.inferred(again, results(again))
    assert write(s) == list(range(4, 12)) and s.end() and s.status == "eos"


def test_a_live_source_goes_on_after_what_redis_lost():
    s = SourceState(SourceConfig(id="a", url="udp://127.0.0.1:5000"), "decoder-1", "node", last_written=9)
    first, second = chunk(10, 2), chunk(12, 2)
    read(s, first)
    read(s, second)
    s.inferred(first, results(first))
    assert write(s) == [10, 11]
    loss = s.lost(None)  # restarted empty: everything is gone, and cannot be sent again
    assert (loss.first_frame_index, loss.last_frame_index, loss.dropped, loss.decode_again) == (0, 11, [], False)
    assert s.last_written is None and list(s.pending) == [second] and s.next_index == 14 and s.can_read


@pytest.mark.parametrize("change", [SourceState.stop, SourceState.remove, SourceState.decoder_failed])
def test_a_file_source_that_decodes_no_more_ends_where_redis_kept_it(change):
    s = state()
    first, second = chunk(0, 2), chunk(2, 2)
    read(s, first)
    read(s, second)
    s.inferred(first, results(first))
    write(s)
    change(s)
    loss = s.lost(None)
    assert loss.dropped == [second] and not loss.decode_again and s.finished and s.last_written is None
    # No eos: a later run resumes the source where Redis has it (a removed source becomes a stopped one).
    assert s.end() is False and s.status == ("error" if change is SourceState.decoder_failed else "stopped")


def test_redis_cannot_have_lost_what_was_not_written():
    s = state(last_written=5)
    with pytest.raises(ValueError, match="cannot have lost"):
        s.lost(5)
    with pytest.raises(ValueError, match="cannot have lost"):
        state().lost(None)
