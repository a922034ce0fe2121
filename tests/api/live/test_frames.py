"""Frames: an entry alone goes out byte for byte; a run of deltas of one generation goes out as one frame
that loses, reorders and invents nothing (a client assembles exactly what the entries one by one give) and
stops growing at `MAX_MERGED_BYTES`; snapshot and control frames are what the protocol documents; and a
close reason always fits a WebSocket close frame without cutting a character.
"""

from __future__ import annotations

import itertools
import json
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.live.frames import (
    _DELTA_BODY,
    MAX_MERGED_BYTES,
    close_reason,
    control_frame,
    frame_offset_and_type,
    frames_for,
    snapshot_frame,
)
from tests.support.delivery import coverage
from tokenfan.client.transcript import GenerationTranscript, Transcript
from tokenfan.contract.events import EventType, StreamEntry, encode_body, event_body, text_sha256
from tokenfan.contract.offsets import StreamId

SESSION = "s1"
GEN_A = "gen_01JD3Q4Z5X6Y7W8V9T0S1R2P3N"
GEN_B = "gen_01JD3Q4Z5X6Y7W8V9T0S1R2P3P"
EPOCH = "k3y"


class Stream:
    """Appends entries as the worker writes them: bodies from `event_body`, ids increasing, seq per
    generation counting from 1."""

    def __init__(self) -> None:
        self.entries: list[StreamEntry] = []
        self.seq: dict[str, int] = {}
        self.ms = 1_732_406_400_000

    def append(self, event_type: EventType | str, generation_id: str = GEN_A, **fields: Any) -> StreamEntry:
        self.seq[generation_id] = self.seq.get(generation_id, 0) + 1
        body = event_body(
            event_type, session_id=SESSION, generation_id=generation_id, seq=self.seq[generation_id], **fields
        )
        count = len(self.entries)  # two entries share each millisecond: their ids differ in the seq part
        stream_id = StreamId(self.ms + count // 2, count % 2)
        entry = StreamEntry(stream_id, EPOCH.encode(), encode_body(body).encode())
        self.entries.append(entry)
        return entry

    def delta(self, generation_id: str = GEN_A, **fields: Any) -> StreamEntry:
        return self.append(EventType.DELTA, generation_id, **fields)


def parsed(frames: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(frame) for frame in frames]


def body_of(entry: StreamEntry) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(entry.body)
    return value


# --- frames_for


def test_nothing_gives_no_frame() -> None:
    assert frames_for([]) == []


@pytest.mark.parametrize(
    "fields",
    [
        {"content": "Hel"},
        {"reasoning": "hmm", "content": "é 世界 🎉"},
        {"content": "x" * (MAX_MERGED_BYTES * 2)},
    ],
)
def test_an_entry_alone_goes_out_byte_for_byte(fields: dict[str, Any]) -> None:
    entry = Stream().delta(**fields)
    assert frames_for([entry]) == [entry.frame()]


def test_a_run_of_deltas_of_one_generation_goes_out_as_one_frame() -> None:
    stream = Stream()
    stream.append(EventType.GENERATION_STARTED, attempt=1)
    run = [
        stream.delta(reasoning="Let me ", content="Hé"),
        stream.delta(content="llo "),
        stream.delta(tool_calls=[{"index": 0, "id": "call_a", "name": "lookup", "arguments": '{"q":'}]),
        stream.delta(reasoning="think.", tool_calls=[{"index": 0, "arguments": '"x"}'}]),
        stream.delta(
            content="世界",
            tool_calls=[
                {"index": 1, "id": "call_b", "name": "fetch", "arguments": "{}"},
                {"index": 0, "arguments": ""},
            ],
        ),
    ]
    (frame,) = frames_for(run)
    assert json.loads(frame) == {
        "offset": str(run[-1].offset()),
        "type": "delta",
        "session_id": SESSION,
        "generation_id": GEN_A,
        "seq": 6,
        "content": "Héllo 世界",
        "tool_calls": [
            {"index": 0, "id": "call_a", "name": "lookup", "arguments": '{"q":'},
            {"index": 0, "arguments": '"x"}'},
            {"index": 1, "id": "call_b", "name": "fetch", "arguments": "{}"},
            {"index": 0, "arguments": ""},
        ],
        "reasoning": "Let me think.",
        "seq_start": 2,
    }
    assert frame_offset_and_type(frame) == (str(run[-1].offset()), "delta")


def test_channels_no_entry_of_the_run_carries_stay_absent() -> None:
    stream = Stream()
    (frame,) = frames_for([stream.delta(content="a"), stream.delta(content="b")])
    merged = json.loads(frame)
    assert merged["content"] == "ab"
    assert "reasoning" not in merged
    assert "tool_calls" not in merged


@pytest.mark.parametrize(
    "breaker",
    [
        EventType.GENERATION_STARTED,
        EventType.GENERATION_RESTARTED,
        EventType.GENERATION_COMPLETED,
        "x.note",  # a hook's own event
    ],
)
def test_any_other_event_ends_the_run_and_goes_out_byte_for_byte(breaker: str) -> None:
    stream = Stream()
    before = [stream.delta(content="a"), stream.delta(content="b")]
    other = stream.append(breaker, attempt=2)
    alone = stream.delta(content="c")
    other_again = stream.append(breaker, attempt=3)
    after = [stream.delta(content="d"), stream.delta(content="e")]
    frames = frames_for([*before, other, alone, other_again, *after])
    assert len(frames) == 5
    assert [frames[1], frames[2], frames[3]] == [other.frame(), alone.frame(), other_again.frame()]
    first, last = json.loads(frames[0]), json.loads(frames[4])
    assert (first["content"], first["seq_start"], first["seq"]) == ("ab", 1, 2)
    assert first["offset"] == str(before[-1].offset())
    assert (last["content"], last["seq_start"], last["seq"]) == ("de", 6, 7)
    assert last["offset"] == str(after[-1].offset())


def test_another_generation_ends_the_run() -> None:
    stream = Stream()
    entries = [
        stream.delta(GEN_A, content="a1"),
        stream.delta(GEN_A, content="a2"),
        stream.delta(GEN_B, content="b1"),
        stream.delta(GEN_B, content="b2"),
        stream.delta(GEN_A, content="a3"),
    ]
    frames = frames_for(entries)
    assert len(frames) == 3
    first, second = parsed(frames[:2])
    assert (first["generation_id"], first["content"], first["seq_start"], first["seq"]) == (
        GEN_A,
        "a1a2",
        1,
        2,
    )
    assert (second["generation_id"], second["content"], second["seq_start"], second["seq"]) == (
        GEN_B,
        "b1b2",
        1,
        2,
    )
    assert frames[2] == entries[4].frame()


def content_for_body_size(size: int) -> str:
    """Content that makes a delta body (as `Stream` writes it) exactly `size` bytes long."""
    overhead = len(Stream().delta(content="").body)
    assert size >= overhead
    return "x" * (size - overhead)


def test_a_run_fills_up_to_max_merged_bytes_exactly() -> None:
    stream = Stream()
    half = MAX_MERGED_BYTES // 2
    entries = [
        stream.delta(content=content_for_body_size(half)),
        stream.delta(content=content_for_body_size(half)),
    ]
    assert sum(len(entry.body) for entry in entries) == MAX_MERGED_BYTES
    (frame,) = frames_for(entries)
    assert (json.loads(frame)["seq_start"], json.loads(frame)["seq"]) == (1, 2)


def test_a_run_that_would_pass_max_merged_bytes_starts_a_new_frame() -> None:
    stream = Stream()
    half = MAX_MERGED_BYTES // 2
    entries = [
        stream.delta(content=content_for_body_size(half)),
        stream.delta(content=content_for_body_size(half + 1)),  # one byte too many to join the first
        stream.delta(content="y"),
        stream.delta(content="z"),
    ]
    frames = frames_for(entries)
    assert len(frames) == 2
    assert frames[0] == entries[0].frame()
    second = json.loads(frames[1])
    assert (second["seq_start"], second["seq"]) == (2, 4)
    assert second["content"] == content_for_body_size(half + 1) + "yz"


def test_the_whole_run_counts_towards_max_merged_bytes() -> None:
    stream = Stream()
    third = MAX_MERGED_BYTES // 3
    entries = [stream.delta(content=content_for_body_size(third)) for _ in range(4)]
    frames = frames_for(entries)
    assert len(frames) == 2
    first = json.loads(frames[0])
    assert (first["seq_start"], first["seq"]) == (1, 3)
    assert frames[1] == entries[3].frame()


def test_an_entry_larger_than_max_merged_bytes_goes_out_alone() -> None:
    stream = Stream()
    entries = [
        stream.delta(content="a"),
        stream.delta(content="b" * MAX_MERGED_BYTES),
        stream.delta(content="c"),
    ]
    assert frames_for(entries) == [entry.frame() for entry in entries]


# --- frames_for against the entries one by one, through a client's transcript

small_text = st.text(max_size=6)
pieces = st.one_of(
    small_text,
    small_text,
    small_text,
    st.builds(str.__mul__, st.sampled_from(["a", "é", "世", "🎉"]), st.integers(5_000, 25_000)),
)
tool_calls = st.lists(
    st.fixed_dictionaries(
        {"index": st.integers(0, 2), "arguments": small_text},
        optional={"id": st.sampled_from(["call_1", "call_2"]), "name": st.sampled_from(["f", "g"])},
    ),
    min_size=1,
    max_size=2,
)
delta_fields = st.fixed_dictionaries(
    {}, optional={"content": pieces, "reasoning": pieces, "tool_calls": tool_calls}
).filter(bool)
#: What one generation does next: a run of deltas, then perhaps another event or its end.
steps = st.tuples(
    st.sampled_from([GEN_A, GEN_B]),
    st.lists(delta_fields, max_size=6),
    st.sampled_from([None, None, "restart", "note", "complete", "fail"]),
)
Plan = list[tuple[str, list[dict[str, Any]], str | None]]


@dataclass
class Produced:
    """What one generation's current attempt has produced, as the worker keeps it for its end's proof."""

    text: str = ""
    reasoning: str = ""
    calls: dict[int, dict[str, str]] = field(default_factory=dict)

    def add(self, fields: dict[str, Any]) -> None:
        self.text += fields.get("content", "")
        self.reasoning += fields.get("reasoning", "")
        for call in fields.get("tool_calls", ()):
            entry = self.calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
            entry["id"] = call.get("id") or entry["id"]
            entry["name"] = call.get("name") or entry["name"]
            entry["arguments"] += call["arguments"]

    def proof(self) -> dict[str, Any]:
        """The members of ``generation.completed`` that state it (worker/generate.py's ``_proof``)."""
        proof: dict[str, Any] = {"length": len(self.text), "sha256": text_sha256(self.text)}
        proof.update(reasoning_length=len(self.reasoning), reasoning_sha256=text_sha256(self.reasoning))
        if self.calls:
            proof["tool_calls"] = [
                {
                    "index": index,
                    "id": call["id"] or None,
                    "name": call["name"] or None,
                    "length": len(call["arguments"]),
                    "sha256": text_sha256(call["arguments"]),
                }
                for index, call in sorted(self.calls.items())
            ]
        return proof


def session_entries(plan: Plan) -> list[StreamEntry]:
    """A session's stream as the worker writes it: each generation starts, streams deltas (perhaps
    restarting, perhaps with a hook's events), and may end; nothing follows its end."""
    stream = Stream()
    produced: dict[str, Produced] = {}
    ended: set[str] = set()
    for generation_id, deltas, then in plan:
        if generation_id in ended:
            continue
        if generation_id not in produced:
            stream.append(EventType.GENERATION_STARTED, generation_id, attempt=1)
            produced[generation_id] = Produced()
        for fields in deltas:
            stream.delta(generation_id, **fields)
            produced[generation_id].add(fields)
        if then == "restart":
            stream.append(EventType.GENERATION_RESTARTED, generation_id, attempt=2)
            produced[generation_id] = Produced()
        elif then == "note":
            stream.append("x.note", generation_id, status="noted")
        elif then == "complete":
            proof = produced[generation_id].proof()
            stream.append(EventType.GENERATION_COMPLETED, generation_id, finish_reason="stop", **proof)
            ended.add(generation_id)
        elif then == "fail":
            stream.append(EventType.GENERATION_FAILED, generation_id, error={"type": "upstream_error"})
            ended.add(generation_id)
    return stream.entries


def pages(entries: list[StreamEntry], cuts: list[int]) -> Iterator[list[StreamEntry]]:
    """The entries as consecutive pages (a catch-up reads a page at a time), cut at `cuts`."""
    points = sorted({cut % (len(entries) + 1) for cut in cuts} | {0, len(entries)})
    for start, end in itertools.pairwise(points):
        yield entries[start:end]


def assembled(frames: list[dict[str, Any]]) -> dict[str, GenerationTranscript]:
    transcript = Transcript()
    for frame in frames:
        transcript.apply(frame)  # raises on a gap, a duplicate, or text that fails its length or SHA-256
    return transcript.generations


def calls_of(frames: list[dict[str, Any]], generation_id: str) -> list[dict[str, Any]]:
    """Every tool-call piece of a generation, in the order its frames carry them."""
    return [
        call
        for frame in frames
        if frame["type"] == "delta" and frame["generation_id"] == generation_id
        for call in frame.get("tool_calls", ())
    ]


@settings(max_examples=150, deadline=None)
@given(st.lists(steps, min_size=1, max_size=8), st.lists(st.integers(min_value=0, max_value=60), max_size=3))
def test_merged_frames_assemble_exactly_what_the_entries_one_by_one_do(plan: Plan, cuts: list[int]) -> None:
    entries = session_entries(plan)
    one_by_one = parsed([entry.frame() for entry in entries])
    merged = parsed([frame for page in pages(entries, cuts) for frame in frames_for(page)])
    assert coverage(merged) == coverage(one_by_one)  # every event once, in order, as seq_start..seq
    assert {frame["offset"] for frame in merged} <= {frame["offset"] for frame in one_by_one}
    if entries:
        assert merged[-1]["offset"] == one_by_one[-1]["offset"]
    expected, got = assembled(one_by_one), assembled(merged)
    assert got.keys() == expected.keys()
    for generation_id, generation in expected.items():
        assert got[generation_id].text == generation.text
        assert got[generation_id].reasoning_text == generation.reasoning_text
        assert got[generation_id].tool_calls == generation.tool_calls
        assert got[generation_id].status is generation.status
        assert got[generation_id].restarts == generation.restarts
        assert got[generation_id].other_events == generation.other_events
        assert calls_of(merged, generation_id) == calls_of(one_by_one, generation_id)
    for frame in merged:
        if "seq_start" in frame:
            assert frame["type"] == "delta"
            assert frame["seq_start"] < frame["seq"]


# --- frame_offset_and_type

event_types = st.one_of(
    st.sampled_from(EventType), st.text(string.ascii_lowercase + ".", min_size=1).map("x.{}".format)
)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.text(string.digits + string.ascii_lowercase, min_size=1, max_size=16),
    event_types,
)
def test_frame_offset_and_type_reads_what_leads_every_frame(
    ms: int, seq: int, epoch: str, event_type: str
) -> None:
    body = event_body(
        event_type, session_id=SESSION, generation_id=GEN_A, seq=1, content='"quoted", "type":"x"'
    )
    entry = StreamEntry(StreamId(ms, seq), epoch.encode(), encode_body(body).encode())
    assert frame_offset_and_type(entry.frame()) == (f"{epoch}:{ms}-{seq}", str(event_type))


