"""Chunks to updates: which updates each ``chat.completion.chunk`` adds (tolerating what real providers send,
ignoring what is malformed), and what a stream's reader repairs: tool calls without an index, cumulative
text, and lone surrogates.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionChunk

from worker.chunks import (
    ChunkReader,
    ContentPiece,
    FinishPiece,
    ReasoningPiece,
    ToolCallPiece,
    Update,
    UsagePiece,
    updates_from_chunk,
)


def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A ``chat.completion.chunk`` as the SSE decoder hands it over (decoded JSON), checked against the
    openai package's own schema so that every example is a chunk a real upstream may send."""
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_732_406_400,
        "model": "some-model",
        "choices": choices,
        **extra,
    }
    ChatCompletionChunk.model_validate(payload)
    return payload


def test_content_chunk() -> None:
    update = updates_from_chunk(chunk([{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]))
    assert update == [ContentPiece("Hi")]


def test_reasoning_content_extra_field() -> None:
    updates = updates_from_chunk(
        chunk([{"index": 0, "delta": {"reasoning_content": "Let me think", "content": None}}])
    )
    assert updates == [ReasoningPiece("Let me think")]


def test_reasoning_extra_field() -> None:
    updates = updates_from_chunk(chunk([{"index": 0, "delta": {"reasoning": "hmm", "content": "ok"}}]))
    assert updates == [ReasoningPiece("hmm"), ContentPiece("ok")]


def test_tool_call_pieces() -> None:
    first = chunk(
        [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_abc",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                },
            }
        ]
    )
    later = chunk(
        [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]}}]
    )
    second_call = chunk(
        [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {"index": 1, "id": "call_def", "function": {"name": "now", "arguments": "{}"}},
                    ]
                },
            }
        ]
    )
    no_function = chunk([{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}])
    assert updates_from_chunk(first) == [ToolCallPiece(0, "call_abc", "get_weather", "")]
    assert updates_from_chunk(later) == [ToolCallPiece(0, None, None, '{"city"')]
    assert updates_from_chunk(second_call) == [ToolCallPiece(1, "call_def", "now", "{}")]
    assert updates_from_chunk(no_function) == [ToolCallPiece(0, None, None, "")]


def test_finish_reason() -> None:
    updates = updates_from_chunk(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    assert updates == [FinishPiece("stop")]
    with_text = updates_from_chunk(
        chunk([{"index": 0, "delta": {"content": "."}, "finish_reason": "length"}])
    )
    assert with_text == [ContentPiece("."), FinishPiece("length")]


def test_usage_chunk_without_choices() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    updates = updates_from_chunk(chunk([], usage=usage))
    assert updates == [UsagePiece(usage)]


def test_usage_on_a_content_chunk() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    updates = updates_from_chunk(chunk([{"index": 0, "delta": {"content": "a"}}], usage=usage))
    assert updates == [ContentPiece("a"), UsagePiece(usage)]


def test_empty_delta_adds_nothing() -> None:
    assert updates_from_chunk(chunk([{"index": 0, "delta": {}}])) == []
    assert updates_from_chunk(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])) == []
    assert updates_from_chunk(chunk([{"index": 0, "delta": {"reasoning_content": ""}}])) == []
    assert updates_from_chunk(chunk([])) == []


def test_other_choices_are_ignored() -> None:
    updates = updates_from_chunk(
        chunk(
            [
                {"index": 1, "delta": {"content": "other"}, "finish_reason": "stop"},
                {"index": 0, "delta": {"content": "mine"}},
            ]
        )
    )
    assert updates == [ContentPiece("mine")]


def test_unknown_fields_are_tolerated() -> None:
    updates = updates_from_chunk(
        chunk(
            [
                {
                    "index": 0,
                    "delta": {"content": "x", "provider_specific": {"a": 1}},
                    "logprobs": None,
                    "extra": 1,
                }
            ],
            system_fingerprint="fp_1",
            service_tier="default",
            x_gateway={"region": "eu"},
        )
    )
    assert updates == [ContentPiece("x")]


