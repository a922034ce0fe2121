"""Proof of exact delivery: what a subscriber got, compared with what the session's stream holds."""

from __future__ import annotations

import json
from typing import Any

from tokenfan.client.transcript import Transcript

Coverage = list[tuple[str, int]]


def coverage(frames: list[dict[str, Any]]) -> Coverage:
    """The (generation, seq) pairs the event frames carry, in order; a merged delta covers seq_start..seq."""
    covered: Coverage = []
    for frame in frames:
        if "seq" in frame:
            first = int(frame.get("seq_start", frame["seq"]))
            covered += [(frame["generation_id"], seq) for seq in range(first, int(frame["seq"]) + 1)]
    return covered


async def stream_contents(redis: Any, session_id: str) -> tuple[list[str], Coverage]:
    """Every offset the session's stream holds, and the (generation, seq) of each entry, in order."""
    from tokenfan.contract.keys import SessionKeys

    offsets, covered = [], []
    for entry_id, fields in await redis.xrange(SessionKeys(session_id).events):
        offsets.append(f"{fields[b'e'].decode()}:{entry_id.decode()}")
        body = json.loads(fields[b"d"])
        covered.append((body["generation_id"], body["seq"]))
    return offsets, covered


async def assert_exact_delivery(redis: Any, session_id: str, frames: list[dict[str, Any]]) -> None:
    """What a subscriber got is the session's stream: every event once, in order, no gap, no duplicate,
    each frame at a real offset, ending at the stream's last one."""
    offsets, covered = await stream_contents(redis, session_id)
    assert coverage(frames) == covered
    assert all(frame["offset"] in offsets for frame in frames)
    assert frames[-1]["offset"] == offsets[-1]


def transcript_of(frames: list[dict[str, Any]]) -> Transcript:
    """`frames` assembled in order: raises `TranscriptError` on a gap, a duplicate or a bad checksum."""
    transcript = Transcript()
    for frame in frames:
        transcript.apply(frame)
    return transcript
