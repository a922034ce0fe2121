"""A TLS terminator for Redis: the embedded server speaks plain TCP."""

from __future__ import annotations

import asyncio
import ssl
import threading


class TlsProxy:
    """A TLS terminator in front of a plain TCP server (Redis has no TLS in the embedded build): clients
    speak TLS to `port`, and the bytes flow both ways to the target. It runs on its own thread and event
    loop, so it outlives the per-test loops; `stop()` closes every connection it holds."""

    def __init__(self, target_host: str, target_port: int, context: ssl.SSLContext) -> None:
        self.target = (target_host, target_port)
        self.context = context
        self.port = 0
        self.accepted = 0  # connections that completed the TLS handshake
        self._thread = threading.Thread(target=self._run, name="tls-proxy", daemon=True)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._transports: set[asyncio.WriteTransport] = set()

    def start(self) -> TlsProxy:
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("the TLS proxy did not start")
        if self._error is not None:
            raise RuntimeError("the TLS proxy failed to start") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=15)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start(); a thread must not raise into pytest
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        handlers: set[asyncio.Task[None]] = set()

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await self._forward(reader, writer)
            finally:
                handlers.discard(task)

        server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=self.context)
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for transport in list(self._transports):  # each handler then ends by itself
                transport.abort()
            await asyncio.gather(*handlers, return_exceptions=True)
            await server.wait_closed()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writers = [writer]
        self._transports.add(writer.transport)
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
            writers.append(target_writer)
            self._transports.add(target_writer.transport)
            await asyncio.gather(_pump(reader, target_writer), _pump(target_reader, writer))
        except OSError:
            pass
        finally:
            for each in writers:
                each.close()
                try:
                    async with asyncio.timeout(2):
                        await each.wait_closed()
                except (TimeoutError, OSError):
                    each.transport.abort()
                self._transports.discard(each.transport)


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except OSError:  # ssl.SSLError and ConnectionError included: the other side went away
        pass
    finally:
        sink.close()
