"""The error tree: each error carries the HTTP status, WebSocket close code and error code its docstring
documents, and the table here covers every exported error.
"""

from __future__ import annotations

import json

import pytest

from tokenfan.contract import errors
from tokenfan.contract.errors import (
    ClientError,
    Conflict,
    ContentTypeMismatch,
    Forbidden,
    GenerationNotFound,
    IdempotencyKeyReused,
    InvalidJson,
    InvalidOffset,
    InvalidParameter,
    InvalidProducer,
    InvalidRequest,
    InvalidSessionId,
    MethodNotAllowed,
    NotFound,
    OffsetGone,
    PayloadTooLarge,
    ProducerSequenceGap,
    RateLimited,
    ResponseNotFound,
    SequenceConflict,
    ServerError,
    ServiceUnavailable,
    SessionNotFound,
    StaleProducerEpoch,
    StorageUnavailable,
    StreamClosed,
    StreamExists,
    StreamGone,
    StreamNotFound,
    TokenfanError,
    TooManyStreams,
    Unauthorized,
    UnknownOffset,
    UnknownParameter,
    UnsupportedParameter,
    error_type,
)

#: (class, parent, http status, close code or None where the tree shows none, code) as in errors.py.
ERROR_TABLE: list[tuple[type[TokenfanError], type[Exception], int, int | None, str]] = [
    (InvalidRequest, ClientError, 400, 4400, "invalid_request"),
    (InvalidSessionId, InvalidRequest, 400, 4400, "invalid_session_id"),
    (InvalidOffset, InvalidRequest, 400, 4400, "invalid_offset"),
    (InvalidJson, InvalidRequest, 400, 4400, "invalid_json"),
    (Unauthorized, ClientError, 401, 4401, "unauthorized"),
    (Forbidden, ClientError, 403, 4403, "forbidden"),
    (NotFound, ClientError, 404, 4404, "not_found"),
    (GenerationNotFound, NotFound, 404, None, "generation_not_found"),
    (SessionNotFound, NotFound, 404, None, "session_not_found"),
    (ResponseNotFound, NotFound, 404, None, "response_not_found"),
    (UnknownOffset, NotFound, 404, 4404, "unknown_offset"),
    (Conflict, ClientError, 409, 4409, "conflict"),
    (IdempotencyKeyReused, ClientError, 422, None, "idempotency_key_reused"),
    (OffsetGone, ClientError, 410, 4410, "offset_gone"),
    (PayloadTooLarge, ClientError, 413, 1009, "payload_too_large"),
    (RateLimited, ClientError, 429, 4429, "rate_limited"),
    (InvalidProducer, InvalidRequest, 400, 4400, "invalid_producer"),
    (StaleProducerEpoch, Forbidden, 403, 4403, "stale_producer_epoch"),
    (StreamNotFound, NotFound, 404, None, "stream_not_found"),
    (MethodNotAllowed, ClientError, 405, None, "method_not_allowed"),
    (StreamExists, Conflict, 409, None, "stream_exists"),
    (StreamClosed, Conflict, 409, None, "stream_closed"),
    (ContentTypeMismatch, Conflict, 409, None, "content_type_mismatch"),
    (SequenceConflict, Conflict, 409, None, "sequence_conflict"),
    (ProducerSequenceGap, Conflict, 409, None, "producer_sequence_gap"),
    (StreamGone, OffsetGone, 410, None, "stream_gone"),
    (TooManyStreams, RateLimited, 429, None, "too_many_streams"),
    (ServiceUnavailable, ServerError, 503, 1013, "unavailable"),
    (StorageUnavailable, ServiceUnavailable, 503, 1013, "unavailable"),
]


@pytest.mark.parametrize(
    ("cls", "parent", "status", "close_code", "code"),
    ERROR_TABLE,
    ids=[row[0].__name__ for row in ERROR_TABLE],
)
def test_error_carries_its_wire_consequence(
    cls: type[TokenfanError], parent: type[Exception], status: int, close_code: int | None, code: str
) -> None:
    assert issubclass(cls, parent)
    error = cls("something precise went wrong")
    assert error.http_status == status
    if close_code is not None:
        assert error.close_code == close_code
    assert error.code == code
    assert error.message == "something precise went wrong"
    assert str(error) == "something precise went wrong"
    assert error.to_body() == {
        "error": {"code": code, "message": "something precise went wrong", "status": status}
    }
    assert json.loads(json.dumps(error.to_body())) == error.to_body()


#: The errors that name the request member at fault, as OpenAI's errors do: (class, parent, code).
PARAMETER_ERRORS: list[tuple[type[InvalidParameter], type[Exception], str]] = [
    (InvalidParameter, InvalidRequest, "invalid_parameter"),
    (UnknownParameter, InvalidParameter, "unknown_parameter"),
    (UnsupportedParameter, InvalidParameter, "unsupported_parameter"),
]


@pytest.mark.parametrize(
    ("cls", "parent", "code"), PARAMETER_ERRORS, ids=[row[0].__name__ for row in PARAMETER_ERRORS]
)
def test_parameter_errors_name_the_member_at_fault(
    cls: type[InvalidParameter], parent: type[Exception], code: str
) -> None:
    assert issubclass(cls, parent)
    error = cls("Invalid 'temperature': above 2.", param="temperature")
    assert (error.http_status, error.close_code, error.code) == (400, 4400, code)
    assert error.param == "temperature"
    assert error.message == "Invalid 'temperature': above 2."
    assert cls("no member to blame", param=None).param is None


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "invalid_request_error"), (404, "invalid_request_error"), (429, "requests"), (500, "server_error"),
     (503, "server_error")],
)  # fmt: skip
def test_the_error_type_follows_the_status_as_openai_names_it(status: int, kind: str) -> None:
    assert error_type(status) == kind


def test_error_tree_roots() -> None:
    assert issubclass(ClientError, TokenfanError)
    assert issubclass(ServerError, TokenfanError)
    assert not issubclass(ClientError, ServerError)
    for cls, *_ in ERROR_TABLE:
        assert issubclass(cls, TokenfanError)
        assert issubclass(cls, ClientError) != issubclass(cls, ServerError)
    assert 400 <= ClientError.http_status < 500
    assert ServerError.http_status == 500


def test_error_table_covers_every_exported_error() -> None:
    listed = {row[0].__name__ for row in ERROR_TABLE} | {"TokenfanError", "ClientError", "ServerError"}
    listed |= {row[0].__name__ for row in PARAMETER_ERRORS}
    exported_errors = {name for name in errors.__all__ if isinstance(getattr(errors, name), type)}
    assert listed == exported_errors
