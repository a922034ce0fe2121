"""Floor 0, the wire contract every stage shares: events, offsets, identifiers, errors and Redis names.

Pure: nothing here does I/O or imports an I/O library, so each stage can rely on it without pulling the
others in (import-linter enforces it; see pyproject.toml).
"""
