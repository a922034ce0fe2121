"""The worker's server-sent-events decoder: it yields the data of exactly the events openai's own decoder
yields, whatever the line ends (CR, LF, CRLF, even a CRLF split between two reads) and wherever the byte
stream is cut into chunks; and `loads` gives the value (or the error) `json.loads` gives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder as OpenAIDecoder

from worker.chunks import ChunkReader, Update
from worker.upstream import SSEDecoder, _event_updates, _reading, loads


def decode(*chunks: bytes) -> list[bytes]:
    """The data of every event the chunks carry, fed in that order to one decoder."""
    decoder = SSEDecoder()
    return [data for chunk in chunks for data in decoder.feed(chunk)]


def openai_data(chunks: Iterable[bytes]) -> list[tuple[str | None, bytes]]:
    """(event name, data) of every event openai's decoder yields for the same bytes."""
    return [(event.event, event.data.encode()) for event in OpenAIDecoder().iter_bytes(iter(chunks))]


# --- line ends


@pytest.mark.parametrize("end", [b"\n", b"\r", b"\r\n"], ids=["LF", "CR", "CRLF"])
def test_each_line_end_ends_a_line(end: bytes) -> None:
    stream = b"data: a" + end + b"data: b" + end + end + b"data: c" + end + end
    assert decode(stream) == [b"a\nb", b"c"]


def test_line_ends_may_be_mixed_in_one_stream() -> None:
    assert decode(b"data: a\rdata: b\r\ndata: c\n\r\ndata: d\r\r") == [b"a\nb\nc", b"d"]


def test_a_cr_at_the_end_of_a_chunk_and_an_lf_opening_the_next_are_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r") == []  # no blank line yet: the LF belonged to the CR
    assert decoder.feed(b"") == []  # an empty read changes nothing
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\r\n") == [b"a\nb"]


def test_a_cr_at_the_end_of_a_chunk_and_a_cr_opening_the_next_are_two_line_ends() -> None:
    assert decode(b"data: a\r", b"\rdata: b\n\n") == [b"a", b"b"]


def test_only_the_lf_right_after_a_cr_is_skipped() -> None:
    assert decode(b"data: a\r", b"data: b\n", b"\n") == [b"a\nb"]
    assert decode(b"data: a\r\n", b"\n") == [b"a"]


def test_a_line_may_be_split_anywhere_even_inside_a_character() -> None:
    stream = "data: héllo 世界\n\n".encode()
    cut = stream.index("世".encode()) + 1
    assert decode(stream[:5], stream[5:cut], stream[cut:]) == ["héllo 世界".encode()]


# --- fields


def test_comments_are_skipped() -> None:
    assert decode(b": keep-alive\n\n") == []
    assert decode(b": one\ndata: x\n:data: not data\n\n") == [b"x"]


def test_data_lines_of_one_event_are_joined_with_lf() -> None:
    assert decode(b"data: a\ndata: b\ndata:\ndata\ndata: c\n\n") == [b"a\nb\n\n\nc"]


def test_one_leading_space_of_a_value_is_dropped() -> None:
    assert decode(b"data:x\n\ndata: x\n\ndata:  x\n\ndata: \n\n") == [b"x", b"x", b" x", b""]


def test_events_without_data_are_skipped() -> None:
    stream = b"event: ping\n\nid: 7\n\nretry: 100\n\nevent: chunk\nid: 8\ndata: x\n\n"
    assert decode(stream) == [b"x"]


def test_fields_that_only_start_like_data_are_ignored() -> None:
    assert decode(b"database: x\ndata-x: y\ndata : z\ndat: w\n\n") == []


def test_blank_lines_between_events_add_no_events() -> None:
    assert decode(b"\n\n\r\ndata: a\n\n\n\n\r\r") == [b"a"]


def test_done_and_errors_are_data_like_any_other() -> None:
    """The adapter, not the decoder, decides what ``[DONE]`` and an error chunk mean."""
    assert decode(b'data: {"error":{"message":"x"}}\n\ndata: [DONE]\n\n') == [
        b'{"error":{"message":"x"}}',
        b"[DONE]",
    ]


