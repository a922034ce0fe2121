"""The one exception tree of tokenfan. Each client-facing error carries its consequence on the wire.

::

    TokenfanError                       root; never raised itself
    ├── ClientError                     the request was wrong; retrying it unchanged will fail again
    │   ├── InvalidRequest              400  close 4400   invalid_request
    │   │   ├── InvalidSessionId        400  close 4400   invalid_session_id
    │   │   ├── InvalidOffset           400  close 4400   invalid_offset
    │   │   ├── InvalidJson             400               invalid_json
    │   │   ├── InvalidProducer         400               invalid_producer (Durable Streams headers)
    │   │   └── InvalidParameter        400               invalid_parameter (names its `param`)
    │   │       ├── UnknownParameter    400               unknown_parameter
    │   │       └── UnsupportedParameter 400              unsupported_parameter
    │   ├── Unauthorized                401  close 4401   unauthorized
    │   ├── Forbidden                   403  close 4403   forbidden
    │   │   └── StaleProducerEpoch      403               stale_producer_epoch (a fenced producer)
    │   ├── NotFound                    404  close 4404   not_found
    │   │   ├── GenerationNotFound      404               generation_not_found
    │   │   ├── SessionNotFound         404               session_not_found
    │   │   ├── ResponseNotFound        404               response_not_found
    │   │   ├── UnknownOffset           404  close 4404   unknown_offset
    │   │   └── StreamNotFound          404               stream_not_found
    │   ├── MethodNotAllowed            405               method_not_allowed
    │   ├── Conflict                    409  close 4409   conflict
    │   │   ├── StreamExists            409               stream_exists (with another configuration)
    │   │   ├── StreamClosed            409               stream_closed
    │   │   ├── ContentTypeMismatch     409               content_type_mismatch
    │   │   ├── SequenceConflict        409               sequence_conflict (Stream-Seq went back)
    │   │   └── ProducerSequenceGap     409               producer_sequence_gap
    │   ├── OffsetGone                  410  close 4410   offset_gone (rebuild from a snapshot)
    │   │   └── StreamGone              410               stream_gone (deleted; its forks live on)
    │   ├── PayloadTooLarge             413  close 1009   payload_too_large
    │   ├── IdempotencyKeyReused        422               idempotency_key_reused (another request, one key)
    │   └── RateLimited                 429  close 4429   rate_limited
    │       └── TooManyStreams          429               too_many_streams (per API key)
    └── ServerError                     our side or a dependency failed; retrying later may work
        └── ServiceUnavailable          503  close 1013   unavailable (shutting down, overloaded)
            └── StorageUnavailable      503  close 1013   unavailable (Redis unreachable or refusing)

Every HTTP error body also names its `param` (the request member at fault, or null) and a `type` chosen
by status (`error_type`), which is how OpenAI's SDKs read an error: the OpenAI-compatible front door
answers in their shape, and so does every other endpoint.

Third-party exceptions are translated at the boundary where they arise and never leak upwards: every
Redis error leaves the store as `StorageUnavailable`, every upstream error leaves the worker's upstream
adapter as a failure type of its own. Pure: no I/O.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ClientError",
    "Conflict",
    "ContentTypeMismatch",
    "Forbidden",
    "GenerationNotFound",
    "IdempotencyKeyReused",
    "InvalidJson",
    "InvalidOffset",
    "InvalidParameter",
    "InvalidProducer",
    "InvalidRequest",
    "InvalidSessionId",
    "MethodNotAllowed",
    "NotFound",
    "OffsetGone",
    "PayloadTooLarge",
    "ProducerSequenceGap",
    "RateLimited",
    "ResponseNotFound",
    "SequenceConflict",
    "ServerError",
    "ServiceUnavailable",
    "SessionNotFound",
    "StaleProducerEpoch",
    "StorageUnavailable",
    "StreamClosed",
    "StreamExists",
    "StreamGone",
    "StreamNotFound",
    "TokenfanError",
    "TooManyStreams",
    "Unauthorized",
    "UnknownOffset",
    "UnknownParameter",
    "UnsupportedParameter",
    "error_type",
]


class TokenfanError(Exception):
    """Root of every error tokenfan raises on purpose."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    close_code: ClassVar[int] = 1011

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_body(self) -> dict[str, object]:
        """The JSON body every HTTP error response carries (see docs/PROTOCOL.md, Errors)."""
        return {"error": {"code": self.code, "message": self.message, "status": self.http_status}}


