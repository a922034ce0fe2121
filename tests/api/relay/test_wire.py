"""Catch-up pages onto real WebSockets: one write for several pages, of encodings made once per page for
every connection."""

from __future__ import annotations

import json
from collections.abc import Iterable

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from api.live.frames import FrameBatch
from api.relay.wire import send_wire, websocket_wire
from tokenfan.contract.events import StreamEntry
from tokenfan.contract.offsets import StreamId


def page(first: int, count: int) -> FrameBatch:
    """`count` entries that are not deltas, so each is a frame of its own."""
    return FrameBatch(
        [
            StreamEntry(StreamId(1_000 + n, 0), b"e1", b'{"type":"x.note","n":%d}' % n)
            for n in range(first, first + count)
        ]
    )


async def test_pages_go_out_in_one_write_of_encodings_shared_by_every_connection() -> None:
    pages = [page(0, 2), page(2, 3)]
    writes: list[int] = []

    async def handler(websocket: ServerConnection) -> None:
        transport = websocket.transport
        writelines = transport.writelines

        def counted(data: Iterable[bytes | bytearray | memoryview]) -> None:
            listed = list(data)
            writes.append(sum(len(piece) for piece in listed))
            writelines(listed)

        transport.writelines = counted  # type: ignore[method-assign,assignment]
        assert await send_wire(websocket, [batch.encoded(websocket_wire) for batch in pages])
        transport.writelines = writelines  # type: ignore[method-assign]
        await websocket.wait_closed()
        assert not await send_wire(websocket, [pages[0].encoded(websocket_wire)])  # closed: sends nothing

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        for _ in range(2):
            async with connect(f"ws://127.0.0.1:{port}", compression=None) as client:
                received = [json.loads(await client.recv()) for _ in range(5)]
                assert [frame["n"] for frame in received] == [0, 1, 2, 3, 4]
                assert [frame["offset"] for frame in received] == [f"e1:{1_000 + n}-0" for n in range(5)]
    encoded = [batch.encoded(websocket_wire) for batch in pages]
    assert writes == [sum(map(len, encoded))] * 2  # one write per connection
    assert all(batch.encoded(websocket_wire) is wire for batch, wire in zip(pages, encoded, strict=True))
