"""The Redis side of the contract: every write and every consistent read of a session, as Lua scripts.

This module is the store's face: everything the other floors use is importable from here.

======================  =================================================================================
module                  holds
======================  =================================================================================
``store``               `Store`, composed of one class per family of calls:
``accepting``           accepting a generation, finding it, cancelling it; the rate limit (API side)
``snapshots``           a session's generations, consistent with an offset (API and relay side)
``presence``            who watches a session (API and relay side)
``attempts``            taking a generation for an attempt; its lease (worker side)
``writes``              appending events and finishing generations, batched (worker side)
``resume``              where a subscriber may resume; the stream's pages (relay side)
``core``                the state those classes share
``records``             the records and results the store returns; its scripts' reply codes
``write_layout``        the write script's KEYS and ARGV, defined once for Python and Lua
``scripts``             the Lua scripts (``lua/*.lua``), loaded once and registered per client
``slots``               the Redis Cluster slot of a session
``connection``          the Redis client; the worker's faster command packing
``boundary``            Redis failures leave the store as `StorageUnavailable`
``jobs``                the job queue (arq): enqueueing a generation's job, handing a session over
``job_runner``          the worker's side of the job queue: claiming jobs, riding out Redis restarts
``cancellations``       the workers' pub/sub listener for cancellation requests
======================  =================================================================================
"""

from __future__ import annotations

from tokenfan.store.connection import redis_client
from tokenfan.store.records import (
    AcceptOutcome,
    AcceptResult,
    GenerationRecord,
    LeaseReply,
    SessionSnapshot,
    StartOutcome,
    StartResult,
    WriteOutcome,
    WriteResult,
)
from tokenfan.store.slots import slot_of
from tokenfan.store.store import Store, verify_storage
from tokenfan.store.write_layout import EventWrite, Finish, WriteItem

__all__ = [
    "AcceptOutcome",
    "AcceptResult",
    "EventWrite",
    "Finish",
    "GenerationRecord",
    "LeaseReply",
    "SessionSnapshot",
    "StartOutcome",
    "StartResult",
    "Store",
    "WriteItem",
    "WriteOutcome",
    "WriteResult",
    "redis_client",
    "slot_of",
    "verify_storage",
]
