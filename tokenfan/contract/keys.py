"""Every Redis name tokenfan uses, in one place.

All keys of one session carry the session id as a hash tag (``{...}``), so in Redis Cluster they live in
one slot and the Lua scripts that update them stay atomic. The charset of session ids (see `tokenfan.contract.ids`)
excludes braces, so a session id can never break out of its tag. Pure: no I/O.

Per session ``S``:

======================================  =======  ====================================================
key                                     type     holds
======================================  =======  ====================================================
``tf:{S}:events``                       stream   the session's events; entry fields ``e`` (epoch),
                                                 ``p`` (id of the previous entry) and ``d`` (the event
                                                 body JSON, without its offset)
``tf:{S}:meta``                         hash     ``epoch``, ``last`` (id of the newest entry), ``created_ms``
``tf:{S}:queue``                        list     generation ids accepted and not yet finished, in order;
                                                 the head is the one running or about to run
``tf:{S}:generations``                  list     every retained generation id of the session, in order
``tf:{S}:gen:G``                        hash     generation G's record (fields in `GenerationField`)
``tf:{S}:gen:G:text``                   string   G's text so far (APPENDed with each delta; cleared
                                                 when a new attempt restarts G)
``tf:{S}:gen:G:reasoning``              string   G's reasoning so far (likewise)
``tf:{S}:gen:G:response``               string   when G was made through ``POST /v1/responses``: the
                                                 request members its Response object echoes (JSON)
``tf:{S}:watchers``                     zset     processes with subscribers of S, scored by when that
                                                 claim expires (ms): who is watching, for auto-cancel;
                                                 each member ``<process>=<subscribers>`` (`watcher_claim`)
``tf:{S}:live``                         channel  pub/sub: each appended entry, for relays
``tf:{S}:idem:K``                       string   ``<generation id> <digest>``: the generation accepted with
                                                 Idempotency-Key K, and the digest of its request
``tf:{S}:producers``                    hash     idempotent producers of apps' events: ``<epoch> <seq>``
``tf:{S}:app``                          hash     ``seq``: the last seq of the session's app events (the
                                                 pseudo-generation ``app``, appended through ``/ds/``)
======================================  =======  ====================================================

Per Durable Streams stream at path ``P`` (`StreamKeys`; ``N`` = ``ds:`` + ``P`` with ``%``, ``{`` and ``}``
percent-encoded, so ``N`` is never a session id and cannot break out of its tag):

======================================  =======  ====================================================
``tf:{N}:events``                       stream   the stream's messages, in the session layout (``e``,
                                                 ``p``, ``d``: ``d`` holds the message's bytes; an empty
                                                 ``d`` is the marker that closed the stream)
``tf:{N}:meta``                         hash     ``epoch``, ``last`` as for a session; ``tail`` (newest
                                                 message id), ``ct`` (content type), ``ctn`` (its media
                                                 type), ``ttl``, ``expires_at``, ``closed``, ``closed_by``,
                                                 ``wseq`` (Stream-Seq), ``fork_of``, ``fork_offset``,
                                                 ``fork_sub``, ``forks``, ``deleted``, ``owner``
``tf:{N}:producers``                    hash     per producer id: ``<epoch> <seq>``, its last accepted
``tf:{N}:live``                         channel  as a session's: each appended entry
======================================  =======  ====================================================

Global (no hash tag: each name lands in a slot of its own):

======================================  =======  ====================================================
name                                    type     holds
======================================  =======  ====================================================
``tf:generation:G``                     string   the session id owning generation G
``tf:ratelimit:NAME``                   string   the request allowance of principal NAME (GCRA)
``tf:ds:owned:NAME``                    set      the Durable Streams paths principal NAME created
``tf:cancellations``                    channel  pub/sub: ``<generation id> <reason>``, for workers
``tf:relay:idle``                       channel  pub/sub: never published to; a relay with no session to
                                                 watch stays subscribed to it
``tf:arq:queue``                        zset     arq's job queue; arq names its other keys ``arq:*``
``arq:in-progress:G``                   string   arq's claim on job G (its name is arq's; a worker
                                                 shortens its expiry to the lease)
======================================  =======  ====================================================
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ARQ_IN_PROGRESS_PREFIX",
    "ARQ_QUEUE",
    "CANCEL_CHANNEL",
    "RELAY_IDLE_CHANNEL",
    "WATCHERS_PATTERN",
    "GenerationField",
    "MetaField",
    "SessionKeys",
    "StreamKeys",
    "arq_in_progress_key",
    "ds_owned_key",
    "generation_index_key",
    "parse_watcher_claim",
    "rate_limit_key",
    "session_of_watchers_key",
    "session_producers_key",
    "watcher_claim",
]

ARQ_QUEUE = "tf:arq:queue"
#: arq's own prefix of the key that marks a job claimed (``arq.constants.in_progress_key_prefix``; a test
#: keeps the two equal). Named here because the worker shortens that key's expiry to its lease.
ARQ_IN_PROGRESS_PREFIX = "arq:in-progress:"
#: Broadcast channel of cancellation requests: each message is ``<generation id> <reason>``.
CANCEL_CHANNEL = "tf:cancellations"
#: A channel nothing publishes to: a relay watching no session stays subscribed to it, so its pub/sub
#: connection keeps its mode instead of being torn down and rebuilt.
RELAY_IDLE_CHANNEL = "tf:relay:idle"


def generation_index_key(generation_id: str) -> str:
    return f"tf:generation:{generation_id}"


def rate_limit_key(name: str) -> str:
    return f"tf:ratelimit:{name}"


def ds_owned_key(name: str) -> str:
    return f"tf:ds:owned:{name}"


def arq_in_progress_key(job_id: str) -> str:
    return ARQ_IN_PROGRESS_PREFIX + job_id


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
    TOOL_CALLS = "tool_calls"  # JSON list of {index, id, name, arguments} so far (of the current attempt)


class SessionKeys:
    """The names of one session's keys. Build once per session and reuse."""

    __slots__ = ("app", "events", "generations", "live", "meta", "queue", "session_id", "tag", "watchers")

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.tag = f"tf:{{{session_id}}}"
        self.events = f"{self.tag}:events"
        self.meta = f"{self.tag}:meta"
        self.queue = f"{self.tag}:queue"
        self.generations = f"{self.tag}:generations"
        self.live = f"{self.tag}:live"
        self.watchers = f"{self.tag}:watchers"
        self.app = f"{self.tag}:app"

    def generation(self, generation_id: str) -> str:
        return f"{self.tag}:gen:{generation_id}"

    def generation_text(self, generation_id: str) -> str:
        return f"{self.tag}:gen:{generation_id}:text"

    def generation_reasoning(self, generation_id: str) -> str:
        return f"{self.tag}:gen:{generation_id}:reasoning"

    def idempotency(self, idempotency_key: str) -> str:
        """Where an Idempotency-Key's generation is remembered. The session's tag comes first, so braces
        in a client's key cannot move it to another slot."""
        return f"{self.tag}:idem:{idempotency_key}"

    def generation_response(self, generation_id: str) -> str:
        """The OpenAI Responses request a generation was made from (``tokenfan.store.front_door``)."""
        return f"{self.tag}:gen:{generation_id}:response"


