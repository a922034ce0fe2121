"""Everything clients talk to: the HTTP API (`api.http`) and the WebSocket relay (`api.relay`)."""
