"""What a script call did, as the server saw it: MONITOR lists each call, then every command it ran."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

_LINE = re.compile(rb"^\S+ \[\d+ (?P<client>[^\]]+)\] (?P<args>.*)$")
_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|.)")
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}


def _unescape(match: re.Match[bytes]) -> bytes:
    code = match.group(1)
    if code.startswith(b"x") and len(code) == 3:
        return bytes([int(code[1:], 16)])
    return _ESCAPES.get(code, code)


def parse_line(line: bytes) -> tuple[str, list[bytes]]:
    """A MONITOR line as (client, arguments): the client is 'lua' for a command a script ran."""
    match = _LINE.match(line)
    assert match is not None, line
    args = [_ESCAPE.sub(_unescape, raw) for raw in _ARG.findall(match.group("args"))]
    return match.group("client").decode(), args


@dataclass
class ScriptCall:
    sha: str
    keys: list[bytes]  # what the call declared in KEYS
    commands: list[list[bytes]] = field(default_factory=list)  # what the script ran, in order


class ScriptMonitor:
    """Records every script call on a server from `start` to `stop`, with the commands each ran."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._connection: AbstractConnection | None = None

    async def start(self) -> None:
        """Returns once the server has confirmed MONITOR: every later command is recorded."""
        pool = self.redis.connection_pool
        self._connection = pool.connection_class(**pool.connection_kwargs)
        await self._connection.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        await self._connection.send_command("MONITOR")
        assert await self._connection.read_response() == b"OK"

    async def stop(self) -> list[ScriptCall]:
        """Every script call since `start`. A marker command sent last tells when all of them were read."""
        assert self._connection is not None
        marker = f"end-of-recording-{uuid.uuid4().hex}".encode()
        await self.redis.echo(marker)
        calls: list[ScriptCall] = []
        current: ScriptCall | None = None
        try:
            while True:
                client, args = parse_line(await self._connection.read_response())
                if args[:2] == [b"ECHO", marker]:
                    return calls
                if client == "lua" and current is not None:
                    current.commands.append(args)
                elif args and args[0].upper() == b"EVALSHA":
                    current = ScriptCall(args[1].decode(), args[3 : 3 + int(args[2])])
                    calls.append(current)
                else:
                    current = None
        finally:
            await self._connection.disconnect()