def test_frame_offset_and_type_reads_merged_and_snapshot_frames() -> None:
    stream = Stream()
    entries = [stream.delta(content="a"), stream.delta(content="b")]
    (merged,) = frames_for(entries)
    assert frame_offset_and_type(merged) == (str(entries[-1].offset()), "delta")
    assert frame_offset_and_type(snapshot_frame(SESSION, "k3y:1-0", [], "slow")) == ("k3y:1-0", "snapshot")


# --- snapshot_frame and control_frame


def test_a_snapshot_frame_carries_the_state_of_each_generation_as_of_its_offset() -> None:
    generations = [
        {
            "generation_id": GEN_A,
            "status": "completed",
            "text": "Héllo 世界",
            "seq": 9,
            "finish_reason": "stop",
        },
        {"generation_id": GEN_B, "status": "running", "text": "", "seq": 2, "attempt": 1},
    ]
    frame = snapshot_frame(SESSION, "k3y:1732406400123-4", generations, "the subscriber fell behind")
    assert json.loads(frame) == {
        "offset": "k3y:1732406400123-4",
        "type": "snapshot",
        "session_id": SESSION,
        "reason": "the subscriber fell behind",
        "generations": generations,
    }
    assert "世界".encode() in frame  # UTF-8 as is, not escaped
    transcript = Transcript()
    transcript.apply(json.loads(frame))
    assert transcript.generations[GEN_A].text == "Héllo 世界"
    assert transcript.generations[GEN_A].last_seq == 9
    assert transcript.generations[GEN_B].attempt == 1
    assert str(transcript.last_offset) == "k3y:1732406400123-4"


