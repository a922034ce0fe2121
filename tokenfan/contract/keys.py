"""Every Redis name tokenfan uses, in one place.

All keys of one session carry the session id as a hash tag (``{...}``), so in Redis Cluster they live in
one slot and the Lua scripts that update them stay atomic. The charset of session ids (see `tokenfan.contract.ids`)
excludes braces, so a session id can never break out of its tag. Pure: no I/O.

Per session ``S``:

======================================  =======  ====================================================
key                                     type     holds
======================================  =======  ====================================================
``tf:{S}:events``                       stream   the session's events; entry fields ``e`` (epoch) and
                                                 ``d`` (the event body JSON, without its offset)
``tf:{S}:meta``                         hash     ``epoch``, ``last`` (id of the newest entry), ``created_ms``
``tf:{S}:queue``                        list     generation ids accepted and not yet finished, in order;
                                                 the head is the one running or about to run
``tf:{S}:generations``                  list     every retained generation id of the session, in order
``tf:{S}:gen:G``                        hash     generation G's record (fields in `GenerationField`)
``tf:{S}:gen:G:text``                   string   G's text so far (APPENDed with each delta)
``tf:{S}:gen:G:reasoning``              string   G's reasoning so far
``tf:{S}:gen:G:response``               string   when G was made through ``POST /v1/responses``: the
                                                 request members its Response object echoes (JSON)
``tf:{S}:watchers``                     zset     processes with subscribers of S, scored by when that
                                                 claim expires (ms): who is watching, for auto-cancel
``tf:{S}:live``                         channel  pub/sub: each appended entry, for relays
======================================  =======  ====================================================

Global (own slots): ``tf:generation:G`` (string: the session id owning generation G) and the arq queue.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ARQ_QUEUE",
    "CANCEL_CHANNEL",
    "GenerationField",
    "MetaField",
    "SessionKeys",
    "generation_index_key",
]

ARQ_QUEUE = "tf:arq:queue"
#: Broadcast channel of cancellation requests: each message is ``<generation id> <reason>``.
CANCEL_CHANNEL = "tf:cancellations"


def generation_index_key(generation_id: str) -> str:
    return f"tf:generation:{generation_id}"


class MetaField(StrEnum):
    EPOCH = "epoch"
    LAST = "last"
    CREATED_MS = "created_ms"


class GenerationField(StrEnum):
    STATUS = "status"
    ATTEMPT = "attempt"
    SEQ = "seq"  # seq of the last event appended; the next event must carry seq + 1
    REQUEST = "request"  # the accepted request body, JSON
    MODEL = "model"
    CREATED_MS = "created_ms"
    STARTED_MS = "started_ms"
    FINISHED_MS = "finished_ms"
    FINISH_REASON = "finish_reason"
    USAGE = "usage"  # JSON or absent
    ERROR = "error"  # JSON or absent
    FIRST_OFFSET = "first_offset"
    LAST_OFFSET = "last_offset"
    CANCEL_REQUESTED = "cancel_requested"
    TOOL_CALLS = "tool_calls"  # JSON list of {index, id, name, arguments} so far


class SessionKeys:
    """The names of one session's keys. Build once per session and reuse."""

    __slots__ = ("events", "generations", "live", "meta", "queue", "session_id", "tag", "watchers")

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.tag = f"tf:{{{session_id}}}"
        self.events = f"{self.tag}:events"
        self.meta = f"{self.tag}:meta"
        self.queue = f"{self.tag}:queue"
        self.generations = f"{self.tag}:generations"
        self.live = f"{self.tag}:live"
        self.watchers = f"{self.tag}:watchers"

    def generation(self, generation_id: str) -> str:
        return f"{self.tag}:gen:{generation_id}"

    def generation_text(self, generation_id: str) -> str:
        return f"{self.tag}:gen:{generation_id}:text"

    def generation_reasoning(self, generation_id: str) -> str:
        return f"{self.tag}:gen:{generation_id}:reasoning"

    def generation_response(self, generation_id: str) -> str:
        """The OpenAI Responses request a generation was made from (``tokenfan.store.front_door``)."""
        return f"{self.tag}:gen:{generation_id}:response"
