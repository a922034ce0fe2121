"""What a client may send the relay (docs/PROTOCOL.md): parsed once, into a typed message or a refusal.

``subscribe`` and ``unsubscribe`` manage the sessions of a multi-session connection (``/v1/stream``);
``refresh`` extends any connection's subscriptions with a fresh credential, and is all a single-session
stream takes. Anything else is refused (`Invalid`), and the relay answers it with an error frame (4400).
Pure: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["ClientMessage", "Invalid", "Refresh", "Subscribe", "Unsubscribe", "parse_message"]


@dataclass(frozen=True, slots=True)
class Subscribe:
    session_id: str
    after: str | None = None
    token: str | None = None  # a credential for this session alone, instead of the connection's


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    session_id: str


@dataclass(frozen=True, slots=True)
class Refresh:
    token: str
    session_id: str | None = None  # None: every subscription the token allows


@dataclass(frozen=True, slots=True)
class Invalid:
    """A message the relay refuses (answered with an error frame, code 4400)."""

    reason: str
    session_id: str | None = None  # the session it names, if any, so the error frame can say which


ClientMessage = Subscribe | Unsubscribe | Refresh | Invalid

_SHAPE = "a message is {'type': 'subscribe' | 'unsubscribe' | 'refresh', ...}"
_SINGLE_SESSION_SHAPE = "this stream takes one message: {'type': 'refresh', 'token': '…'}"


def parse_message(raw: str | bytes, *, multi_session: bool = True) -> ClientMessage:
    """One client message, as sent (text frames hold JSON; binary frames are refused). A single-session
    stream (`multi_session` false) takes ``refresh`` only."""
    if isinstance(raw, bytes):
        return Invalid("send text frames holding JSON")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        return Invalid("a message must be a JSON object")
    if not isinstance(value, dict):
        return Invalid("a message must be a JSON object")
    session = value.get("session_id")
    kind = value.get("type")
    if kind == "refresh":
        return _refresh(value, session)
    if not multi_session:
        return Invalid(_SINGLE_SESSION_SHAPE)
    if kind not in ("subscribe", "unsubscribe"):
        return Invalid(_SHAPE, session if isinstance(session, str) else None)
    if not isinstance(session, str):
        return Invalid("'session_id' must be a string")
    if kind == "unsubscribe":
        return Unsubscribe(session)
    return _subscribe(value, session)


def _subscribe(value: dict[str, Any], session_id: str) -> Subscribe | Invalid:
    after, token = value.get("after"), value.get("token")
    if after is not None and not isinstance(after, str):
        return Invalid("'after' must be an offset string", session_id)
    if token is not None and not isinstance(token, str):
        return Invalid("'token' must be a string", session_id)
    return Subscribe(session_id, after, token)


def _refresh(value: dict[str, Any], session_id: object) -> Refresh | Invalid:
    token = value.get("token")
    if not isinstance(token, str) or not (session_id is None or isinstance(session_id, str)):
        return Invalid("a refresh is {'type': 'refresh', 'token': '…', 'session_id'?: '…'}")
    return Refresh(token, session_id)