def test_a_control_frame_echoes_a_lone_surrogate_as_valid_utf8_json() -> None:
    frame = control_frame("error", session_id="bad\ud800id", code=4400, reason="no")
    assert json.loads(frame.decode("utf-8")) == {
        "type": "error",
        "session_id": "bad\ud800id",
        "code": 4400,
        "reason": "no",
    }


def test_a_control_frame_has_a_type_and_no_offset() -> None:
    assert control_frame("subscribed", session_id=SESSION) == b'{"type":"subscribed","session_id":"s1"}'
    error = control_frame("error", session_id=SESSION, code=4410, reason="offset gone — rebuild")
    assert json.loads(error) == {
        "type": "error",
        "session_id": SESSION,
        "code": 4410,
        "reason": "offset gone — rebuild",
    }
    assert "—".encode() in error
    assert json.loads(control_frame("refreshed", expires_at=None)) == {
        "type": "refreshed",
        "expires_at": None,
    }


@settings(max_examples=100, deadline=None)
@given(
    st.text(min_size=1, max_size=20),
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "type"), st.text()),
)
def test_a_control_frame_is_utf8_json_that_parses_back(kind: str, members: dict[str, str]) -> None:
    frame = control_frame(kind, **members)
    assert json.loads(frame.decode("utf-8")) == {"type": kind, **members}


