"""Fixtures the system tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tokenfan.cli.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="module")
def queue() -> Iterator[EmbeddedRedis]:
    """A plain Redis for the job queue of a module's own cluster stack: one per module, so that no other
    stack's workers (the session's cluster stack polls `queue_redis`) take its jobs."""
    with EmbeddedRedis() as server:
        yield server
