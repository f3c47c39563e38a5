"""Batching across sources (pipeline/batcher.py): size, timeout from the first frame, frames per source."""
import pytest

from pipeline.batcher import Batcher, Chunk


def chunk(source_id: str, size: int, arrived: float = 0.0) -> Chunk:
    return Chunk(source_id, size, info=None, frames=None, arrived=arrived)


def test_batch_is_sent_when_full():
    batcher = Batcher(max_batch_size=4, timeout_s=10.0)
    batcher.add(chunk("a", 2))
    assert batcher.next_batch(now=0.0) is None
    batcher.add(chunk("b", 2))
    assert [c.source_id for c in batcher.next_batch(now=0.0)] == ["a", "b"]
    assert len(batcher) == 0 and batcher.deadline() is None


def test_partial_batch_is_sent_at_the_timeout_from_its_first_frame():
    batcher = Batcher(max_batch_size=8, timeout_s=0.05)
    batcher.add(chunk("a", 1, arrived=1.0))
    batcher.add(chunk("b", 1, arrived=1.04))
    assert batcher.deadline() == pytest.approx(1.05)
    assert batcher.next_batch(now=1.049) is None
    assert [c.source_id for c in batcher.next_batch(now=1.05)] == ["a", "b"]


def test_frames_per_source_cap_and_arrival_order():
    batcher = Batcher(max_batch_size=4, timeout_s=0.0, max_frames_per_source=2)
    for source_id, size in [("a", 2), ("a", 2), ("b", 1), ("c", 2)]:
        batcher.add(chunk(source_id, size))
    # a's second chunk would give a 4 frames: it waits for the next batch; c does not fit after a + b.
    assert [(c.source_id, c.size) for c in batcher.next_batch(now=0.0)] == [("a", 2), ("b", 1)]
    assert [(c.source_id, c.size) for c in batcher.next_batch(now=0.0)] == [("a", 2), ("c", 2)]
    with pytest.raises(ValueError, match="does not fit"):
        batcher.add(chunk("d", 3))


def test_small_chunks_of_one_source_fill_a_batch_in_order():
    # A compute-bound job reads chunks of one or two frames: several of a source go into one batch.
    batcher = Batcher(max_batch_size=4, timeout_s=0.0)
    for source_id, size in [("a", 1), ("b", 1), ("a", 1), ("b", 1), ("a", 1)]:
        batcher.add(chunk(source_id, size))
    assert [(c.source_id, c.size) for c in batcher.next_batch(now=0.0)] == [("a", 1), ("b", 1), ("a", 1), ("b", 1)]
    # A chunk left out is never overtaken by a later chunk of its source (results are written in frame order).
    batcher = Batcher(max_batch_size=4, timeout_s=0.0)
    for source_id, size in [("a", 3), ("a", 2), ("a", 1), ("b", 1)]:
        batcher.add(chunk(source_id, size))
    assert [(c.source_id, c.size) for c in batcher.next_batch(now=0.0)] == [("a", 3), ("b", 1)]