# --- close_reason


@pytest.mark.parametrize("text", ["", "bye", "x" * 123, "é" * 61 + "x", "🎉" * 30 + "abc"])
def test_a_reason_that_fits_is_kept_whole(text: str) -> None:
    assert len(text.encode()) <= 123
    assert close_reason(text) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x" * 124, "x" * 123),
        ("é" * 62, "é" * 61),  # 124 bytes: the last two-byte character would straddle the limit
        ("x" + "é" * 62, "x" + "é" * 61),  # 125 bytes: 123 fit exactly
        ("🎉" * 31, "🎉" * 30),  # 124 bytes: 120 fit, the next character would need 4 more
        ("ab" + "世" * 41, "ab" + "世" * 40),  # 125 bytes: 122 fit
    ],
)
def test_a_long_reason_is_cut_before_the_character_that_would_not_fit(text: str, expected: str) -> None:
    assert close_reason(text) == expected


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_a_reason_is_the_longest_prefix_that_fits_in_123_bytes(text: str) -> None:
    reason = close_reason(text)
    assert text.startswith(reason)
    assert len(reason.encode()) <= 123
    if reason != text:
        assert len((reason + text[len(reason)]).encode()) > 123


# --- merging by joining bytes against parsing and re-encoding

#: Any character, lone surrogates included (what a body may hold after JSON escapes or bytes from outside).
any_char = st.characters(blacklist_categories=())
delta_text = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8),
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8),
    st.text(any_char, max_size=8),
    st.text(st.sampled_from('ab "\\/\n\t\x01é世🎉\ud800\udc00'), max_size=8),
)


