"""Transcript: assembling a session from frames, refusing anything a correct stream never produces."""

from __future__ import annotations

from typing import Any

import pytest

from tokenfan.client.transcript import Transcript, TranscriptError
from tokenfan.contract.events import EventType, GenerationStatus, text_sha256

GEN_A = "gen_01JD3Q4Z5X6Y7W8V9T0S1R2P3N"
GEN_B = "gen_01JD3Q4Z5X6Y7W8V9T0S1R2P3P"


class Frames:
    """Builds frames the way the relay sends them: offsets increasing within one epoch."""

    def __init__(self, epoch: str = "ep1", ms: int = 1_732_406_400_000) -> None:
        self.epoch = epoch
        self.ms = ms
        self.seq_of: dict[str, int] = {}

    def frame(self, event_type: EventType, generation_id: str = GEN_A, **fields: Any) -> dict[str, Any]:
        self.ms += 1
        seq = fields.pop("seq", self.seq_of.get(generation_id, 0) + 1)
        self.seq_of[generation_id] = seq
        return {
            "offset": f"{self.epoch}:{self.ms}-0",
            "type": event_type.value,
            "session_id": "s1",
            "generation_id": generation_id,
            "seq": seq,
            **fields,
        }

    def completed(
        self,
        text: str,
        generation_id: str = GEN_A,
        *,
        reasoning: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """``generation.completed`` as the worker writes it, stating `text`, and `reasoning` and
        `tool_calls` (``index``, ``id``, ``name``, ``arguments``) when given."""
        values: dict[str, Any] = {
            "finish_reason": "stop",
            "usage": {"completion_tokens": 3},
            "length": len(text),
            "sha256": text_sha256(text),
        }
        if reasoning is not None:
            values.update(reasoning_length=len(reasoning), reasoning_sha256=text_sha256(reasoning))
        if tool_calls:
            values["tool_calls"] = [tool_call_digest(**call) for call in tool_calls]
        values.update(fields)
        return self.frame(EventType.GENERATION_COMPLETED, generation_id, **values)


def tool_call_digest(index: int, id: str | None, name: str | None, arguments: str) -> dict[str, Any]:
    return {
        "index": index,
        "id": id,
        "name": name,
        "length": len(arguments),
        "sha256": text_sha256(arguments),
    }


def apply_all(frames: list[dict[str, Any]]) -> Transcript:
    transcript = Transcript()
    for frame in frames:
        transcript.apply(frame)
    return transcript


def test_assembles_each_generation() -> None:
    f = Frames()
    frames = [
        f.frame(EventType.GENERATION_STARTED, attempt=1),
        f.frame(EventType.DELTA, reasoning="Think"),
        f.frame(EventType.DELTA, reasoning="ing.", content="Héllo "),
        f.frame(EventType.DELTA, content="wörld 🎉"),
        f.frame(
            EventType.DELTA,
            tool_calls=[{"index": 0, "id": "call_1", "name": "lookup", "arguments": '{"q":'}],
        ),
        f.frame(EventType.DELTA, tool_calls=[{"index": 0, "arguments": '"x"}'}, {"index": 1, "name": "now"}]),
        f.completed(
            "Héllo wörld 🎉",
            reasoning="Thinking.",
            tool_calls=[
                {"index": 0, "id": "call_1", "name": "lookup", "arguments": '{"q":"x"}'},
                {"index": 1, "id": None, "name": "now", "arguments": ""},
            ],
        ),
        f.frame(EventType.GENERATION_STARTED, GEN_B, attempt=1),
        f.frame(EventType.DELTA, GEN_B, content="second"),
        f.frame(EventType.GENERATION_FAILED, GEN_B, error={"type": "upstream_timeout", "message": "stalled"}),
    ]
    transcript = apply_all(frames)
    assert transcript.frames == len(frames)
    assert transcript.last_offset is not None
    assert str(transcript.last_offset) == frames[-1]["offset"]
    first, second = transcript.generations[GEN_A], transcript.generations[GEN_B]
    assert first.status is GenerationStatus.COMPLETED
    assert first.attempt == 1
    assert first.text == "Héllo wörld 🎉"
    assert first.reasoning_text == "Thinking."
    assert first.tool_calls == {
        0: {"id": "call_1", "name": "lookup", "arguments": '{"q":"x"}'},
        1: {"id": "", "name": "now", "arguments": ""},
    }
    assert first.finish_reason == "stop"
    assert first.usage == {"completion_tokens": 3}
    assert first.last_seq == 7
    assert second.status is GenerationStatus.FAILED
    assert second.text == "second"
    assert second.error == {"type": "upstream_timeout", "message": "stalled"}


def test_apply_returns_the_generation_it_changed() -> None:
    f = Frames()
    transcript = Transcript()
    generation = transcript.apply(f.frame(EventType.GENERATION_STARTED, attempt=1))
    assert generation is transcript.generations[GEN_A]
    assert generation.status is GenerationStatus.RUNNING
    cancelled = transcript.apply(f.frame(EventType.GENERATION_CANCELLED, reason="user"))
    assert cancelled is not None
    assert cancelled.status is GenerationStatus.CANCELLED


def test_a_repeated_offset_is_refused() -> None:
    f = Frames()
    first = f.frame(EventType.DELTA, content="a")
    transcript = apply_all([first])
    repeated = dict(first, seq=2, content="b")  # a new seq, but the same offset: the relay sent it twice
    with pytest.raises(TranscriptError, match="does not follow"):
        transcript.apply(repeated)


def test_an_offset_going_backwards_is_refused() -> None:
    f = Frames()
    early, late = f.frame(EventType.DELTA, content="a"), f.frame(EventType.DELTA, content="b")
    transcript = apply_all([late])
    with pytest.raises(TranscriptError):
        transcript.apply(dict(early, seq=2))


def test_the_same_millisecond_orders_by_sequence() -> None:
    transcript = Transcript()
    base = {"type": "delta", "session_id": "s", "generation_id": GEN_A}
    transcript.apply({**base, "offset": "e:5-0", "seq": 1, "content": "a"})
    transcript.apply({**base, "offset": "e:5-1", "seq": 2, "content": "b"})
    with pytest.raises(TranscriptError):
        transcript.apply({**base, "offset": "e:5-1", "seq": 3, "content": "c"})
    assert transcript.generations[GEN_A].text == "ab"


def test_a_seq_gap_is_refused() -> None:
    f = Frames()
    transcript = apply_all([f.frame(EventType.DELTA, content="a", seq=1)])
    with pytest.raises(TranscriptError, match="a gap"):
        transcript.apply(f.frame(EventType.DELTA, content="c", seq=3))


def test_a_repeated_seq_is_refused() -> None:
    f = Frames()
    transcript = apply_all([f.frame(EventType.DELTA, content="a", seq=1), f.frame(EventType.DELTA, seq=2)])
    with pytest.raises(TranscriptError, match="a duplicate"):
        transcript.apply(f.frame(EventType.DELTA, content="a", seq=2))
    with pytest.raises(TranscriptError, match="a duplicate"):
        transcript.apply(f.frame(EventType.DELTA, content="a", seq=1))


def test_completed_with_the_wrong_length_is_refused() -> None:
    f = Frames()
    transcript = apply_all([f.frame(EventType.DELTA, content="abc")])
    with pytest.raises(TranscriptError, match="3 characters"):
        transcript.apply(f.completed("abc", length=4))
    assert transcript.generations[GEN_A].status is not GenerationStatus.COMPLETED


def test_completed_with_the_wrong_sha256_is_refused() -> None:
    f = Frames()
    transcript = apply_all([f.frame(EventType.DELTA, content="abc")])
    with pytest.raises(TranscriptError, match="SHA-256"):
        transcript.apply(f.completed("abc", sha256=text_sha256("abd")))
    assert transcript.generations[GEN_A].status is not GenerationStatus.COMPLETED


def test_length_counts_characters_not_bytes() -> None:
    text = "日本語🎉é"
    f = Frames()
    transcript = apply_all([f.frame(EventType.DELTA, content=text), f.completed(text)])
    assert transcript.generations[GEN_A].status is GenerationStatus.COMPLETED
    assert len(text) == 5


def test_completion_catches_text_the_stream_never_delivered() -> None:
    f = Frames()
    transcript = apply_all([f.frame(EventType.DELTA, content="Hello")])
    with pytest.raises(TranscriptError):
        transcript.apply(f.completed("Hello world"))


def test_restarted_discards_the_output_so_far() -> None:
    f = Frames()
    sources = {"type": "x.sources", "items": ["doc"]}
    frames = [
        f.frame(EventType.GENERATION_STARTED, attempt=1),
        {**f.frame(EventType.DELTA), **sources},  # a hook's event: the new attempt's hooks send it again
        f.frame(EventType.DELTA, content="half an ans", reasoning="r1"),
        f.frame(EventType.DELTA, tool_calls=[{"index": 0, "id": "c1", "name": "f", "arguments": "{"}]),
        f.frame(EventType.GENERATION_RESTARTED, attempt=2),
        f.frame(EventType.GENERATION_STARTED, attempt=2),
        {**f.frame(EventType.DELTA), **sources},
        f.frame(EventType.DELTA, content="the whole answer"),
        f.completed("the whole answer"),
    ]
    transcript = apply_all(frames)
    generation = transcript.generations[GEN_A]
    assert generation.text == "the whole answer"
    assert generation.reasoning_text == ""
    assert generation.tool_calls == {}
    assert [event["items"] for event in generation.other_events] == [["doc"]]
    assert generation.restarts == 1
    assert generation.attempt == 2
    assert generation.status is GenerationStatus.COMPLETED


def test_a_new_epoch_is_accepted_as_a_reset() -> None:
    old, new = Frames("old", ms=5_000), Frames("new", ms=1_000)  # the new stream's ids restart lower
    transcript = apply_all([old.frame(EventType.DELTA, GEN_A, content="a")])
    transcript.apply(new.frame(EventType.DELTA, GEN_B, content="b"))
    assert transcript.last_offset is not None
    assert transcript.last_offset.epoch == "new"
    assert transcript.generations[GEN_B].text == "b"
    # Within the new epoch the ordering rules apply again.
    repeated = new.frame(EventType.DELTA, GEN_B, content="c")
    transcript.apply(repeated)
    with pytest.raises(TranscriptError):
        transcript.apply(dict(repeated, seq=3))


def test_seq_start_on_merged_frames() -> None:
    f = Frames()
    transcript = apply_all(
        [
            f.frame(EventType.DELTA, content="a", seq=1),
            f.frame(EventType.DELTA, content="bcd", seq_start=2, seq=4),  # pieces 2..4 in one frame
            f.frame(EventType.DELTA, content="e", seq=5),
        ]
    )
    generation = transcript.generations[GEN_A]
    assert generation.text == "abcde"
    assert generation.last_seq == 5
    with pytest.raises(TranscriptError, match="a gap"):
        transcript.apply(f.frame(EventType.DELTA, content="h", seq_start=7, seq=8))
    with pytest.raises(TranscriptError, match="a duplicate"):
        transcript.apply(f.frame(EventType.DELTA, content="e", seq_start=5, seq=6))


def test_a_subscriber_may_join_mid_generation() -> None:
    f = Frames()
    transcript = apply_all(
        [f.frame(EventType.DELTA, content="late", seq=41), f.frame(EventType.DELTA, seq=42)]
    )
    assert transcript.generations[GEN_A].last_seq == 42


CALL = {"index": 0, "id": "call_1", "name": "lookup", "arguments": '{"q": "fan-out"}'}


def with_a_tool_call(f: Frames) -> Transcript:
    return apply_all(
        [
            f.frame(EventType.DELTA, content="Looking.", reasoning="I should look it up."),
            f.frame(EventType.DELTA, tool_calls=[{**CALL, "arguments": '{"q": '}]),
            f.frame(EventType.DELTA, tool_calls=[{"index": 0, "arguments": '"fan-out"}'}]),
        ]
    )


def test_completed_proves_the_tool_calls_and_the_reasoning_too() -> None:
    f = Frames()
    transcript = with_a_tool_call(f)
    generation = transcript.apply(
        f.completed("Looking.", reasoning="I should look it up.", tool_calls=[CALL])
    )
    assert generation is not None
    assert generation.status is GenerationStatus.COMPLETED


@pytest.mark.parametrize(
    ("stated", "complaint"),
    [
        ({"tool_calls": [{**CALL, "arguments": '{"q": "fan-in"}'}]}, "tool call 0"),
        ({"tool_calls": [{**CALL, "name": "search"}]}, "tool call 0"),
        ({"tool_calls": [{**CALL, "id": "call_2"}]}, "tool call 0"),
        ({"tool_calls": [CALL, {**CALL, "index": 1}]}, "tool calls"),
        ({"tool_calls": []}, "tool calls"),
        ({"reasoning": "I should look it up!"}, "reasoning"),
    ],
    ids=["arguments", "name", "id", "a call never received", "a call never stated", "reasoning"],
)
def test_completed_refuses_tool_calls_or_reasoning_that_differ_from_what_arrived(
    stated: dict[str, Any], complaint: str
) -> None:
    f = Frames()
    transcript = with_a_tool_call(f)
    values: dict[str, Any] = {"reasoning": "I should look it up.", "tool_calls": [CALL], **stated}
    with pytest.raises(TranscriptError, match=complaint):
        transcript.apply(f.completed("Looking.", **values))
    assert transcript.generations[GEN_A].status is not GenerationStatus.COMPLETED


def test_a_snapshot_keeps_reasoning_and_tool_calls_and_the_end_still_proves_them() -> None:
    f = Frames()
    snapshot = {
        "type": "snapshot",
        "offset": f"{f.epoch}:{f.ms + 1}-0",
        "session_id": "s1",
        "reason": "slow_consumer",
        "generations": [
            {
                "generation_id": GEN_A,
                "status": "running",
                "text": "Look",
                "reasoning": "I should ",
                "tool_calls": [{**CALL, "arguments": '{"q": '}],
                "seq": 4,
                "attempt": 1,
            }
        ],
    }
    f.ms += 1
    f.seq_of[GEN_A] = 4
    transcript = apply_all([snapshot])
    generation = transcript.generations[GEN_A]
    assert (generation.text, generation.reasoning_text) == ("Look", "I should ")
    assert generation.tool_calls == {0: {"id": "call_1", "name": "lookup", "arguments": '{"q": '}}
    transcript.apply(f.frame(EventType.DELTA, content="ing.", reasoning="look it up."))
    transcript.apply(f.frame(EventType.DELTA, tool_calls=[{"index": 0, "arguments": '"fan-out"}'}]))
    transcript.apply(f.completed("Looking.", reasoning="I should look it up.", tool_calls=[CALL]))
    assert generation.status is GenerationStatus.COMPLETED
    assert generation.reasoning_text == "I should look it up."


def test_apps_events_count_their_own_seq_and_a_snapshot_restarts_the_count() -> None:
    frames, transcript = Frames(), Transcript()
    note = EventType.DELTA  # any type: an app's own x.* types are kept as other events
    transcript.apply(frames.frame(EventType.GENERATION_STARTED))
    for _ in range(2):
        transcript.apply({**frames.frame(note, "app"), "type": "x.note"})
    assert [event["seq"] for event in transcript.generations["app"].other_events] == [1, 2]
    with pytest.raises(TranscriptError, match="a gap"):
        transcript.apply({**frames.frame(note, "app", seq=4), "type": "x.note"})
    frames.ms += 10
    snapshot = {"offset": f"ep1:{frames.ms}-0", "type": "snapshot", "generations": []}
    transcript.apply(snapshot)  # skipped app events 3..9
    transcript.apply({**frames.frame(note, "app", seq=10), "type": "x.note"})
    assert transcript.generations["app"].last_seq == 10