def test_many_events_in_one_chunk_come_out_in_order() -> None:
    stream = b"".join(b"data: %d\n\n" % n for n in range(100))
    assert decode(stream) == [b"%d" % n for n in range(100)]


# --- the end of the stream


def test_an_unterminated_last_event_is_not_yielded() -> None:
    assert decode(b"data: a\n\ndata: b") == [b"a"]
    assert decode(b"data: a\n\ndata: b\n") == [b"a"]  # its line ended, the event did not


def test_an_unterminated_line_is_completed_by_the_next_chunk() -> None:
    assert decode(b"data: a", b"bc\n", b"\n") == [b"abc"]


# --- against openai's decoder, cut anywhere

#: Field values: any text but a line end, often opening with spaces (only one of which is dropped).
values = st.builds(
    str.__add__,
    st.sampled_from(["", " ", "  "]),
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12),
)
data_lines = st.one_of(
    values.map(lambda value: f"data: {value}"),
    values.map(lambda value: f"data:{value}"),
    st.just("data"),
)
#: Lines every event may carry besides data: none of them is yielded by either decoder.
other_lines = st.one_of(
    values.map(lambda value: f":{value}"),
    st.builds("{}:{}".format, st.sampled_from(["database", "data-x", "dat", "x", "data "]), values),
)


@st.composite
def events(draw: st.DrawFn) -> tuple[list[str], bool]:
    """The lines of one event, and whether it carries data. An event without data carries ``event: ping``
    when it carries a field openai yields an event for, so the oracle's data-less events can be told apart."""
    kind = draw(st.sampled_from(["data", "ping", "comments"]))
    lines = draw(st.lists(other_lines, max_size=3))
    if kind == "data":
        lines += draw(st.lists(data_lines, min_size=1, max_size=4))
        lines += draw(st.lists(st.just("event: chunk"), max_size=1))
    elif kind == "ping":
        lines += ["event: ping", *draw(st.lists(st.integers(0, 9999).map("retry: {}".format), max_size=1))]
    return draw(st.permutations(lines)), kind == "data"


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, int]:
    """A valid event stream with any line ends, perhaps an unfinished event at its end, and the number of
    (finished) events with data it holds."""
    drawn = draw(st.lists(events(), max_size=8))
    lines = [line for event, _ in drawn for line in [*event, ""]]
    ends = draw(st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=len(lines), max_size=len(lines)))
    text, previous = "", ""
    for line, end in zip(lines, ends, strict=True):
        if previous == "\r" and not line and end == "\n":
            end = "\r\n"  # a blank line's LF right after a CR would only complete the CR's line end
        text += line + end
        previous = end
    unfinished = draw(st.lists(st.one_of(data_lines, other_lines), max_size=3))
    if unfinished:
        text += "\n".join(unfinished) + draw(st.sampled_from(["", "\n", "\r", "\r\n"]))
    return text.encode(), sum(1 for _, with_data in drawn if with_data)


@settings(max_examples=300, deadline=None)
@given(streams(), st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_stream_cut_anywhere_gives_the_events_openai_gives(
    stream: tuple[bytes, int], cuts: list[int]
) -> None:
    raw, with_data = stream
    whole = decode(raw)
    points = sorted(cut % (len(raw) + 1) for cut in cuts)
    pieces = [raw[start:end] for start, end in zip([0, *points], [*points, len(raw)], strict=True)]
    assert decode(*pieces) == whole
    assert whole == [data for name, data in openai_data([raw]) if name != "ping"]
    assert len(whole) == with_data


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"data: ", b"data:", b"data:  ", b": comment\ndata: ", b"event: x\ndata: "]),
            st.text(max_size=12).map(str.encode),
            st.sampled_from([b"\n\n", b"\n", b"\r\n\r\n", b"\r\r", b"\n\r\n"]),
        ),
        max_size=6,
    )
)
def test_one_read_per_event_gives_the_events_openai_gives(reads: list[tuple[bytes, bytes, bytes]]) -> None:
    """The shape of nearly every read at a model's pace (one whole event, read on its own, which the decoder
    takes without splitting lines), and its near misses, decode as openai decodes them."""
    pieces = [prefix + value + end for prefix, value, end in reads]
    assert decode(*pieces) == decode(b"".join(pieces))
    assert decode(*pieces) == [data for name, data in openai_data([b"".join(pieces)]) if name != "ping"]


