"""``tokenfan secrets DIR``: the credentials a deployment needs, made once, kept as files.

Writes ``DIR/api_keys`` (``name:key``) and ``DIR/token_secrets`` when they do not exist yet, readable by
their owner only, and leaves existing ones as they are, so running it at every start is safe. Processes
read them through ``TOKENFAN_API_KEYS_FILE`` and ``TOKENFAN_TOKEN_SECRETS_FILE``. A new API key is
printed once, when it is made: it is the deployment's first credential.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenfan.runtime.auth import new_api_key, new_token_secret

__all__ = ["ensure_secrets"]


def ensure_secrets(directory: Path, *, key_name: str = "admin") -> str | None:
    """Make the missing secret files in `directory`; returns the API key when this call made it."""
    directory.mkdir(parents=True, exist_ok=True)
    made_key = None
    if not (directory / "api_keys").exists():
        made_key = new_api_key()
        _write_new(directory / "api_keys", f"{key_name}:{made_key}")
    if not (directory / "token_secrets").exists():
        _write_new(directory / "token_secrets", new_token_secret())
    return made_key


def _write_new(path: Path, content: str) -> None:
    """Create `path` with `content`, owner-only, atomically: a reader never sees half a secret."""
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(content + "\n")
    partial.replace(path)
