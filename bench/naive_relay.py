"""Reference for the fan-out benchmark: a naive relay, one blocking Redis read loop per subscriber.

    python -m bench.naive_relay --redis-url redis://... --port 0 --ready-file F

Same URL shape as the relay (``/v1/sessions/{id}/stream[?after=<offset>]``) and the same frames: each
subscriber runs ``XREAD BLOCK`` on the session's stream on its own Redis connection (redis-py's pool hands
every blocked read its own connection), turns each batch into frames with the relay's own `frames_for`
(so backlogs are merged exactly as the relay merges them) and awaits each send. No shared reader, no
pub/sub, no broadcast: Redis reads and frame encoding grow with subscribers instead of sessions. Nothing
else of the relay (handoff, gap repair, epochs, slow policy) is reproduced; it only has to be fast.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis.asyncio import Redis
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from api.live.frames import frames_for
from tokenfan.contract.events import StreamEntry
from tokenfan.contract.keys import SessionKeys
from tokenfan.contract.offsets import StreamId, parse_offset
from tokenfan.runtime.serving import bound_url, install_stop_signals, write_ready_file

#: Entries per XREAD, as the relay's catch-up page.
PAGE = 512


async def main(redis_url: str, port: int, ready_file: str | None) -> None:
    redis = Redis.from_url(redis_url, max_connections=20_000)

    async def handle(websocket: ServerConnection) -> None:
        assert websocket.request is not None
        url = urlsplit(websocket.request.path)
        session_id = url.path.split("/")[3]
        after = parse_qs(url.query).get("after")
        key = SessionKeys(session_id).events
        last = str(parse_offset(after[0]).stream_id) if after else "0-0"
        try:
            while websocket.state is State.OPEN:
                reply = await redis.xread({key: last}, count=PAGE, block=1000)
                if not reply:
                    continue
                rows = reply[0][1]
                entries = [StreamEntry(StreamId.parse(i), f[b"e"], f[b"d"]) for i, f in rows]
                for frame in frames_for(entries):
                    await websocket.send(frame, text=True)
                last = rows[-1][0].decode()
        except ConnectionClosed:
            pass

    stop = asyncio.Event()
    install_stop_signals(stop.set)
    async with serve(
        handle, "127.0.0.1", port, ping_interval=20, ping_timeout=20, max_size=65_536, compression=None
    ) as server:
        write_ready_file(ready_file, bound_url(next(iter(server.sockets)), "ws"), role="naive_relay")
        await stop.wait()
    await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file")
    args = parser.parse_args()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(args.redis_url, args.port, args.ready_file))
