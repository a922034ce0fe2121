"""Identifiers: session ids chosen by clients, generation ids and stream epochs minted by us.

Pure: no I/O. Session ids end up inside Redis key hash tags and URL paths, so their charset excludes
``{``, ``}``, ``/`` and whitespace by construction.
"""

from __future__ import annotations

import re
import secrets
import time

__all__ = [
    "GENERATION_ID_PATTERN",
    "SESSION_ID_MAX_LENGTH",
    "SESSION_ID_PATTERN",
    "generation_time_ms",
    "is_generation_id",
    "is_session_id",
    "new_epoch",
    "new_generation_id",
]

SESSION_ID_MAX_LENGTH = 128
#: 1-128 characters from ``A-Z a-z 0-9 . _ -``, starting with a letter or digit.
SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
#: ``gen_`` then 26 Crockford base32 characters (a ULID: sortable by creation time).
GENERATION_ID_PATTERN = r"^gen_[0-9A-HJKMNP-TV-Z]{26}$"

_SESSION_ID = re.compile(SESSION_ID_PATTERN)
_GENERATION_ID = re.compile(GENERATION_ID_PATTERN)
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_EPOCH_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def is_session_id(value: str) -> bool:
    return _SESSION_ID.fullmatch(value) is not None


def is_generation_id(value: str) -> bool:
    return _GENERATION_ID.fullmatch(value) is not None


def _crockford(number: int, length: int) -> str:
    chars = []
    for _ in range(length):
        number, digit = divmod(number, 32)
        chars.append(_CROCKFORD[digit])
    return "".join(reversed(chars))


def new_generation_id(now_ms: int | None = None) -> str:
    """A ULID-shaped id: 48 bits of milliseconds then 80 random bits."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    return "gen_" + _crockford(ms & ((1 << 48) - 1), 10) + _crockford(secrets.randbits(80), 16)


def generation_time_ms(generation_id: str) -> int:
    """When a generation id was minted (unix ms): its first 10 characters after ``gen_``. Lets anything made
    from a generation (an OpenAI ``created`` stamp) carry one fixed time without storing it."""
    if not is_generation_id(generation_id):
        raise ValueError(f"not a generation id: {generation_id[:40]!r}")
    number = 0
    for char in generation_id[4:14]:
        number = number * 32 + _CROCKFORD.index(char)
    return number


def new_epoch() -> str:
    """A fresh stream epoch: 8 lowercase base36 characters (about 41 bits of randomness)."""
    return "".join(secrets.choice(_EPOCH_ALPHABET) for _ in range(8))
