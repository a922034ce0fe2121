"""Frames onto WebSockets: each batch serialized once for every connection, in one write per connection."""

from __future__ import annotations

from collections.abc import AsyncIterator

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from api.live.frames import FrameBatch

__all__ = ["FRAGMENT_BYTES", "fragments", "send_wire", "websocket_wire", "write_batch"]

#: Frames larger than this are sent as fragments of this size.
FRAGMENT_BYTES = 16_384


def websocket_wire(frames: list[bytes]) -> bytes:
    """Text frames as a server puts them on the wire: unmasked, so the same bytes for every connection."""
    return b"".join(Frame(Opcode.TEXT, frame).serialize(mask=False) for frame in frames)


def write_batch(websocket: ServerConnection, batch: FrameBatch) -> None:
    """Write a batch's frames as `websockets.broadcast` of each frame would, but cheaper.

    The relay negotiates no extension, so each frame is serialized once per batch by websockets' own
    `Frame.serialize` (`FrameBatch.encoded`), and all of a batch's frames reach the connection in one
    transport write (one system call, not one per frame). A connection that is not open, or in any state
    where the library's own path could behave otherwise (a fragmented send in progress, an extension,
    pending protocol output), goes through `broadcast`.

    This runs for every subscriber of every live batch: `_writable`'s checks are made here inline, the
    transport's ``write`` is the only call on the common path besides the batch's (cached) encoding.
    """
    protocol = websocket.protocol
    if (
        protocol.state is State.OPEN
        and websocket.send_in_progress is None
        and not protocol.writes
        and not protocol.extensions
        and not protocol.expect_continuation_frame
    ):
        try:
            websocket.transport.write(batch.encoded(websocket_wire))
        except Exception as exc:  # as broadcast: one failed write must not stop the others
            websocket.logger.warning("skipped broadcast: failed to write message: %r", exc)
    else:
        for frame in batch.frames:
            broadcast([websocket], frame, text=True)


def _writable(websocket: ServerConnection) -> bool:
    """Whether bytes written straight to the transport are what websockets itself would write now (made
    inline by `write_batch`: keep the two alike)."""
    protocol = websocket.protocol
    return (
        protocol.state is State.OPEN
        and websocket.send_in_progress is None
        and not protocol.writes
        and not protocol.extensions
        and not protocol.expect_continuation_frame
    )


async def send_wire(websocket: ServerConnection, wires: list[bytes]) -> bool:
    """Write encoded frames (`FrameBatch.encoded`, made once for every connection catching up over the same
    pages) in one transport write, then wait while the socket is above its high-water mark, as
    `websocket.send` does after each frame. Returns False, having sent nothing, when the connection is not
    simply open: send frame by frame then."""
    if not _writable(websocket):
        return False
    websocket.transport.writelines(wires)
    await websocket.drain()
    return True


async def fragments(frame: bytes, size: int) -> AsyncIterator[bytes]:
    """`frame` in pieces of at most `size` bytes, never cutting a UTF-8 character in two."""
    start = 0
    while start < len(frame):
        end = min(start + size, len(frame))
        while end < len(frame) and frame[end] & 0xC0 == 0x80:  # a continuation byte: back up
            end -= 1
        yield frame[start:end]
        start = end
