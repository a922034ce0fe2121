"""Logs that never carry a secret: redaction by key, by type and by shape, and the same through the real
logging configuration, for our own events and for third-party library records alike.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from tokenfan.runtime.logs import REDACTED, configure_logging, redact_secrets, scrub
from tokenfan.runtime.settings import Secret, Settings


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "apiKey",
        "OPENAI_API_KEY",
        "x-api-key",
        "password",
        "redis_pass",
        "token",
        "access_token",
        "authorization",
        "Authorization",
        "client_secret",
        "cookie",
        "credentials",
    ],
)
def test_secret_keys_are_redacted(key: str) -> None:
    event = redact_secrets(None, "info", {"event": "connect", key: "plain-looking-value"})
    assert event[key] == REDACTED
    assert event["event"] == "connect"


def test_secret_values_are_redacted_whatever_their_key() -> None:
    event = redact_secrets(None, "info", {"event": "e", "settings_value": Secret("hunter2")})
    assert event["settings_value"] == REDACTED


@pytest.mark.parametrize(
    ("text", "secret", "expected"),
    [
        ("redis://user:pass@host", "user:pass", "redis://***@host"),
        ("rediss://:pw@h:1/0", ":pw", "rediss://***@h:1/0"),
        ("connect to redis://default:s3cr3t@10.0.0.1:6379/0 failed", "s3cr3t", None),
        ("https://alice:wonder@api.example.com/v1", "wonder", "https://***@api.example.com/v1"),
        ("Authorization: Bearer abc.def", "abc.def", "Authorization: Bearer ***"),
        ("bearer eyJhbGciOi.eyJzdWIi.sig-_=", "eyJhbGciOi", None),
        ("key sk-live-abcdefghijklmnopqrstuvwxyz in use", "abcdefghijklmnop", "key *** in use"),
        ("sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX0123", "ABCDEFGHIJKLMNOP", "***"),
        ("tfk_0123456789abcdefghij", "0123456789abcdef", "***"),
    ],
)
def test_scrub_removes_credentials_from_text(text: str, secret: str, expected: str | None) -> None:
    cleaned = scrub(text)
    assert secret not in cleaned
    assert REDACTED in cleaned
    if expected is not None:
        assert cleaned == expected
    event = redact_secrets(None, "info", {"event": text, "detail": text})
    assert secret not in event["event"]
    assert secret not in event["detail"]


@pytest.mark.parametrize(
    "text",
    [
        "the quick brown fox jumps over the lazy dog",
        "redis://127.0.0.1:6379/0",
        "https://api.openai.com/v1/chat/completions",
        "mail alice@example.com about gen_01JD3Q4Z5X6Y7W8V9T0S1R2P3N",
        "sk-short",
        "task-manager-background-job-queue",
        "offset abc123:1732406400123-0, seq 42",
        "Ünïcödé 世界 🎉",
        "",
    ],
)
def test_ordinary_text_survives(text: str) -> None:
    assert scrub(text) == text
    assert redact_secrets(None, "info", {"event": text, "note": text}) == {"event": text, "note": text}


def test_nested_values_are_redacted() -> None:
    event = redact_secrets(
        None,
        "info",
        {
            "event": "request",
            "request": {
                "model": "gpt",
                "headers": {"Authorization": "Bearer xyz", "accept": "json"},
                "upstreams": [
                    {"url": "redis://u:pw1@h/0", "api_key": "k1"},
                    ("redis://u:pw2@h/0", Secret("pw3")),
                ],
            },
            "count": 3,
        },
    )
    assert event["request"]["model"] == "gpt"
    assert event["request"]["headers"] == {"Authorization": REDACTED, "accept": "json"}
    first, second = event["request"]["upstreams"]
    assert first == {"url": "redis://***@h/0", "api_key": REDACTED}
    assert list(second) == ["redis://***@h/0", REDACTED]
    assert event["count"] == 3
    flat = json.dumps(event)
    for secret in ("xyz", "pw1", "k1", "pw2", "pw3"):
        assert secret not in flat


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    levels = {name: logging.getLogger(name).level for name in ("uvicorn.access", "websockets.server")}
    yield
    for handler in list(root.handlers):
        if isinstance(handler.formatter, structlog.stdlib.ProcessorFormatter):
            root.removeHandler(handler)
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


@pytest.mark.usefixtures("restore_logging")
def test_configured_logging_emits_json_without_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(Settings.from_env({"TOKENFAN_LOG_FORMAT": "json"}), "test")
    structlog.get_logger().info(
        "x", api_key="sk-live-abcdefghijklmnopqrstuvwxyz", url="redis://u:s3cr3tpw@h/0"
    )
    logging.getLogger("third.party").warning("connecting to redis://u:s3cr3tpw@h/0")
    logging.getLogger("third.party").warning("retrying %s", "rediss://:s3cr3tpw@h:1/0")
    try:
        raise ConnectionError("Error connecting to redis://u:s3cr3tpw@h/0 with Bearer tok.s3cr3tpw")
    except ConnectionError:
        logging.getLogger("third.party").exception("gave up")
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 4, captured.err
    for text in (captured.err, captured.out):
        assert "s3cr3tpw" not in text
        assert "abcdefghijklmnop" not in text
    records = [json.loads(line) for line in lines]
    assert all(isinstance(record, dict) for record in records)
    ours, third, formatted, crashed = records
    assert ours["event"] == "x"
    assert ours["api_key"] == REDACTED
    assert ours["url"] == "redis://***@h/0"
    assert ours["component"] == "test"
    assert ours["level"] == "info"
    assert third["event"] == "connecting to redis://***@h/0"
    assert third["level"] == "warning"
    assert third["component"] == "test"
    assert formatted["event"] == "retrying rediss://***@h:1/0"
    assert crashed["event"] == "gave up"
    assert "ConnectionError" in crashed["exception"]


@pytest.mark.usefixtures("restore_logging")
def test_configured_logging_honours_the_level(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(
        Settings.from_env({"TOKENFAN_LOG_FORMAT": "json", "TOKENFAN_LOG_LEVEL": "warning"}), "t"
    )
    structlog.get_logger().info("quiet")
    logging.getLogger("third.party").info("quiet too")
    structlog.get_logger().warning("loud")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [line["event"] for line in lines] == ["loud"]