# --- loads


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b'{"a":1}', {"a": 1}),
        (b'{"a": [1, 2.5, null, true]}', {"a": [1, 2.5, None, True]}),
        (b' {"a":1}', {"a": 1}),
        (b'{"a":1} \r\n\t', {"a": 1}),
        ('{"c":"é 世界 🎉"}'.encode(), {"c": "é 世界 🎉"}),
        (b'{"c":"\\u00e9\\ud83c\\udf89"}', {"c": "é🎉"}),
        (b"[1,2]", [1, 2]),
        (b'"text"', "text"),
        (b"12", 12),
    ],
)
def test_loads_gives_the_json_value(data: bytes, value: object) -> None:
    assert loads(data) == value


def test_loads_replaces_bytes_that_are_not_utf8_as_the_sse_specification_decodes() -> None:
    assert loads(b'{"content": "caf\xe9 \xff"}') == {"content": "caf\ufffd \ufffd"}


@pytest.mark.parametrize("data", [b"", b" ", b"{", b'{"a":1} x', b'{"a":1}{}', b"[1,", b"nul", b"{'a':1}"])
def test_loads_refuses_what_json_refuses(data: bytes) -> None:
    with pytest.raises(json.JSONDecodeError) as ours:
        loads(data)
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(data)
    assert (ours.value.msg, ours.value.pos) == (reference.value.msg, reference.value.pos)


json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(st.characters(codec="utf-8"))
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
whitespace = st.text(" \t\r\n", max_size=2)
encoded_values = st.builds(
    lambda before, value, ascii_only, after: before + json.dumps(value, ensure_ascii=ascii_only) + after,
    whitespace,
    json_values,
    st.booleans(),
    whitespace,
)


def outcome(parse: Callable[[], object]) -> tuple[str, object]:
    """What a parse gives: the value (its repr, so that NaN equals NaN), or the error and where it is."""
    try:
        return "value", repr(parse())
    except json.JSONDecodeError as error:
        return "error", (error.msg, error.pos)


@settings(max_examples=300, deadline=None)
@given(st.one_of(encoded_values, st.text(st.characters(codec="utf-8"), max_size=20)))
def test_loads_agrees_with_json_loads(text: str) -> None:
    assert outcome(lambda: loads(text.encode())) == outcome(lambda: json.loads(text))


# --- the one-pass read of a chunk's event, against the general path

