"""Settings: typed configuration parsed once from the environment, every bad value refused naming its
variable, the documentation table kept in step with the fields, and secrets that never print.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfan.runtime.settings import Secret, Settings, SettingsError, settings_table, with_settings_table

REPO = Path(__file__).resolve().parents[2]
ENV_NAMES = [str(spec.metadata["env"]) for spec in dataclasses.fields(Settings)]


def test_defaults_with_an_empty_environment() -> None:
    loaded = Settings.from_env({})
    assert loaded == Settings()
    assert loaded.redis_url == Secret("redis://127.0.0.1:6379/0")
    assert loaded.log_format == "auto"
    assert loaded.log_level == "info"
    assert loaded.session_ttl_seconds == 86_400
    assert loaded.stream_max_length == 10_000
    assert loaded.openai_base_url is None
    assert loaded.openai_api_key is None
    assert loaded.upstream_connect_timeout_seconds == 10.0
    assert loaded.upstream_read_timeout_seconds == 60.0
    assert loaded.worker_concurrency == 200
    assert loaded.job_timeout_seconds == 3_600
    assert loaded.worker_poll_interval_seconds == 0.05
    assert loaded.flush_window_ms == 5.0
    assert loaded.flush_max_bytes == 16_384
    assert loaded.coalesce is True
    assert loaded.lease_seconds == 20.0
    assert loaded.max_attempts == 3
    assert loaded.upstream_max_retries == 3
    assert loaded.upstream_retry_budget_seconds == 30.0
    assert loaded.max_body_bytes == 1_048_576
    assert loaded.max_messages == 512
    assert loaded.public_relay_url is None
    assert loaded.relay_ping_interval_seconds == 20.0
    assert loaded.relay_ping_timeout_seconds == 20.0
    assert loaded.relay_catchup_page_size == 512


def test_an_explicit_environ_ignores_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENFAN_MAX_ATTEMPTS", "9")
    assert Settings.from_env({}).max_attempts == 3
    assert Settings.from_env().max_attempts == 9


def test_empty_values_mean_unset() -> None:
    loaded = Settings.from_env({"TOKENFAN_MAX_ATTEMPTS": "", "OPENAI_BASE_URL": "", "TOKENFAN_COALESCE": ""})
    assert loaded == Settings()


def test_each_type_parses() -> None:
    loaded = Settings.from_env(
        {
            "REDIS_URL": "rediss://:pw@cache.internal:6380/2",
            "TOKENFAN_LOG_FORMAT": "JSON",
            "TOKENFAN_LOG_LEVEL": " Debug ",
            "TOKENFAN_SESSION_TTL_SECONDS": " 600 ",
            "TOKENFAN_STREAM_MAX_LENGTH": "1_000",
            "OPENAI_BASE_URL": "https://api.example.com/v1",
            "OPENAI_API_KEY": "sk-test-1234",
            "TOKENFAN_UPSTREAM_READ_TIMEOUT_SECONDS": "2.5",
            "TOKENFAN_FLUSH_WINDOW_MS": "0",
            "TOKENFAN_LEASE_SECONDS": "1e1",
            "TOKENFAN_COALESCE": "off",
            "TOKENFAN_UPSTREAM_MAX_RETRIES": "0",
            "TOKENFAN_PUBLIC_RELAY_URL": "wss://relay.example.com",
        }
    )
    assert loaded.redis_url.reveal() == "rediss://:pw@cache.internal:6380/2"
    assert loaded.log_format == "json"
    assert loaded.log_level == "debug"
    assert loaded.session_ttl_seconds == 600
    assert loaded.stream_max_length == 1_000
    assert loaded.openai_base_url == "https://api.example.com/v1"
    assert loaded.openai_api_key == Secret("sk-test-1234")
    assert loaded.upstream_read_timeout_seconds == 2.5
    assert loaded.flush_window_ms == 0.0
    assert loaded.lease_seconds == 10.0
    assert loaded.coalesce is False
    assert loaded.upstream_max_retries == 0
    assert loaded.public_relay_url == "wss://relay.example.com"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("Yes", True),
        ("on", True),
        (" true ", True),
        ("0", False),
        ("false", False),
        ("False", False),
        ("NO", False),
        ("off", False),
    ],
)
def test_bool_spellings(raw: str, expected: bool) -> None:
    assert Settings.from_env({"TOKENFAN_COALESCE": raw}).coalesce is expected


@pytest.mark.parametrize("raw", ["auto", "json", "console", "Console", "AUTO"])
def test_log_format_literals_are_case_insensitive(raw: str) -> None:
    assert Settings.from_env({"TOKENFAN_LOG_FORMAT": raw}).log_format == raw.lower()


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("TOKENFAN_WORKER_CONCURRENCY", "lots"),
        ("TOKENFAN_WORKER_CONCURRENCY", "1.5"),
        ("TOKENFAN_SESSION_TTL_SECONDS", "1d"),
        ("TOKENFAN_LEASE_SECONDS", "fast"),
        ("TOKENFAN_LEASE_SECONDS", "inf"),
        ("TOKENFAN_LEASE_SECONDS", "nan"),
        ("TOKENFAN_FLUSH_WINDOW_MS", "1e999"),
        ("TOKENFAN_COALESCE", "maybe"),
        ("TOKENFAN_COALESCE", "2"),
        ("TOKENFAN_LOG_FORMAT", "xml"),
        ("TOKENFAN_LOG_LEVEL", "trace"),
        ("TOKENFAN_MAX_BODY_BYTES", "   "),
    ],
)
def test_bad_values_name_their_variable(name: str, raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: raw})
    assert name in str(caught.value)


#: The variables `Settings` requires to be greater than zero.
MUST_BE_POSITIVE = [
    "TOKENFAN_SESSION_TTL_SECONDS",
    "TOKENFAN_STREAM_MAX_LENGTH",
    "TOKENFAN_WORKER_CONCURRENCY",
    "TOKENFAN_JOB_TIMEOUT_SECONDS",
    "TOKENFAN_MAX_BODY_BYTES",
    "TOKENFAN_MAX_MESSAGES",
    "TOKENFAN_RELAY_CATCHUP_PAGE_SIZE",
    "TOKENFAN_UPSTREAM_CONNECT_TIMEOUT_SECONDS",
    "TOKENFAN_UPSTREAM_READ_TIMEOUT_SECONDS",
    "TOKENFAN_RELAY_PING_INTERVAL_SECONDS",
    "TOKENFAN_RELAY_PING_TIMEOUT_SECONDS",
    "TOKENFAN_WORKER_POLL_INTERVAL_SECONDS",
    "TOKENFAN_FLUSH_MAX_BYTES",
    "TOKENFAN_LEASE_SECONDS",
    "TOKENFAN_MAX_ATTEMPTS",
    "TOKENFAN_UPSTREAM_RETRY_BUDGET_SECONDS",
]


@pytest.mark.parametrize("name", MUST_BE_POSITIVE)
@pytest.mark.parametrize("raw", ["0", "-1"])
def test_non_positive_values_are_rejected(name: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: raw})
    assert Settings.from_env({name: "1"}) != Settings()


@pytest.mark.parametrize("name", ["TOKENFAN_FLUSH_WINDOW_MS", "TOKENFAN_UPSTREAM_MAX_RETRIES"])
def test_zero_allowed_but_negative_rejected(name: str) -> None:
    Settings.from_env({name: "0"})
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: "-1"})


def test_overrides_win_over_the_environment() -> None:
    loaded = Settings.from_env(
        {"TOKENFAN_WORKER_CONCURRENCY": "5", "TOKENFAN_LOG_LEVEL": "error"},
        worker_concurrency=7,
        log_level=None,  # None means "not given": the environment stays
    )
    assert loaded.worker_concurrency == 7
    assert loaded.log_level == "error"


def test_overrides_are_validated_too() -> None:
    with pytest.raises(SettingsError, match="TOKENFAN_WORKER_CONCURRENCY"):
        Settings.from_env({}, worker_concurrency=0)


def test_settings_are_frozen() -> None:
    loaded = Settings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.max_attempts = 5  # type: ignore[misc]


def test_settings_table_lists_every_variable() -> None:
    table = settings_table()
    lines = table.splitlines()
    assert lines[0] == "| variable | default | meaning |"
    assert len(lines) == 2 + len(ENV_NAMES)
    assert len(set(ENV_NAMES)) == len(ENV_NAMES)
    for name, line in zip(ENV_NAMES, lines[2:], strict=True):
        assert line.startswith(f"| `{name}` |"), line
    assert "`redis://127.0.0.1:6379/0`" in table
    assert "`86400`" in table


def test_operations_doc_holds_the_current_settings_table() -> None:
    text = (REPO / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in settings_table() for name in ENV_NAMES)
    assert with_settings_table(text) == text, "docs/OPERATIONS.md is stale: run ./dev docs"


def test_secret_never_shows_its_value() -> None:
    secret = Secret("hunter2-very-secret")
    rendered = [
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret!r}",
        f"{secret!s}",
        format(secret),
        repr([secret]),
    ]
    rendered.append(repr({"key": secret}))
    for text in rendered:
        assert "hunter2" not in text
        assert "***" in text
    assert secret.reveal() == "hunter2-very-secret"
    assert secret == Secret("hunter2-very-secret")
    assert secret != Secret("other")
    assert secret != "hunter2-very-secret"


def test_settings_repr_hides_secrets() -> None:
    loaded = Settings.from_env(
        {"REDIS_URL": "redis://user:hunter2@db:6379/0", "OPENAI_API_KEY": "sk-live-abcdefghijklmnop"}
    )
    assert "hunter2" not in repr(loaded)
    assert "sk-live" not in repr(loaded)
    assert "hunter2" not in str(loaded)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(ENV_NAMES), st.text(max_size=30))
def test_any_text_either_parses_or_raises_settings_error(name: str, raw: str) -> None:
    try:
        Settings.from_env({name: raw})
    except SettingsError as exc:
        message = str(exc)
    else:
        return
    assert name in message


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(ENV_NAMES),
    st.one_of(
        st.integers(min_value=-(10**30), max_value=10**30).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(str),
        st.sampled_from(["true", "off", "JSON", "debug", "1_0", "0x10", "１２"]),
    ),
)
def test_number_like_text_either_parses_or_raises_settings_error(name: str, raw: str) -> None:
    try:
        Settings.from_env({name: raw})
    except SettingsError as exc:
        message = str(exc)
    else:
        return
    assert name in message


def test_a_secret_may_come_from_the_file_its_variable_names_with_file(tmp_path: Path) -> None:
    keys = tmp_path / "api_keys"
    keys.write_text("ops:0123456789abcdef0123\n")
    settings = Settings.from_env({"TOKENFAN_API_KEYS_FILE": str(keys), "REDIS_URL_FILE": str(keys)})
    assert settings.api_keys == Secret("ops:0123456789abcdef0123")  # without the trailing newline
    assert settings.redis_url == Secret("ops:0123456789abcdef0123")
    direct = Settings.from_env(
        {"TOKENFAN_API_KEYS": "app:fedcba9876543210fedc", "TOKENFAN_API_KEYS_FILE": str(keys)}
    )
    assert direct.api_keys == Secret("app:fedcba9876543210fedc")  # the variable itself wins


def test_a_missing_secret_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^TOKENFAN_TOKEN_SECRETS_FILE=.*No such file"):
        Settings.from_env({"TOKENFAN_TOKEN_SECRETS_FILE": str(tmp_path / "absent")})


def test_only_secrets_come_from_files(tmp_path: Path) -> None:
    level = tmp_path / "level"
    level.write_text("debug")
    assert Settings.from_env({"TOKENFAN_LOG_LEVEL_FILE": str(level)}).log_level == "info"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TOKENFAN_REDIS_CLUSTER": "true"}, "needs TOKENFAN_QUEUE_REDIS_URL"),
        ({"REDIS_URL": "redis://a:1,redis://b:2"}, "set TOKENFAN_REDIS_CLUSTER=true"),
        (
            {"TOKENFAN_REDIS_CLUSTER": "true", "TOKENFAN_QUEUE_REDIS_URL": "redis://a:1,redis://b:2"},
            "one plain Redis",
        ),
    ],
)
def test_a_cluster_configuration_that_cannot_work_is_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(environ)


def test_the_queue_lives_on_redis_url_unless_named() -> None:
    assert Settings.from_env({"REDIS_URL": "redis://one:6379/0"}).queue_url == "redis://one:6379/0"
    cluster = Settings.from_env(
        {
            "REDIS_URL": "redis://a:1,redis://b:2",
            "TOKENFAN_REDIS_CLUSTER": "true",
            "TOKENFAN_QUEUE_REDIS_URL": "redis://q:6379/0",
        }
    )
    assert cluster.queue_url == "redis://q:6379/0"
