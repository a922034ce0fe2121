"""Floor 2, the live engine under every transport: one shared reader per session, the subscription
state table, frame encoding and presence. It knows nothing of WebSocket or HTTP; `api.relay` and
`api.http` drive it."""