ENVELOPES: list[dict[str, object]] = [
    {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"},
    {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000001, "model": "m"},
    {"id": 'a"choices":[1]', "model": "m"},  # the key's text inside a string
    {"id": "x", "nested": {"choices": 1}},  # and in a nested object
    {"choices": [], "id": "x"},  # a choices member before the last one
    {"created": 12345678901234567890123, "usage": None},
    {"id": "x", "usage": {"prompt_tokens": 1}},
    {"id": "x", "error": None},
    {"id": "x", "error": {"message": "boom"}},
    {},
]
TAILS = [
    {},
    {"usage": None},
    {"usage": None, "obfuscation": "k9"},
    {"usage": {"total_tokens": 3}},
    {"choices": []},
    {"error": {"message": "late"}},
    {"error": None},
]
DELTAS = st.one_of(
    st.builds(lambda text: {"content": text}, st.text(max_size=6)),
    st.sampled_from(
        [
            {"content": None},
            {"role": "assistant", "content": ""},
            {"reasoning_content": "r"},
            {"content": "a", "reasoning": "b"},
            {"tool_calls": []},
            {},
            {"content": 5},
        ]
    ),
)


def often(common: object, *others: object) -> st.SearchStrategy[Any]:
    """`common` three times in four, else one of `others`."""
    return st.one_of(st.just(common), st.just(common), st.just(common), st.sampled_from(others))


@st.composite
def chunk_lines(draw: st.DrawFn, envelope: dict[str, object]) -> bytes:
    """One piece as a read at a model's pace may carry it: a chunk's event, or a near miss of one."""
    choice: dict[str, object] = {"index": draw(often(0, 1)), "delta": draw(DELTAS)}
    choice["finish_reason"] = draw(often(None, "stop"))
    members = {**draw(often(envelope, *ENVELOPES)), "choices": [choice], **draw(st.sampled_from(TAILS))}
    separators = draw(often((",", ":"), (", ", ": "), (",", ":\n")))
    text = json.dumps(members, separators=separators, ensure_ascii=draw(st.booleans()))
    text = draw(
        often(text, text[:-1], text + " ", text.replace("}]", "}],}", 1), text.replace("}]", "}] }", 1))
    )
    text = draw(often(text, text.replace('"r"', '"\\ud83c"'), text.replace('"a"', '"\\udf89"')))
    line: str = draw(often("data: ", "data:", "data:  ", ": c\ndata: ")) + text
    end: str = draw(often("\n\n", "\r\n\r\n", "\n", "\r\n\n"))
    return (line + end).encode()


streams_of_chunks = st.sampled_from(ENVELOPES).flatmap(
    lambda envelope: st.lists(chunk_lines(envelope), max_size=8)
)


class Recorder:
    def __init__(self) -> None:
        self.seen: list[object] = []

    def text(self, text: str) -> None:
        self.seen.append(("text", text))

    def updates(self, updates: list[Update]) -> None:
        self.seen.append(("updates", updates))


def general_reading(pieces: list[bytes]) -> list[object]:
    """What the general path makes of the pieces: every event decoded, parsed by `loads` and read by
    `_event_updates` (the one-pass read's specification)."""
    decoder, reader, seen = SSEDecoder(), ChunkReader(), Recorder()
    try:
        for piece in pieces:
            for event in decoder.feed(piece):
                added, done = _event_updates(event, reader, None)
                if isinstance(added, str):
                    if added:
                        seen.text(added)
                elif added:
                    seen.updates(added)
                if done:
                    return [*seen.seen, "done"]
    except Exception as error:
        return [*seen.seen, ("raised", type(error).__name__, str(error))]
    return seen.seen


def one_pass_reading(pieces: list[bytes]) -> list[object]:
    seen = Recorder()
    feed = _reading(seen, None)
    try:
        for piece in pieces:
            if feed(piece):
                return [*seen.seen, "done"]
    except Exception as error:
        return [*seen.seen, ("raised", type(error).__name__, str(error))]
    return seen.seen


@settings(max_examples=500, deadline=None)
@given(streams_of_chunks, st.integers(0, 3))
def test_the_one_pass_read_of_each_event_gives_what_the_general_path_gives(
    pieces: list[bytes], settled: int
) -> None:
    """Whatever the chunk and its line: the same text, updates and errors, in the same order, whether the
    stream's envelope was learned, changed or never could be (`worker.upstream._envelope`)."""
    common = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"%d"}}]}\n\n'
    start = [common % n for n in range(settled)]  # the content channel settled (or not) beforehand
    assert one_pass_reading(start + pieces) == general_reading(start + pieces)


def test_a_key_ending_in_choices_is_not_taken_for_the_choices() -> None:
    settled = [b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"%d"}}]}\n\n' % n for n in range(2)]
    impostor = b'data: {"a\\"choices":[{"index":0,"delta":{"content":"no"}}]}\n\n'
    pieces = [*settled, impostor, impostor, *settled]
    assert one_pass_reading(pieces) == general_reading(pieces)
