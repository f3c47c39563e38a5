"""Reading results back: FrameResults of one source as pydantic objects, plainly or through a consumer group.

Without a group the subscriber reads the stream from its start; a new group also starts there. With a group it
gets at-least-once delivery: an entry is acknowledged when the loop asks for the next one, so an entry whose
handler crashed stays pending (with the rest of the up to 100 entries read ahead with it). On start it first
re-reads its own pending entries, then claims entries other consumers left pending longer than `claim_idle_ms`
(XAUTOCLAIM), then reads new ones. Iteration ends after the `eos` entry (acknowledged too), or, when `block_ms`
is set, once that long passes without a new entry.
"""
import argparse
import sys
from collections.abc import Iterator

import redis

from pipeline.redis_server import resolve_redis_url
from pipeline.schema import FrameResult
from pipeline.sink import connect
from pipeline.wire import DEFAULT_PREFIX, JSON_FIELD, TYPE_FIELD, frames_key

_BATCH = 100


class Subscriber:
    def __init__(self, client: redis.Redis, source_id: str, prefix: str = DEFAULT_PREFIX, group: str | None = None,
                 consumer: str | None = None, claim_idle_ms: int = 60_000, block_ms: int | None = None):
        if (group is None) != (consumer is None):
            raise ValueError("a consumer group needs both group and consumer names")
        self.client = client
        self.key = frames_key(prefix, source_id)
        self.group = group
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.block_ms = block_ms

    def __iter__(self) -> Iterator[FrameResult]:
        entries = self._group_entries() if self.group else self._plain_entries()
        for entry_id, fields in entries:
            if fields.get(TYPE_FIELD) == "eos":
                self._ack(entry_id)
                return
            yield FrameResult.model_validate_json(fields[JSON_FIELD])
            self._ack(entry_id)  # the loop body finished with this entry

    def _plain_entries(self) -> Iterator[tuple[str, dict]]:
        cursor = "0-0"
        while True:
            reply = self.client.xread({self.key: cursor}, count=_BATCH, block=self._block())
            if not reply:
                if self.block_ms is not None:
                    return
                continue
            for entry_id, fields in reply[0][1]:
                cursor = entry_id
                yield entry_id, fields

    def _group_entries(self) -> Iterator[tuple[str, dict]]:
        try:
            self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        yield from self._read_group("0")  # our own pending entries (a restart after a crash)
        yield from self._claim_stale()
        while True:
            got = False
            for entry in self._read_group(">", block=self._block()):
                got = True
                yield entry
            if not got and self.block_ms is not None:
                return

    def _read_group(self, cursor: str, block: int | None = None) -> Iterator[tuple[str, dict]]:
        while True:
            reply = self.client.xreadgroup(self.group, self.consumer, {self.key: cursor}, count=_BATCH, block=block)
            entries = reply[0][1] if reply else []
            for entry_id, fields in entries:
                if cursor != ">":
                    cursor = entry_id
                if fields:  # a pending entry trimmed away by MAXLEN comes back with no fields
                    yield entry_id, fields
                else:
                    self._ack(entry_id)
            if cursor == ">" or not entries:
                return

    def _claim_stale(self) -> Iterator[tuple[str, dict]]:
        start = "0-0"
        while True:
            start, entries, _deleted = self.client.xautoclaim(self.key, self.group, self.consumer,
                                                              self.claim_idle_ms, start_id=start, count=_BATCH)
            yield from ((entry_id, fields) for entry_id, fields in entries if fields)
            if start == "0-0":
                return

    def _ack(self, entry_id: str) -> None:
        if self.group:
            self.client.xack(self.key, self.group, entry_id)

    def _block(self) -> int:
        return 0 if self.block_ms is None else self.block_ms


# --- `cdetr subscribe` ---

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source_id", metavar="SOURCE_ID")
    parser.add_argument("--group", help="consumer group (at-least-once delivery with acks)")
    parser.add_argument("--consumer", help="consumer name within --group")
    parser.add_argument("--redis-url", help="redis://, rediss:// or redis+sentinel:// URL (default: the local server)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="stream key prefix")


def run(args: argparse.Namespace) -> int:
    if (args.group is None) != (args.consumer is None):
        print("cdetr subscribe: --group and --consumer go together", file=sys.stderr)
        return 2
    client = connect(resolve_redis_url(args.redis_url))
    for result in Subscriber(client, args.source_id, args.prefix, args.group, args.consumer):
        print(result.model_dump_json(), flush=True)
    return 0