@pytest.mark.parametrize(
    "malformed",
    [
        None,
        "data",
        [1, 2],
        {"choices": None},
        {"choices": "abc"},
        {"choices": 5},
        {"choices": [5, None, "x"]},
        {"choices": [{"index": 0, "delta": "text"}]},
        {"choices": [{"index": 0, "delta": {"content": 5, "reasoning_content": ["r"]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": 1}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": "0", "function": {"name": 1}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": 3}]},
        {"choices": [], "usage": 12},
    ],
)
def test_members_of_the_wrong_type_are_ignored(malformed: object) -> None:
    """The docstring's promise: a malformed member is ignored rather than trusted (or crashed on)."""
    assert updates_from_chunk(malformed) == []


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False), st.text(max_size=5)
)
json_any = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
calls = st.fixed_dictionaries(
    {},
    optional={
        "index": st.one_of(st.integers(0, 2), json_any),
        "id": json_any,
        "function": st.one_of(
            json_any, st.fixed_dictionaries({}, optional={"name": json_any, "arguments": json_any})
        ),
    },
)
delta_members = st.fixed_dictionaries(
    {},
    optional={
        "content": json_any,
        "reasoning_content": json_any,
        "reasoning": json_any,
        "tool_calls": st.one_of(json_leaf, json_any, st.lists(calls, max_size=3)),
    },
)
choice_members = st.fixed_dictionaries(
    {},
    optional={
        "index": st.one_of(st.just(0), json_any),
        "delta": st.one_of(delta_members, json_any),
        "finish_reason": json_any,
    },
)
chunk_like = st.fixed_dictionaries(
    {},
    optional={
        "choices": st.one_of(st.lists(choice_members, max_size=3), json_leaf, json_any),
        "usage": json_any,
    },
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(chunk_like, json_any))
def test_any_decoded_json_gives_well_typed_updates(payload: object) -> None:
    for update in updates_from_chunk(payload):
        if isinstance(update, ContentPiece | ReasoningPiece):
            assert isinstance(update.text, str)
            assert update.text
        elif isinstance(update, ToolCallPiece):
            assert isinstance(update.index, int)
            assert update.call_id is None or isinstance(update.call_id, str)
            assert update.name is None or isinstance(update.name, str)
            assert isinstance(update.arguments, str)
        elif isinstance(update, FinishPiece):
            assert isinstance(update.reason, str)
        else:
            assert isinstance(update.usage, dict)


def incremental_reader() -> ChunkReader:
    """A reader whose stream has shown its text to be incremental (the state the hot path needs)."""
    reader = ChunkReader()
    for piece in ("a", "b", "c"):
        reader.updates(chunk([{"index": 0, "delta": {"content": piece}}]))
    return reader


@settings(max_examples=300, deadline=None)
@given(st.one_of(chunk_like, json_any), st.text(max_size=8))
def test_the_text_only_reading_agrees_with_the_full_reading_wherever_it_answers(
    payload: object, content: str
) -> None:
    """`ChunkReader.content` (the hot path) answers only for a chunk whose updates are its text alone, and
    gives that text: the same, whichever of the two reads a chunk."""
    for candidate in (payload, chunk([{"index": 0, "delta": {"content": content}, "finish_reason": None}])):
        text = incremental_reader().content(candidate)
        updates = incremental_reader().updates(candidate)
        if text is not None:
            assert all(isinstance(update, ContentPiece) for update in updates)
            assert text == "".join(update.text for update in updates if isinstance(update, ContentPiece))


def test_the_text_only_reading_takes_the_common_chunks_and_leaves_the_rest() -> None:
    reader = incremental_reader()
    assert reader.content(chunk([{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}])) == "Hi"
    assert reader.content(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])) == ""
    assert reader.content(chunk([{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}])) is None
    assert reader.content(chunk([{"index": 0, "delta": {"reasoning_content": "hmm"}}])) is None
    assert (
        reader.content(
            chunk(
                [{"index": 0, "delta": {"content": "x"}}],
                usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            )
        )
        is None
    )
    assert ChunkReader().content(chunk([{"index": 0, "delta": {"content": "Hi"}}])) is None  # not yet told


# ------------------------------------------------------------------------------------------------ a whole stream


def read(chunks: list[dict[str, Any]]) -> list[Update]:
    """The updates of a stream's chunks, in order, and what is held back at its end."""
    reader = ChunkReader()
    updates = [update for chunk in chunks for update in reader.updates(chunk)]
    return updates + reader.flush()


