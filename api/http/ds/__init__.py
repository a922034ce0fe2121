"""A Durable Streams server under ``/ds/`` (docs/PROTOCOL.md, "Durable Streams"): any path is a stream, and
``/ds/sessions/{session_id}`` is a session, read as the relay sends it and appended to by apps."""

__all__: list[str] = []
