"""Redis Cluster slots: which of the 16,384 slots holds a session.

Every key of a session carries the session id as its hash tag (`tokenfan.contract.keys`), so the slot of
the session id is the slot of all its keys. `Store.write` groups a batch by slot with it in cluster mode.
"""

from __future__ import annotations

__all__ = ["SLOTS", "slot_of"]

SLOTS = 16384


def _crc16(data: bytes) -> int:
    """CRC-16/XMODEM, the checksum Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def slot_of(session_id: str) -> int:
    """The Redis Cluster slot holding every key of `session_id` (its hash tag)."""
    return _crc16(session_id.encode()) % SLOTS