@st.composite
def delta_bodies(draw: st.DrawFn, seq: int, *, worker: bool) -> bytes:
    """A delta's body as the worker writes it, or in one of the ways another writer (or a stream from
    outside) may lay it out: JSON escapes, spaces, other members, raw surrogates, or a cut character."""
    generation = draw(st.sampled_from([GEN_A] * 6 + [GEN_B, "gen\u00e9", "gen\\u0041"]))
    content = draw(delta_text)
    styles = ["worker"] if worker else ["worker"] * 12 + ["ascii", "spaced", "reasoning", "calls", "cut"]
    style = draw(st.sampled_from(styles))
    body = event_body(EventType.DELTA, session_id=SESSION, generation_id=generation, seq=seq, content=content)
    if style == "reasoning":
        body["reasoning"] = draw(delta_text)
    elif style == "calls":
        body["tool_calls"] = [{"index": 0, "arguments": content}]
    if style == "ascii":
        return json.dumps(body, separators=(",", ":")).encode()
    if style == "spaced":
        return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    encoded = encode_body(body).encode("utf-8", "surrogatepass")
    if style == "cut":  # a multi-byte character whose bytes are split between two bodies
        return encoded[: -len('"}')] + "é".encode()[:1] + b'"}'
    if style == "worker" and draw(st.integers(0, 9)) == 0:  # the rest of a character cut in the body before
        return encoded.replace(b'"content":"', b'"content":"' + "é".encode()[1:], 1)
    return encoded


