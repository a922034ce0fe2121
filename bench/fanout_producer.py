"""The fan-out benchmark's producer as a process of its own, writing through the store of a given copy of the
code (`bench.fanout` part ``tail`` with ``--baseline-code``).

    python bench/fanout_producer.py --code DIR --redis-url URL

A relay and the writes it hears are one piece: the write script appends, records and publishes (how it
publishes changed over time: ``PUBLISH`` to a channel, then ``SPUBLISH`` to a shard channel), and a relay
hears only what its own code's script publishes. So a relay from another copy of the code is fed by that
copy's `Store.write`, imported here from DIR. Its store's surface (accept, start, write) has not changed.

Commands arrive as JSON lines on stdin, each with an ``id`` its answer carries (answers may come out of order:
a run is long, a count of script calls is asked during it):

    {"id": 1, "op": "open", "sessions": [...]}                 accept and start a generation per session
    {"id": 2, "op": "run", "key": S, "rate": R, "start_ns": T, "window": [A, B]}
                                                               the fan-out producer's run (`bench.fanout`)
    {"id": 3, "op": "calls"}                                   script calls made so far
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from typing import Any


def _load_token_content() -> Callable[[int], str]:
    """`bench.fanout_client.token_content` of this checkout (DIR, first on the path, has a `bench` of its own)."""
    spec = spec_from_file_location("fanout_client", Path(__file__).with_name("fanout_client.py"))
    assert spec is not None
    assert spec.loader is not None
    module = module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.token_content  # type: ignore[no-any-return]


token_content = _load_token_content()


@dataclass
class Stream:
    session_id: str
    generation_id: str
    attempt: int
    seq: int = 0
    prefix: str = ""

    def body(self, seq: int, content: str) -> str:
        return f'{self.prefix}{seq},"content":"{content}"}}'


class CodeProducer:
    """`bench.fanout.Producer`'s open and run, through the store of the code on `sys.path` first."""

    def __init__(self, redis_url: str) -> None:
        from redis.asyncio import Redis

        import tokenfan.store as store

        try:
            events, ids = import_module("tokenfan.contract.events"), import_module("tokenfan.contract.ids")
        except ImportError:  # the code before the contract package
            events, ids = import_module("tokenfan.events"), import_module("tokenfan.ids")
        encode_body, event_body, new_generation_id = (
            events.encode_body,
            events.event_body,
            ids.new_generation_id,
        )
        EventType = events.EventType  # noqa: N806
        self.mod = store
        self.delta = EventType.DELTA
        self.encode_body, self.event_body, self.new_generation_id = encode_body, event_body, new_generation_id
        self.redis = Redis.from_url(redis_url, client_name="bench-producer")
        self.store = store.Store(self.redis, session_ttl_seconds=3600, stream_max_length=100_000)
        self.write_calls = 0
        self.prepared: dict[str, list[Stream]] = {}

    async def open(self, session_ids: list[str]) -> int:
        async def one(session_id: str) -> Stream:
            generation_id = self.new_generation_id()
            await self.store.accept(session_id, generation_id, request={"bench": True}, model="bench")
            start = await self.store.start(session_id, generation_id)
            assert start.outcome is self.mod.StartOutcome.STARTED, start
            stream = Stream(session_id, generation_id, start.attempt)
            sample = self.encode_body(
                self.event_body(
                    self.delta, session_id=session_id, generation_id=generation_id, seq=7, content="c"
                )
            )
            stream.prefix = sample[: sample.index('"seq":') + 6]
            assert stream.body(7, "c") == sample
            return stream

        streams: list[Stream] = []
        for at in range(0, len(session_ids), 100):
            streams += await asyncio.gather(*(one(s) for s in session_ids[at : at + 100]))
        self.prepared[session_ids[0]] = streams
        return len(streams)

    async def write(self, streams: list[Stream], counts: list[int]) -> int:
        now = time.time_ns()
        content = token_content(now)
        items = []
        for stream, count in zip(streams, counts, strict=True):
            events = []
            for _ in range(count):
                stream.seq += 1
                events.append(self.mod.EventWrite(stream.seq, stream.body(stream.seq, content), content))
            items.append(self.mod.WriteItem(stream.session_id, stream.generation_id, stream.attempt, events))
        await self.store.write(items)
        self.write_calls += 1  # one Redis: one script call per write
        return now

    async def run(self, key: str, rate: float, start_ns: int, window: tuple[int, int]) -> int:
        """As `bench.fanout.Producer.run`."""
        streams = self.prepared.pop(key)
        total_rate = rate * len(streams)
        cursor = appended = in_window = 0
        await asyncio.sleep(max(0.0, (start_ns - time.time_ns()) / 1e9))
        while True:
            now = time.time_ns()
            if now >= window[1]:
                return in_window
            due = int((now - start_ns) / 1e9 * total_rate) - appended
            if due <= 0:
                await asyncio.sleep(max(0.0005, (appended + 1) / total_rate - (now - start_ns) / 1e9))
                continue
            counts: dict[int, int] = {}
            for k in range(due):
                index = (cursor + k) % len(streams)
                counts[index] = counts.get(index, 0) + 1
            cursor = (cursor + due) % len(streams)
            sent_at = await self.write([streams[i] for i in counts], list(counts.values()))
            appended += due
            if window[0] <= sent_at < window[1]:
                in_window += due


async def serve(producer: CodeProducer) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(request_id: int, body: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps({"id": request_id, **body}) + "\n")
        sys.stdout.flush()

    async def handle(request: dict[str, Any]) -> None:
        op = request["op"]
        if op == "open":
            answer(request["id"], {"streams": await producer.open(request["sessions"])})
        elif op == "run":
            window = (int(request["window"][0]), int(request["window"][1]))
            in_window = await producer.run(request["key"], request["rate"], int(request["start_ns"]), window)
            answer(request["id"], {"in_window": in_window})
        elif op == "calls":
            answer(request["id"], {"write_calls": producer.write_calls})

    tasks: set[asyncio.Task[None]] = set()
    answer(0, {"ready": True})
    while line := await reader.readline():
        task = asyncio.create_task(handle(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await producer.redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--code", type=Path, required=True, help="the copy of the code whose store writes")
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(args.code.resolve()))
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        runner.run(serve(CodeProducer(args.redis_url)))


if __name__ == "__main__":
    main()
