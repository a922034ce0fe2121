"""Worker hooks: what ``ctx.emit`` accepts, and what it refuses at once rather than leaving to the writer."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from tests.store.helpers import make_store
from worker.hooks import HookContext, load_hooks
from worker.stream_writer import StreamWriter


@pytest.fixture
def context(redis: Redis) -> HookContext:
    """A hook's context on a stream of a writer that never runs: emitted events only wait in it."""
    stream = StreamWriter(make_store(redis)).open("s1", "gen_01M85JSR67842W2YC56KNRN9TW", 1, 0)
    return HookContext(stream, {"model": "m", "messages": [], "metadata": {"k": "v"}})


def test_emit_queues_a_custom_event(context: HookContext) -> None:
    context.emit("sources", items=[{"title": "Fan-out", "score": 0.5}])
    (event,) = context._stream.coalescer.drain()
    assert (event.type, event.fields) == ("x.sources", {"items": [{"title": "Fan-out", "score": 0.5}]})
    assert context.metadata == {"k": "v"}


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("Bad Name", {}),
        ("sources", {"seq": 3}),
        ("sources", {"items": object()}),  # not JSON
        ("sources", {"note": "half an emoji \ud83d"}),  # JSON, but no UTF-8 encoder takes it
        ("sources", {"nested": [{"\udfff": 1}]}),
    ],
    ids=["name", "reserved-member", "not-json", "lone-surrogate", "lone-surrogate-in-a-key"],
)
def test_emit_refuses_at_once_what_could_not_be_written(
    context: HookContext, name: str, fields: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match=r"custom event"):
        context.emit(name, **fields)
    assert not context._stream.coalescer  # nothing reaches the writer


def test_load_hooks_without_a_spec_does_nothing() -> None:
    hooks = load_hooks(None)
    assert hooks.on_start is not None
    with pytest.raises(ValueError, match=r"package\.module:attribute"):
        load_hooks("no-colon")