class ClientError(TokenfanError):
    code = "invalid_request"
    http_status = 400
    close_code = 4400


class InvalidRequest(ClientError):
    code = "invalid_request"


class InvalidSessionId(InvalidRequest):
    code = "invalid_session_id"


class InvalidOffset(InvalidRequest):
    code = "invalid_offset"


class InvalidJson(InvalidRequest):
    code = "invalid_json"


class InvalidParameter(InvalidRequest):
    """One member of the request is wrong; `param` names it (``messages[0].role``), as OpenAI does."""

    code = "invalid_parameter"

    def __init__(self, message: str, *, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class InvalidProducer(InvalidRequest):
    """Durable Streams producer headers that are incomplete, malformed, or open an epoch past seq 0."""

    code = "invalid_producer"


class UnknownParameter(InvalidParameter):
    """A member no version of the API knows: a typo must not silently change a request."""

    code = "unknown_parameter"


class UnsupportedParameter(InvalidParameter):
    """A member (or a value of one) that OpenAI knows and tokenfan cannot carry, such as ``n`` above 1."""

    code = "unsupported_parameter"


class Unauthorized(ClientError):
    code = "unauthorized"
    http_status = 401
    close_code = 4401


class Forbidden(ClientError):
    code = "forbidden"
    http_status = 403
    close_code = 4403


class StaleProducerEpoch(Forbidden):
    """A Durable Streams producer whose epoch a newer one has fenced off (a zombie)."""

    code = "stale_producer_epoch"


class NotFound(ClientError):
    code = "not_found"
    http_status = 404
    close_code = 4404


class GenerationNotFound(NotFound):
    code = "generation_not_found"


class SessionNotFound(NotFound):
    code = "session_not_found"


class ResponseNotFound(NotFound):
    code = "response_not_found"


class UnknownOffset(NotFound):
    code = "unknown_offset"


class StreamNotFound(NotFound):
    code = "stream_not_found"


class MethodNotAllowed(ClientError):
    code = "method_not_allowed"
    http_status = 405


class Conflict(ClientError):
    code = "conflict"
    http_status = 409
    close_code = 4409


class IdempotencyKeyReused(ClientError):
    """An ``Idempotency-Key`` came back with another request than the one it was first given: answering
    with the first generation would pass it off as this request's."""

    code = "idempotency_key_reused"
    http_status = 422


class StreamExists(Conflict):
    """A Durable Streams PUT for a stream that exists with another configuration."""

    code = "stream_exists"


class StreamClosed(Conflict):
    code = "stream_closed"


class ContentTypeMismatch(Conflict):
    code = "content_type_mismatch"


class SequenceConflict(Conflict):
    """A Durable Streams append whose Stream-Seq does not sort after the last one."""

    code = "sequence_conflict"


class ProducerSequenceGap(Conflict):
    code = "producer_sequence_gap"


class OffsetGone(ClientError):
    """The offset is no longer retained, or belongs to an earlier incarnation of the stream."""

    code = "offset_gone"
    http_status = 410
    close_code = 4410


class StreamGone(OffsetGone):
    """A deleted Durable Streams stream that its forks still read: its path stays taken until they go."""

    code = "stream_gone"


class PayloadTooLarge(ClientError):
    code = "payload_too_large"
    http_status = 413
    close_code = 1009


class RateLimited(ClientError):
    code = "rate_limited"
    http_status = 429
    close_code = 4429

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyStreams(RateLimited):
    """An API key holds as many Durable Streams streams as it may (``TOKENFAN_DS_MAX_STREAMS_PER_KEY``)."""

    code = "too_many_streams"


class ServerError(TokenfanError):
    code = "internal_error"
    http_status = 500
    close_code = 1011


class ServiceUnavailable(ServerError):
    code = "unavailable"
    http_status = 503
    close_code = 1013


class StorageUnavailable(ServiceUnavailable):
    """Redis could not be reached, or refused the command (restarting, read-only after a failover, out of
    memory). Every store operation is safe to retry."""

    def __init__(self, message: str = "storage is unreachable; retry shortly") -> None:
        super().__init__(message)


def error_type(status: int) -> str:
    """The ``type`` member of an HTTP error with this status, in OpenAI's vocabulary: what its SDKs expect."""
    if status >= 500:
        return "server_error"
    if status == 429:
        return "requests"
    return "invalid_request_error"
