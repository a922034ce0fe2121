"""Catch-up pages onto real WebSockets: one write of the page's encoding, made once for every connection."""

from __future__ import annotations

import json

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from api.live.frames import FrameBatch
from api.relay.wire import send_batch, websocket_wire
from tokenfan.contract.events import StreamEntry
from tokenfan.contract.offsets import StreamId


def page(count: int) -> FrameBatch:
    """`count` entries that are not deltas, so each is a frame of its own."""
    return FrameBatch(
        [StreamEntry(StreamId(1_000 + n, 0), b"e1", b'{"type":"x.note","n":%d}' % n) for n in range(count)]
    )


async def test_a_page_goes_out_in_one_write_of_an_encoding_shared_by_every_connection() -> None:
    batch = page(3)
    writes: list[int] = []
    answers: list[bool] = []

    async def handler(websocket: ServerConnection) -> None:
        transport = websocket.transport
        write = transport.write

        def counted(data: bytes | bytearray | memoryview) -> None:
            writes.append(len(data))
            write(data)

        transport.write = counted  # type: ignore[method-assign]
        answers.append(await send_batch(websocket, batch, max_bytes=1 << 16))
        answers.append(await send_batch(websocket, page(3), max_bytes=10))  # too large: sends nothing
        transport.write = write  # type: ignore[method-assign]
        await websocket.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        for _ in range(2):
            async with connect(f"ws://127.0.0.1:{port}", compression=None) as client:
                received = [json.loads(await client.recv()) for _ in range(3)]
                assert [frame["n"] for frame in received] == [0, 1, 2]
                assert [frame["offset"] for frame in received] == [f"e1:{1_000 + n}-0" for n in range(3)]
    assert answers == [True, False, True, False]
    encoded = batch.encoded(websocket_wire)
    assert writes == [len(encoded), len(encoded)]  # one write per connection, of the same bytes
    assert batch.encoded(websocket_wire) is encoded  # made once