class StreamKeys:
    """The names of one Durable Streams stream's keys. `name` is what the live engine knows the stream by:
    its keys are those of a session of that id (`SessionKeys`), so the live tail and the feeds serve a
    stream exactly as they serve a session."""

    __slots__ = ("events", "live", "meta", "name", "path", "producers")

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = "ds:" + path.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
        session = SessionKeys(self.name)
        self.events = session.events
        self.meta = session.meta
        self.live = session.live
        self.producers = f"{session.tag}:producers"


def session_producers_key(session_id: str) -> str:
    """The idempotent producers of apps appending to session S (``tf:{S}:producers``)."""
    return f"{SessionKeys(session_id).tag}:producers"


#: Every session's ``watchers`` key, as a SCAN pattern (braces are no pattern characters).
WATCHERS_PATTERN = "tf:{*}:watchers"


def session_of_watchers_key(key: str) -> str | None:
    """The session whose ``tf:{S}:watchers`` key `key` is (None for any other name)."""
    if key.startswith("tf:{") and key.endswith("}:watchers"):
        return key[len("tf:{") : -len("}:watchers")]
    return None


def watcher_claim(owner: str, subscribers: int) -> str:
    """A member of ``tf:{S}:watchers``: the claiming process and how many subscribers of S it serves."""
    return f"{owner}={subscribers}"


def parse_watcher_claim(member: str) -> tuple[str, int]:
    """(process, subscribers) of a claim; a claim without a count (an older process) counts none."""
    owner, separator, count = member.rpartition("=")
    if separator and count.isdigit():
        return owner, int(count)
    return member, 0
