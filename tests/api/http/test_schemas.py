"""The generation request's schema, the worker and docs/PROTOCOL.md state one rule: what passes through to
the upstream, and what is refused and why (`tokenfan.contract.parameters`). Pure: no server."""

from __future__ import annotations

import re
from pathlib import Path

from api.http.schemas import GenerationRequest
from tokenfan.contract.parameters import NOT_CARRIED, PASSED_THROUGH, TOKENFAN_MEMBERS
from worker.upstream import PASSTHROUGH, upstream_body

PROTOCOL = (Path(__file__).parents[3] / "docs" / "PROTOCOL.md").read_text()


def test_the_schema_takes_tokenfans_members_and_those_passed_through_and_no_other() -> None:
    assert set(GenerationRequest.model_fields) == PASSED_THROUGH | TOKENFAN_MEMBERS
    assert not PASSED_THROUGH & TOKENFAN_MEMBERS
    assert not NOT_CARRIED.keys() & GenerationRequest.model_fields.keys()


def test_the_worker_passes_through_exactly_what_the_schema_takes() -> None:
    assert PASSTHROUGH == PASSED_THROUGH
    request = {"model": "m", "messages": [], "policy": "reject", "metadata": {"k": 1}, "n": 1}
    request |= {name: 1 for name in PASSED_THROUGH}
    body = upstream_body(request)
    assert set(body) == PASSED_THROUGH | {"model", "messages", "stream", "stream_options"}
    assert body["stream"] is True


def test_the_protocol_lists_what_passes_through_and_what_is_refused() -> None:
    section = PROTOCOL[PROTOCOL.index("### `POST /v1/sessions/{session_id}/generations`") :]
    section = section[: section.index("\n### ")]
    named = set(re.findall(r"`([a-z_]+)`", section))
    assert named >= PASSED_THROUGH | TOKENFAN_MEMBERS
    assert named >= NOT_CARRIED.keys()