@st.composite
def runs(draw: st.DrawFn, *, worker: bool = False) -> list[StreamEntry]:
    """Entries of deltas (and a restart now and then); with `worker`, every delta's body is laid out as the
    worker lays it out."""
    stream = Stream()
    entries: list[StreamEntry] = []
    for seq in range(1, draw(st.integers(1, 12)) + 1):
        if draw(st.integers(0, 19)) == 0:
            entries.append(stream.append(EventType.GENERATION_RESTARTED, attempt=2))
            continue
        body = draw(delta_bodies(seq, worker=worker))
        entries.append(StreamEntry(StreamId(stream.ms, seq), EPOCH.encode(), body))
    return entries


def outcome(entries: list[StreamEntry], *, splice: bool) -> list[object] | type[Exception]:
    """Each frame's members in order, values parsed (a frame that is not valid JSON as its bytes: an entry
    sent alone goes out as stored); or the kind of error that stopped the merge."""
    try:
        frames = frames_for(entries, splice=splice)
    except (ValueError, UnicodeError) as exc:
        return type(exc)
    return [_members(frame) for frame in frames]


def _members(frame: bytes) -> object:
    try:
        return list(json.loads(frame).items())
    except ValueError:
        return frame


@settings(max_examples=300, deadline=None)
@given(st.one_of(runs(), runs(worker=True)))
def test_joining_bytes_gives_the_frames_parsing_gives(entries: list[StreamEntry]) -> None:
    assert outcome(entries, splice=True) == outcome(entries, splice=False)


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from('\n\t"\\/'), max_size=20))
def test_deltas_as_the_worker_writes_them_are_joined_not_parsed(content: str) -> None:
    body = event_body(EventType.DELTA, session_id=SESSION, generation_id=GEN_A, seq=12, content=content)
    assert _DELTA_BODY.fullmatch(encode_body(body).encode()) is not None
