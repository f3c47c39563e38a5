"""The job's scheduling decisions: how much to read from which source, which worker gets a batch
(pipeline/scheduling.py), and how the job applies them."""
from pipeline.batcher import Batcher, Chunk
from pipeline.config import BatchingConfig, load_config
from pipeline.scheduling import free_worker, read_size


def chunk(source_id: str, size: int, arrived: float = 0.0) -> Chunk:
    return Chunk(source_id, size, info=None, frames=None, arrived=arrived)


class RecordingDecoder:
    """Stands in for a decoder actor handle: records the frame counts the runner asks `read()` for."""

    def __init__(self):
        self.asked: list[int] = []
        self.read = self

    def options(self, **_):
        return self

    def remote(self, max_frames: int, wait_s: float):
        self.asked.append(max_frames)
        return ["info-ref", "frames-ref"]


def test_live_sources_are_read_in_fair_shares_and_only_once_their_last_frames_left_the_batcher():
    """Files are read up to the per-source cap; live (drop_oldest) sources a fair share of a batch each, and not
    while a chunk of theirs still waits in the batcher, so their backlog stays in the decoder (newest kept)."""
    from pipeline.runner import Job
    from pipeline.source_state import SourceState

    config = load_config(env={}, overrides={"batching": {"max_batch_size": 8}, "sources": [
        {"id": "file", "url": "a.mp4"}, *({"id": f"cam{i}", "url": f"udp://127.0.0.1:{5000 + i}"} for i in range(3))]})
    job = Job(config, sink=None)
    job.batchers = {"node": Batcher(8, timeout_s=1.0)}
    job.sources = {s.id: SourceState(s, RecordingDecoder(), "node") for s in config.sources}
    job._issue_reads()
    assert {i: run.decoder.asked for i, run in job.sources.items()} == {
        "file": [8], "cam0": [3], "cam1": [3], "cam2": [3]}  # 3 cameras: ceil(8 / 3) frames each
    for run in job.sources.values():
        run.read = None  # the reads came back; cam0's and the file's chunks wait in the batcher
    job.batchers["node"].add(chunk("cam0", 3))
    job.batchers["node"].add(chunk("file", 8))
    job._issue_reads()
    assert {i: run.decoder.asked for i, run in job.sources.items()} == {
        "file": [8, 8], "cam0": [3], "cam1": [3, 3], "cam2": [3, 3]}


def test_a_block_source_is_read_up_to_its_cap_and_never_past_the_in_flight_limit():
    batching = BatchingConfig(max_batch_size=8, max_in_flight_per_source=20)
    assert [read_size(in_flight, batching) for in_flight in (0, 12, 15, 19, 20, 25)] == [8, 8, 5, 1, 0, 0]
    capped = BatchingConfig(max_batch_size=8, max_frames_per_source=3)
    assert read_size(0, capped) == 3  # a batch takes no more of one source


def test_a_live_source_is_read_in_its_fair_share_and_not_while_its_frames_wait():
    batching = BatchingConfig(max_batch_size=8, max_in_flight_per_source=20)
    assert [read_size(0, batching, live_on_node=n) for n in (1, 2, 3, 5, 9)] == [8, 4, 3, 2, 1]
    assert read_size(0, batching, live_on_node=3, waiting=True) == 0
    assert read_size(18, batching, live_on_node=2) == 2  # the in-flight limit still holds
    assert read_size(0, batching, waiting=True) == 8  # a block source's waiting frames do not hold it back


def test_the_least_busy_worker_of_the_node_gets_the_batch():
    node = [2, 3]  # worker indices on this node
    assert free_worker(node, [], batches_per_worker=2) == 2  # a tie: the first
    assert free_worker(node, [2], batches_per_worker=2) == 3
    assert free_worker(node, [2, 3, 3], batches_per_worker=2) == 2
    assert free_worker(node, [2, 2, 3, 3], batches_per_worker=2) is None  # every one has its batches in flight
    assert free_worker(node, [0, 0, 1, 1, 1], batches_per_worker=1) == 2  # other nodes' batches do not count
