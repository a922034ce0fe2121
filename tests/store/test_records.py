"""What the store answers: a generation's record, read from its hash. Pure: no Redis."""

from __future__ import annotations

import json

from tokenfan.contract.events import GenerationStatus
from tokenfan.store import GenerationRecord


def test_a_finished_generations_record_and_its_json() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    calls = [{"index": 0, "id": "c", "name": "f", "arguments": "{}"}]
    raw = {
        b"status": b"completed",
        b"attempt": b"2",
        b"seq": b"9",
        b"model": b"m",
        b"created_ms": b"1",
        b"started_ms": b"2",
        b"finished_ms": b"3",
        b"finish_reason": b"stop",
        b"usage": json.dumps(usage).encode(),
        b"tool_calls": json.dumps(calls).encode(),
        b"first_offset": b"e:1-0",
        b"last_offset": b"e:3-0",
    }
    record = GenerationRecord.from_fields("s", "g", raw, "héllo".encode(), b"why")
    assert (record.status, record.attempt, record.seq) == (GenerationStatus.COMPLETED, 2, 9)
    assert (record.text, record.reasoning, record.tool_calls, record.usage) == ("héllo", "why", calls, usage)
    assert (record.error, record.cancel_requested) == (None, None)
    assert record.as_json() == {
        "generation_id": "g",
        "session_id": "s",
        "status": "completed",
        "text": "héllo",
        "reasoning": "why",
        "tool_calls": calls,
        "model": "m",
        "attempt": 2,
        "seq": 9,
        "finish_reason": "stop",
        "usage": usage,
        "error": None,
        "created_at_ms": 1,
        "started_at_ms": 2,
        "finished_at_ms": 3,
        "first_offset": "e:1-0",
        "last_offset": "e:3-0",
    }


def test_a_queued_generations_record_has_only_what_is_known() -> None:
    record = GenerationRecord.from_fields("s", "g", {b"status": b"queued", b"cancel_requested": b"user"}, b"")
    assert record.status is GenerationStatus.QUEUED
    assert (record.attempt, record.seq, record.tool_calls) == (0, 0, [])
    assert (record.model, record.finish_reason, record.usage, record.started_ms) == (None, None, None, None)
    assert record.cancel_requested == "user"
