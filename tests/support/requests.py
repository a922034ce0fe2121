"""What tests send: session ids, generation requests for the simulator, and what it will answer."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx

from tokenfan.cli.embedded_cluster import EmbeddedCluster
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.cli.simulator import SimulatorConfig, reply_chunks
from tokenfan.store.slots import slot_of

#: The simulator every test stack runs: full speed (tests that need pacing say so per request).
SIMULATOR = SimulatorConfig(tokens_per_second=0, reply_tokens=48)


def new_session_id() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


def new_session_id_on(cluster: EmbeddedCluster, primary: EmbeddedRedis) -> str:
    """A new session id whose slot `primary` serves."""
    while True:
        session_id = new_session_id()
        if cluster.primary_of_slot(slot_of(session_id)) is primary:
            return session_id


def expected_text(body: dict[str, Any]) -> str:
    """What the simulator streams for `body` (a generation request), computed without HTTP."""
    return "".join(reply_chunks(body, SIMULATOR))


def user_message(content: str, directive: dict[str, Any] | None = None) -> dict[str, Any]:
    if directive is not None:
        content = f"{content} <<sim {json.dumps(directive)}>>"
    return {"model": "tokenfan-sim", "messages": [{"role": "user", "content": content}]}


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def accept(client: httpx.AsyncClient, session_id: str, body: dict[str, Any], **kwargs: Any) -> str:
    response = await client.post(f"/v1/sessions/{session_id}/generations", json=body, **kwargs)
    assert response.status_code == 202, response.text
    generation_id: str = response.json()["generation_id"]
    return generation_id
