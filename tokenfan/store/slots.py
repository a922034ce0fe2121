"""Redis Cluster slots: which of the 16,384 slots holds a session, or any key.

Every key of a session carries the session id as its hash tag (`tokenfan.contract.keys`), so the slot of
the session id is the slot of all its keys. CRC-16/XMODEM is `binascii.crc_hqx` (C), as in redis-py.
"""

from __future__ import annotations

from binascii import crc_hqx

__all__ = ["SLOTS", "key_slot", "slot_of"]

SLOTS = 16384


def slot_of(session_id: str) -> int:
    """The Redis Cluster slot holding every key of `session_id` (its hash tag)."""
    return crc_hqx(session_id.encode(), 0) % SLOTS


def key_slot(key: str | bytes) -> int:
    """The slot of any key: only its first non-empty ``{...}`` is hashed when it has one."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc_hqx(raw, 0) % SLOTS
