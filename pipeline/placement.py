"""Placement on a Ray cluster: keep each source's frames on the node of the workers that infer them.

Ray places the detector workers (by `workers.num_gpus` and `workers.resources`); once they run, their nodes are
known. Each source then gets a home node, the worker node with the fewest sources per worker:
- its decoder is created there with a soft `NodeAffinitySchedulingStrategy`, so its model-size frames go through
  that node's shared-memory object store instead of the network. When the node has no room for one more decoder
  (CPU or `decoder.resources`) or is gone, Ray places it elsewhere and the frames cross the network, still
  correct. Soft alone covers only a node that is gone or can never fit a decoder: a node that is merely full would
  make the decoder wait until another source ends (Ray's docstring), hence also `_spill_on_unavailable`;
- its chunks are batched with the other sources of that node only and sent only to that node's workers (the
  runner keeps one Batcher per home node).
Homes are fixed when a source starts: a worker that Ray restarts on another node keeps serving the same sources.
"""
import math

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


def node_of(actor: ray.actor.ActorHandle) -> ray.ObjectRef:
    """A ref to the id of the node the actor runs on; it resolves once the actor's constructor has returned (and
    raises if the constructor failed), so it doubles as a readiness check."""
    return actor.__ray_call__.remote(_current_node)


def _current_node(_actor) -> str:
    return ray.get_runtime_context().get_node_id()


def worker_count(sources: int, streams_per_worker: int | None, max_count: int) -> int:
    """Workers for a job that starts with `sources` sources: one per `streams_per_worker` sources, at least 1 and
    at most `max_count` (always `max_count` when `streams_per_worker` is None)."""
    if streams_per_worker is None:
        return max_count
    return min(max_count, max(1, math.ceil(sources / streams_per_worker)))


class Placement:
    """Home nodes of the running sources, given the node of each worker (by worker index)."""

    def __init__(self, worker_nodes: list[str]):
        if not worker_nodes:
            raise ValueError("placement needs at least one worker")
        self.worker_nodes = worker_nodes
        self.homes: dict[str, str] = {}  # source id -> node id

    @property
    def nodes(self) -> list[str]:
        """The worker nodes, each once, in worker order."""
        return list(dict.fromkeys(self.worker_nodes))

    def workers_on(self, node: str) -> list[int]:
        return [i for i, n in enumerate(self.worker_nodes) if n == node]

    def assign(self, source_id: str) -> NodeAffinitySchedulingStrategy:
        """Choose the source's home node; returns the scheduling strategy for its decoder."""
        def load(node: str) -> float:
            return sum(home == node for home in self.homes.values()) / len(self.workers_on(node))

        self.homes[source_id] = min(self.nodes, key=load)
        return self.strategy(source_id)

    def strategy(self, source_id: str) -> NodeAffinitySchedulingStrategy:
        """Where to create the source's decoder (again, after one died): its home node if it has room."""
        return NodeAffinitySchedulingStrategy(self.homes[source_id], soft=True, _spill_on_unavailable=True)

    def release(self, source_id: str) -> None:
        self.homes.pop(source_id, None)