def delta(**members: Any) -> dict[str, Any]:
    """A chunk with one delta, as a provider may send it: not checked against openai's schema, which an
    index-less tool call does not satisfy."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": members}],
    }


def text_of(updates: list[Update], kind: type[ContentPiece | ReasoningPiece] = ContentPiece) -> str:
    return "".join(update.text for update in updates if isinstance(update, kind))


def test_tool_calls_without_an_index_are_told_apart_by_their_ids() -> None:
    calls = [
        delta(tool_calls=[{"id": "call_a", "type": "function", "function": {"name": "a", "arguments": ""}}]),
        delta(tool_calls=[{"function": {"arguments": '{"x": '}}]),  # neither index nor id: the last call
        delta(tool_calls=[{"function": {"arguments": "1}"}}]),
        delta(tool_calls=[{"id": "call_b", "function": {"name": "b", "arguments": "{}"}}]),
        delta(tool_calls=[{"id": "call_a", "function": {"arguments": ""}}]),  # a known id: its call again
    ]
    assert read(calls) == [
        ToolCallPiece(0, "call_a", "a", ""),
        ToolCallPiece(0, None, None, '{"x": '),
        ToolCallPiece(0, None, None, "1}"),
        ToolCallPiece(1, "call_b", "b", "{}"),
        ToolCallPiece(0, "call_a", None, ""),
    ]


def test_a_call_without_an_index_after_numbered_ones_takes_the_next_number() -> None:
    calls = [
        delta(tool_calls=[{"index": 0, "id": "call_a", "function": {"name": "a"}}]),
        delta(tool_calls=[{"id": "call_b", "function": {"name": "b"}}]),
    ]
    assert [update.index for update in read(calls) if isinstance(update, ToolCallPiece)] == [0, 1]


def cumulative(pieces: list[str]) -> list[str]:
    return ["".join(pieces[: n + 1]) for n in range(len(pieces))]


@pytest.mark.parametrize(
    "pieces",
    [["The ", "answer ", "is ", "42."], ["a", "b", "c"], ["Hi", "!"], ["only"], ["é", "🎉", "漢字"]],
)
def test_cumulative_text_comes_out_as_deltas(pieces: list[str]) -> None:
    sent = cumulative(pieces)
    finish = {
        "choices": [{"index": 0, "delta": {"content": sent[-1]}, "finish_reason": "stop"}]
    }  # it all again
    updates = read([delta(content=piece, reasoning_content=piece) for piece in sent] + [finish])
    assert text_of(updates) == "".join(pieces)
    assert text_of(updates, ReasoningPiece) == "".join(pieces)
    assert updates[-1] == FinishPiece("stop")


@pytest.mark.parametrize(
    "pieces",
    [["ha", "haha", "!"], ["1", "1", "1"], ["**", "**Note", "**:"], ["I", "I'm", " fine"]],
)
def test_incremental_text_that_looks_cumulative_at_first_is_told_by_the_third_piece(
    pieces: list[str],
) -> None:
    assert text_of(read([delta(content=piece) for piece in pieces])) == "".join(pieces)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=6), min_size=3, max_size=12))
def test_any_cumulative_stream_of_three_pieces_or_more_is_read_exactly(pieces: list[str]) -> None:
    assert text_of(read([delta(content=piece) for piece in cumulative(pieces)])) == "".join(pieces)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=6), min_size=2, max_size=12))
def test_an_incremental_stream_is_never_held_back_once_it_is_told(pieces: list[str]) -> None:
    """Unless its second piece extends its first, every piece comes out as it arrives."""
    reader = ChunkReader()
    out = [text_of(reader.updates(delta(content=piece))) for piece in pieces]
    if not (len(pieces[1]) > len(pieces[0]) and pieces[1].startswith(pieces[0])):
        assert out == pieces
    assert "".join(out) + text_of(reader.flush()) in ("".join(pieces), "".join(cumulative_reading(pieces)))


def cumulative_reading(pieces: list[str]) -> list[str]:
    """What a reader that took `pieces` for cumulative text would make of them."""
    return [pieces[0], *(later[len(earlier) :] for earlier, later in itertools.pairwise(pieces))]


def test_lone_surrogates_become_replacement_characters_everywhere_in_a_suspect_chunk() -> None:
    reader = ChunkReader()
    suspect = {
        "choices": [
            {
                "index": 0,
                "delta": {
                    "content": "a\ud800b \ud83d\ude00",  # a lone one, then a pair as two escapes
                    "reasoning_content": "\udc00",
                    "tool_calls": [
                        {"index": 0, "id": "c\udfff", "function": {"name": "n", "arguments": "\ud801"}}
                    ],
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "note": "\ud800"},
    }
    assert reader.updates(suspect, suspect=True) == [
        ReasoningPiece("\ufffd"),
        ContentPiece("a\ufffdb 😀"),
        ToolCallPiece(0, "c\ufffd", "n", "\ufffd"),
        FinishPiece("stop"),
        UsagePiece({"prompt_tokens": 1, "note": "\ufffd"}),
    ]
    assert reader.updates(delta(content="\ud800"))  # not suspect: the byte search said no escape, so as is
