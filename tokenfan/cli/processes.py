"""Components as child processes: start one, wait until it says it is ready, stop or kill it.

`tokenfan up` runs the system this way, and so do the tests and benchmarks: every component is a real
process that can be killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["ChildProcess"]


class ChildProcess:
    """``python -m tokenfan ROLE ARGS --ready-file F`` with its own environment."""

    def __init__(
        self,
        role: str,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        stderr: IO[bytes] | int | None = None,
        name: str | None = None,
    ) -> None:
        self.role = role
        self.name = name or role
        self.args = list(args)
        self.env = dict(os.environ if env is None else env)
        self.stderr = stderr
        self._directory = Path(tempfile.mkdtemp(prefix=f"tokenfan-{role}-"))
        self.ready_file = self._directory / "ready.json"
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        #: What the ready file said: ``url``, ``pid``, and ``metrics`` when the process serves metrics.
        self.ready: dict[str, Any] = {}

    def start(self) -> ChildProcess:
        self.ready_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "tokenfan", self.role, *self.args, "--ready-file", str(self.ready_file)],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )
        return self

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Block until the ready file appears; raises RuntimeError if the process dies or takes too long."""
        deadline = time.monotonic() + timeout
        assert self.process is not None, "start() first"
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                self.ready = json.loads(self.ready_file.read_text())
                self.url = str(self.ready["url"])
                return self.url
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} before it was ready")
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} was not ready within {timeout}s")

    @property
    def metrics_url(self) -> str:
        """Where the process serves ``GET /metrics`` (started with ``--metrics-port``), once ready."""
        return str(self.ready["metrics"])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, the crash a fault test wants: no cleanup code of the child runs."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`. Returns the exit code."""
        if self.process is None:
            return None
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode
