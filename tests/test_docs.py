"""What the documents promise, checked against each other and against the code that keeps the promise."""

from __future__ import annotations

import re
from pathlib import Path

from tokenfan.store.connection import REDIS_VERSION_FLOOR

DOCS = Path(__file__).parents[1] / "docs"


def test_operations_states_one_redis_version_floor_the_stores() -> None:
    text = (DOCS / "OPERATIONS.md").read_text()
    stated = re.findall(r"≥ (\d+\.\d+(?:\.\d+)?) \(Redis\)|Redis (\d+\.\d+(?:\.\d+)?) or newer", text)
    floors = {version for pair in stated for version in pair if version}
    assert len(stated) >= 2, "the processes table and the limits both state the floor"
    assert floors == {REDIS_VERSION_FLOOR}
