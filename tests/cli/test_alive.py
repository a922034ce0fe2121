"""`tokenfan alive FILE`: a worker's liveness probe follows its event loop: fresh while it turns, stale
once the process is frozen, fresh again once it runs."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.support.stack import RunningStack
from tests.support.waiting import wait_until
from tokenfan.cli.embedded_redis import EmbeddedRedis


def probe(path: Path, within: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenfan", "alive", str(path), "--within", str(within)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def until(condition: Callable[[], bool]) -> None:
    wait_until(condition, "the probe never answered as expected", timeout=20, interval=0.1)


def test_the_probe_is_fresh_while_the_worker_runs_and_fails_once_it_is_frozen(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    alive = tmp_path / "worker.alive"
    stack = RunningStack(
        redis_url=redis_server.url,
        extra_env={"TOKENFAN_WORKER_ALIVE_FILE": str(alive), "TOKENFAN_LEASE_SECONDS": "1.5"},
    )
    worker = stack.spawn("worker")
    try:
        worker.wait_ready()
        assert probe(alive, 5).returncode == 0
        worker.process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]  # a hung process
        until(lambda: probe(alive, 2).returncode == 1)
        stale = probe(alive, 2)
        assert "last touched" in stale.stderr
        assert len(stale.stderr.strip().splitlines()) == 1
        worker.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        until(lambda: probe(alive, 2).returncode == 0)
    finally:
        stack.stop()
    missing = probe(tmp_path / "nothing-here", 5)
    assert missing.returncode == 1
    assert "No such file" in missing.stderr
