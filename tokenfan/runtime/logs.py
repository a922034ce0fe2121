"""Structured logging: structlog key-value events, JSON in production, readable on a terminal.

Every component calls `configure_logging` once at start-up. Library loggers (uvicorn, arq, websockets) go
through the same processors, so their lines are structured and redacted too. The redaction processor
removes secrets by key name, by type (`Secret`) and by shape (credentials inside URLs, bearer tokens).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from tokenfan.runtime.settings import Secret, Settings

__all__ = ["REDACTED", "configure_logging", "redact_secrets", "scrub"]

REDACTED = "***"
# `token` only as a whole final word (access_token, token), so usage counts (prompt_tokens) stay readable.
_SECRET_KEYS = re.compile(
    r"(pass(word)?|secret|api[_-]?key|authorization|cookie|credential|(^|[_-])token$)", re.I
)
_MAX_DEPTH = 8
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<userinfo>[^@/\s]+)@", re.I)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")
_KEYLIKE = re.compile(r"\b(sk|tf|tfk|tfs)[-_][A-Za-z0-9_-]{16,}\b")


def scrub(text: str) -> str:
    """Remove credentials from free text: URL userinfo, bearer tokens, API-key-shaped words."""
    text = _URL_CREDENTIALS.sub(lambda m: m.group("scheme") + REDACTED + "@", text)
    text = _BEARER.sub(r"\1 " + REDACTED, text)
    return _KEYLIKE.sub(REDACTED, text)


def _redact(value: Any, depth: int = 0) -> Any:
    if isinstance(value, Secret):
        return REDACTED
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    if depth >= _MAX_DEPTH:
        return REDACTED  # fail closed: nothing is logged that was not looked at
    if isinstance(value, dict):
        return {
            k: (REDACTED if isinstance(k, str) and _SECRET_KEYS.search(k) else _redact(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v, depth + 1) for v in value]
    return scrub(repr(value))  # exceptions and other objects render through repr: scrub that


def _drop_color_message(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict.pop("color_message", None)  # uvicorn's colored duplicate of the message
    return event_dict


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: no secret leaves the process through a log line."""
    for key in list(event_dict):
        if _SECRET_KEYS.search(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact(event_dict[key])
    return event_dict


def configure_logging(settings: Settings, component: str) -> None:
    """Set up structlog and stdlib logging for one component process. Call once, first thing."""
    use_json = settings.log_format == "json" or (settings.log_format == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _drop_color_message,
        redact_secrets,
    ]
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    level = getattr(logging, settings.log_level.upper())
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Access logs repeat what our own request events say, with less context.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # arq's per-job lines (→, ←, ↻) repeat the worker's own (generation_started, _finished, job_deferred),
    # without the session: a generation's every line must name it.
    logging.getLogger("arq.worker").setLevel(max(level, logging.WARNING))
    logging.getLogger("websockets.server").setLevel(max(level, logging.INFO))
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(component=component)
