"""The WebSocket relay: a pure subscription core (`handoff`), the shared live feed, the server."""
