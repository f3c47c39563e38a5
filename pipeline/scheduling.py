"""The job's scheduling decisions as pure functions: how many frames to read from a source now, and which worker
gets a node's next batch. No Ray here, so the rules are tested on their own (tests/test_pipeline_scheduling.py).
"""
import math
from collections.abc import Iterable

from pipeline.config import BatchingConfig


def read_size(in_flight: int, batching: BatchingConfig, live_on_node: int = 0, waiting: bool = False) -> int:
    """How many frames to ask a source's decoder for now (0: not now), given its `in_flight` frames (read but not
    yet written).

    Every source: at most `batching.source_cap` (what one batch takes of a source), and never more than
    `max_in_flight_per_source` frames between decoding and Redis. That bounds memory and leaves the backlog, and so
    the backpressure, in the decoder.
    A live (`drop_oldest`) source: `live_on_node` is the number of live sources on its home node, itself included
    (0 for a `block` source). Its frames should wait in its decoder, where drop_oldest keeps only the newest; read
    early they would age in the batcher (bench/RESULTS.md 5b). So it is read only while none of its frames are
    `waiting` in the batcher, and only its fair share of a batch.
    """
    n = max(0, min(batching.source_cap, batching.max_in_flight_per_source - in_flight))
    if live_on_node:
        if waiting:
            return 0
        n = min(n, math.ceil(batching.max_batch_size / live_on_node))
    return n


def free_worker(workers: list[int], busy: Iterable[int], batches_per_worker: int) -> int | None:
    """Which of a node's `workers` gets its next batch: the one with the fewest batches in flight (the first of
    them on a tie), or None while each has `batches_per_worker`. `busy` holds the worker of each batch in flight,
    on any node."""
    load = dict.fromkeys(workers, 0)
    for worker in busy:
        if worker in load:
            load[worker] += 1
    best = min(load, key=load.__getitem__)
    return best if load[best] < batches_per_worker else None
