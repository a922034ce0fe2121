"""What the relay measures besides the live engine (`api.live.metrics`): its connections, and the close
codes it sends."""

from __future__ import annotations

from collections.abc import Callable

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from tokenfan.runtime.metrics import Metrics

__all__ = ["RelayMetrics"]


class RelayMetrics:
    """The relay's own instruments in one process."""

    def __init__(self, metrics: Metrics) -> None:
        self.connections = metrics.gauge(
            "tokenfan_relay_connections", "WebSocket connections open now (single- and multi-session)."
        )
        self.closes = metrics.counter(
            "tokenfan_relay_closes_total",
            "WebSocket connections the relay closed, by the close code it sent (an echo of the client's own "
            "close counts too).",
            ["code"],
        )

    def count_connections(self, connections: Callable[[], int]) -> None:
        self.connections.set_function(connections)

    def closed(self, websocket: ServerConnection) -> None:
        """The handler of `websocket` ends: count the close code sent, or the 1000 the server sends once the
        handler returns on an open connection (a connection lost without a close sends none)."""
        sent = websocket.protocol.close_sent
        if sent is not None:
            self.closes.labels(str(sent.code)).inc()
        elif websocket.protocol.state is State.OPEN:
            self.closes.labels("1000").inc()
