"""Appending to a session's stream: the write path every running generation's events take.

**Exactly-once append.** Every event of a generation carries ``seq`` = previous + 1. The write script
skips an event whose seq is already stored, so a write retried after an ambiguous failure (connection lost
after the command was sent) can never show a subscriber the same event twice.

**Gap detection for relays.** Each appended entry is published with its predecessor's id
(``<epoch> <prev-id> <id> <body>``), so a relay that missed a pub/sub message notices and repairs from
the stream instead of skipping.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from tokenfan.contract.events import GenerationStatus
from tokenfan.contract.ids import new_epoch
from tokenfan.store.batch import ScriptCall, run_calls
from tokenfan.store.boundary import storage_call
from tokenfan.store.core import StoreCore, now_ms
from tokenfan.store.records import WriteOutcome, WriteResult
from tokenfan.store.slots import slot_of
from tokenfan.store.write_layout import ItemKeys, WriteCall, WriteItem, item_keys, packed_write

__all__ = ["Writes"]


class Writes(StoreCore):
    @storage_call
    async def write(self, items: Sequence[WriteItem]) -> list[WriteResult]:
        """Append (and finish) for many generations: one script call per Redis, or per cluster slot.

        Safe to retry as a whole after any failure: already-stored events are skipped by seq.
        """
        if not items:
            return []
        now, epoch = now_ms(), new_epoch()
        if not self.topology.is_cluster:
            # One Redis: one script call carries every generation, whatever its slot.
            (reply,) = await run_calls(self.topology, [self._packed(items, now, epoch)])
            return [_write_result(row) for row in reply]
        # A cluster: one call per slot (a script's keys must share one), pipelined per node.
        by_slot: dict[int, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            by_slot[slot_of(item.session_id)].append(index)
        groups = list(by_slot.values())
        calls = [self._packed([items[i] for i in group], now, epoch) for group in groups]
        results: list[WriteResult | None] = [None] * len(items)
        for group, reply in zip(groups, await run_calls(self.topology, calls), strict=True):
            for index, row in zip(group, reply, strict=True):
                results[index] = _write_result(row)
        return [result for result in results if result is not None]

    def _packed(self, items: Sequence[WriteItem], now: int, epoch: str) -> ScriptCall:
        """One script call carrying `items` (one slot's, on a cluster), packed: routed by its first key."""
        call = WriteCall(now, self.stream_max_length, self.session_ttl_seconds, epoch, len(items))
        first: ItemKeys = item_keys(items[0].session_id, items[0].generation_id)
        script = self.scripts.write
        return script, [first.events], packed_write(script.sha, items, call)


#: write.lua's codes as they come back: a dict look-up per item rather than an enum call.
_OUTCOMES: dict[bytes | str, WriteOutcome] = {
    **{outcome.value: outcome for outcome in WriteOutcome},
    **{outcome.value.encode(): outcome for outcome in WriteOutcome},
}


_OK, _RUNNING = WriteOutcome.OK, GenerationStatus.RUNNING.value


def _write_result(row: list[Any] | bytes | str) -> WriteResult:
    """One item's reply. Per generation per flush, so kept lean: the offset is parsed only when asked for,
    and the common reply (written, still running, nothing asked) is one string (see write.lua)."""
    if type(row) is not list:
        epoch, last, seq = (row.decode() if type(row) is bytes else str(row)).split(" ")
        return WriteResult(_OK, int(seq), epoch, last, "", None, _RUNNING)
    code, epoch, last, last_seq, cancel, head, status = [
        part.decode() if type(part) is bytes else str(part) for part in row
    ]
    outcome = _OUTCOMES.get(code)
    if outcome is None:
        outcome = WriteOutcome(code)  # raises: a code this side does not know fails loudly
    return WriteResult(outcome, int(last_seq), epoch, last, cancel, head or None, status)
