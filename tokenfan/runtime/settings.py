"""All configuration, parsed once from the environment into one frozen `Settings` (12-factor).

Every field names its environment variable and documents itself; `settings_table()` renders the table in
docs/OPERATIONS.md, and a test keeps the two in step. Bad values fail fast with a message naming the
variable, never later with a stack trace.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

__all__ = ["Secret", "Settings", "SettingsError", "settings_table", "with_settings_table"]


class SettingsError(ValueError):
    """An environment variable holds a value tokenfan cannot use."""


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
SlowPolicy = Literal["snapshot", "close"]
UpstreamTransport = Literal["tokenfan", "openai"]


def _env(name: str, doc: str, **kwargs: Any) -> Any:
    return field(metadata={"env": name, "doc": doc}, **kwargs)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every knob of every component. Construct with `Settings.from_env()`; pass it explicitly."""

    # --- shared
    redis_url: Secret = _env(
        "REDIS_URL",
        "Redis (or Valkey, 7.0 or newer) URL: `redis://`, `rediss://` for TLS, credentials in the URL for "
        "AUTH. With `TOKENFAN_REDIS_CLUSTER=true`, any node of the cluster, or several seed nodes "
        "comma-separated. `tokenfan up` and the tests start an embedded server when unset.",
        default=Secret("redis://127.0.0.1:6379/0"),
    )
    redis_cluster: bool = _env(
        "TOKENFAN_REDIS_CLUSTER",
        "`true`: `REDIS_URL` names a Redis Cluster (or Valkey in cluster mode). Each session lives in one "
        "slot; its live tail is a sharded pub/sub channel. Needs `TOKENFAN_QUEUE_REDIS_URL`.",
        default=False,
    )
    queue_redis_url: Secret | None = _env(
        "TOKENFAN_QUEUE_REDIS_URL",
        "The plain Redis (not a cluster) holding the job queue: one small job per generation. Defaults to "
        "`REDIS_URL` on one Redis; required with a cluster.",
        default=None,
    )
    log_format: LogFormat = _env(
        "TOKENFAN_LOG_FORMAT",
        "`json`, `console`, or `auto` (console on a terminal, JSON otherwise).",
        default="auto",
    )
    log_level: LogLevel = _env("TOKENFAN_LOG_LEVEL", "`debug`, `info`, `warning` or `error`.", default="info")
    metrics_port: int | None = _env(
        "TOKENFAN_METRICS_PORT",
        "Port on which the API, relay and worker serve `GET /metrics` (Prometheus text format), on the "
        "process's own host (`--host`); `--metrics-port` overrides it, `0` picks a free port. Unset: no "
        "metrics endpoint, and the per-token instruments are skipped. It carries no user data and asks for "
        "no credential (docs/SECURITY.md). `tokenfan up` gives each process one.",
        default=None,
    )
    session_ttl_seconds: int = _env(
        "TOKENFAN_SESSION_TTL_SECONDS",
        "How long a session's keys (stream, generations, texts) live after its last generation ends.",
        default=86_400,
    )
    stream_max_length: int = _env(
        "TOKENFAN_STREAM_MAX_LENGTH",
        "Approximate cap on the entries one session's stream retains (oldest trimmed first).",
        default=10_000,
    )
    # --- security (docs/SECURITY.md)
    insecure_dev_mode: bool = _env(
        "TOKENFAN_INSECURE_DEV_MODE",
        "`true` opens every endpoint to anyone and allows any browser origin. For a development machine only; "
        "without it the API and relay refuse to start unless API keys are configured.",
        default=False,
    )
    api_keys: Secret | None = _env(
        "TOKENFAN_API_KEYS",
        "Comma-separated `name:key` or `name:sha256:<hex digest of the key>` entries. Keys have at least 16 "
        "characters; `tokenfan up` generates one. Several may be active at once (rotation).",
        default=None,
    )
    token_secrets: Secret | None = _env(
        "TOKENFAN_TOKEN_SECRETS",
        "Comma-separated secrets (each 32+ characters) for subscriber tokens: the first signs, any verifies. "
        "API and relay processes must share them.",
        default=None,
    )
    token_ttl_seconds: int = _env(
        "TOKENFAN_TOKEN_TTL_SECONDS",
        "Lifetime of a subscriber token: past it, the token opens nothing, and the streams it opened end "
        "(4401) unless the client refreshed them with a fresh token.",
        default=900,
    )
    allowed_origins: str = _env(
        "TOKENFAN_ALLOWED_ORIGINS",
        "Comma-separated browser origins (e.g. `https://app.example.com`) allowed by CORS and by the relay's "
        "WebSocket `Origin` check. Empty: no browser origin (clients without an `Origin` header still work).",
        default="",
    )
    rate_limit_per_minute: int = _env(
        "TOKENFAN_RATE_LIMIT_PER_MINUTE",
        "Generations one API key may enqueue per minute, shared by every API process (`0`: no limit).",
        default=600,
    )
    relay_max_connections_per_address: int = _env(
        "TOKENFAN_RELAY_MAX_CONNECTIONS_PER_ADDRESS",
        "Open WebSocket connections one client address may hold on one relay.",
        default=256,
    )
    relay_max_message_bytes: int = _env(
        "TOKENFAN_RELAY_MAX_MESSAGE_BYTES",
        "Largest message the relay accepts from a client (close 1009 beyond).",
        default=16_384,
    )
    relay_max_messages_per_second: float = _env(
        "TOKENFAN_RELAY_MAX_MESSAGES_PER_SECOND",
        "Messages per second one connection may send (subscribe/unsubscribe); bursts of 5 seconds' worth pass.",
        default=20.0,
    )
    # --- upstream (worker)
    openai_base_url: str | None = _env(
        "OPENAI_BASE_URL",
        "Base URL of the OpenAI-compatible upstream, e.g. `https://api.openai.com/v1`. "
        "`tokenfan up` starts the built-in simulator when unset.",
        default=None,
    )
    openai_api_key: Secret | None = _env(
        "OPENAI_API_KEY", "API key sent to the upstream. Never logged.", default=None
    )
    upstream_connect_timeout_seconds: float = _env(
        "TOKENFAN_UPSTREAM_CONNECT_TIMEOUT_SECONDS", "Time allowed to connect to the upstream.", default=10.0
    )
    upstream_read_timeout_seconds: float = _env(
        "TOKENFAN_UPSTREAM_READ_TIMEOUT_SECONDS",
        "Longest silence tolerated between two chunks of an upstream stream before the generation fails "
        "as stalled.",
        default=60.0,
    )
    upstream_transport: UpstreamTransport = _env(
        "TOKENFAN_UPSTREAM_TRANSPORT",
        "How the worker's openai client reads upstream streams: `tokenfan`, the worker's own HTTP/1.1 "
        "transport, which hands each chunk over as it arrives (a third less CPU per token at 500 "
        "generations; openai's is used anyway when a proxy is configured); `openai`, openai's own aiohttp "
        "transport always, the way back should an upstream misbehave with the worker's.",
        default="tokenfan",
    )
    # --- worker
    worker_concurrency: int = _env(
        "TOKENFAN_WORKER_CONCURRENCY", "Generations one worker process runs at once.", default=200
    )
    job_timeout_seconds: int = _env(
        "TOKENFAN_JOB_TIMEOUT_SECONDS", "Hard cap on one generation attempt's duration.", default=3_600
    )
    worker_poll_interval_seconds: float = _env(
        "TOKENFAN_WORKER_POLL_INTERVAL_SECONDS",
        "How often an idle worker polls the queue; bounds the delay before a queued generation starts.",
        default=0.05,
    )
    flush_window_ms: float = _env(
        "TOKENFAN_FLUSH_WINDOW_MS",
        "Shortest time between two writes of a worker to Redis. The first piece after a quiet spell is "
        "written at once; pieces arriving within the window wait for the next write, carried together. "
        "`0` writes as fast as Redis answers.",
        default=5.0,
    )
    flush_max_bytes: int = _env(
        "TOKENFAN_FLUSH_MAX_BYTES",
        "A generation with this many bytes pending is written at once, window or not.",
        default=16_384,
    )
    coalesce: bool = _env(
        "TOKENFAN_COALESCE",
        "Merge consecutive pieces of a generation into one event per write, and write the pending events "
        "of every generation in one script call per flush. `false` is the naive baseline the "
        "benchmarks compare against: one event per piece, each written by its own script call as soon as it "
        "arrives (one call in flight per generation, no flush window).",
        default=True,
    )
    lease_seconds: float = _env(
        "TOKENFAN_LEASE_SECONDS",
        "A running generation whose worker has not renewed its lease for this long is restarted by "
        "another worker (renewed every third of it).",
        default=20.0,
    )
    max_attempts: int = _env(
        "TOKENFAN_MAX_ATTEMPTS",
        "Attempts per generation across worker crashes; after the last, it fails with `worker_lost`.",
        default=3,
    )
    upstream_max_retries: int = _env(
        "TOKENFAN_UPSTREAM_MAX_RETRIES",
        "Retries of an upstream request that failed with 429, 5xx or a connection error before its first "
        "token (honouring `Retry-After`).",
        default=3,
    )
    upstream_retry_budget_seconds: float = _env(
        "TOKENFAN_UPSTREAM_RETRY_BUDGET_SECONDS",
        "Total time those retries may wait before the generation fails.",
        default=30.0,
    )
    worker_hooks: str | None = _env(
        "TOKENFAN_WORKER_HOOKS",
        "`package.module:attribute` of worker hooks (custom events such as RAG sources; see worker/hooks.py).",
        default=None,
    )
    worker_alive_file: str | None = _env(
        "TOKENFAN_WORKER_ALIVE_FILE",
        "A file the worker touches every third of a lease while its event loop runs: a liveness signal for "
        "an orchestrator (`tokenfan alive FILE --within 30` exits 0 while it is fresh).",
        default=None,
    )
    # --- HTTP API
    max_body_bytes: int = _env(
        "TOKENFAN_MAX_BODY_BYTES", "Largest request body the API accepts (413 beyond).", default=1_048_576
    )
    ds_long_poll_seconds: float = _env(
        "TOKENFAN_DS_LONG_POLL_SECONDS",
        "How long a Durable Streams `live=long-poll` read waits for data before answering 204; also the "
        "interval of `live=sse` keep-alive control events.",
        default=20.0,
    )
    ds_max_streams_per_key: int = _env(
        "TOKENFAN_DS_MAX_STREAMS_PER_KEY",
        "Durable Streams streams one API key may hold under `/ds/` (`0`: no limit); a PUT beyond answers 429 "
        "`too_many_streams`. Sessions do not count.",
        default=10_000,
    )
    ds_appends_per_minute: int = _env(
        "TOKENFAN_DS_APPENDS_PER_MINUTE",
        "Durable Streams appends (POSTs, app events included) one API key may make per minute, shared by every "
        "API process (`0`: no limit); beyond, 429 `rate_limited` with `Retry-After`.",
        default=6_000,
    )
    max_messages: int = _env(
        "TOKENFAN_MAX_MESSAGES", "Most messages one generation request may carry.", default=512
    )
    max_metadata_bytes: int = _env(
        "TOKENFAN_MAX_METADATA_BYTES",
        "Largest `metadata` object (as JSON) a generation may carry.",
        default=16_384,
    )
    public_relay_url: str | None = _env(
        "TOKENFAN_PUBLIC_RELAY_URL",
        "The relay's public WebSocket base URL (e.g. `wss://relay.example.com`); when set, accepted "
        "generations link to their session's stream, and the live page (`/`) connects to it.",
        default=None,
    )
    # --- relay
    relay_ping_interval_seconds: float = _env(
        "TOKENFAN_RELAY_PING_INTERVAL_SECONDS", "How often the relay pings each subscriber.", default=20.0
    )
    relay_ping_timeout_seconds: float = _env(
        "TOKENFAN_RELAY_PING_TIMEOUT_SECONDS",
        "How long a subscriber may take to answer a ping before the relay drops it as dead.",
        default=20.0,
    )
    relay_max_buffer_bytes: int = _env(
        "TOKENFAN_RELAY_MAX_BUFFER_BYTES",
        "Bytes a subscriber may have waiting in its connection's write buffer. Beyond that it is slow, and "
        "the relay stops queueing live frames for it (see `TOKENFAN_RELAY_SLOW_POLICY`); this bounds the "
        "relay's memory per connection.",
        default=262_144,
    )
    relay_slow_policy: SlowPolicy = _env(
        "TOKENFAN_RELAY_SLOW_POLICY",
        "What happens to a slow subscriber: `snapshot` skips its backlog, sends one `snapshot` frame of "
        "what changed, and continues live; `close` closes it with 4008 so it resumes from its last offset.",
        default="snapshot",
    )
    relay_max_subscriptions: int = _env(
        "TOKENFAN_RELAY_MAX_SUBSCRIPTIONS",
        "Sessions one multi-session connection (`/v1/stream`) may watch at once.",
        default=100,
    )
    presence_interval_seconds: float = _env(
        "TOKENFAN_PRESENCE_INTERVAL_SECONDS",
        "How often relays and API processes record which sessions they serve (claims last three intervals); "
        "bounds how soon `cancel_when_unwatched_seconds` notices that nobody watches.",
        default=2.0,
    )
    sse_keepalive_seconds: float = _env(
        "TOKENFAN_SSE_KEEPALIVE_SECONDS",
        "Interval of SSE keep-alive comments on a quiet stream.",
        default=15.0,
    )
    sse_max_streams_per_address: int = _env(
        "TOKENFAN_SSE_MAX_STREAMS_PER_ADDRESS",
        "Open SSE streams one client address may hold on one API process (429 beyond).",
        default=256,
    )
    feed_linger_seconds: float = _env(
        "TOKENFAN_FEED_LINGER_SECONDS",
        "How long a session's shared reader stays subscribed after its last subscriber leaves (a client "
        "that reconnects at once finds it still there).",
        default=5.0,
    )
    relay_catchup_page_size: int = _env(
        "TOKENFAN_RELAY_CATCHUP_PAGE_SIZE",
        "Entries read per XRANGE while a subscriber catches up.",
        default=512,
    )
    catchup_history_budget: int = _env(
        "TOKENFAN_CATCHUP_HISTORY_BUDGET",
        "Approximate bytes that the catch-up histories of all sessions may hold together, per relay or API "
        "process. While subscribers of a session catch up (and for 2 s after the last one did, for the "
        "latecomers of a reconnect storm), the process keeps that session's recent entries in memory once "
        "for all of them, up to 16,384 entries per session. Past this budget, subscribers "
        "read pages from Redis instead (shared where their offsets are close): more Redis reads and relay "
        "CPU, never a lost or repeated event.",
        default=33_554_432,
    )

    @property
    def queue_url(self) -> str:
        """Where the job queue lives: `TOKENFAN_QUEUE_REDIS_URL`, else the one Redis of `REDIS_URL`."""
        return (self.queue_redis_url or self.redis_url).reveal()

    @property
    def origins(self) -> list[str]:
        return [origin.strip() for origin in self.allowed_origins.split(",") if origin.strip()]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Parse `environ` (default: os.environ); `overrides` win over the environment (used by the CLI)."""
        source = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            name = spec.metadata["env"]
            raw = source.get(name)
            if (raw is None or raw == "") and _is_secret(hints[spec.name]):
                raw = _read_secret_file(name, source.get(f"{name}_FILE"))
            if raw is not None and raw != "":
                values[spec.name] = _parse(name, raw, hints[spec.name])
        values.update({key: value for key, value in overrides.items() if value is not None})
        settings = cls(**values)
        settings._validate()
        return settings

    def _validate(self) -> None:
        positive = (
            "session_ttl_seconds",
            "stream_max_length",
            "worker_concurrency",
            "job_timeout_seconds",
            "max_body_bytes",
            "max_messages",
            "max_metadata_bytes",
            "relay_catchup_page_size",
            "catchup_history_budget",
            "relay_max_buffer_bytes",
            "relay_max_subscriptions",
            "sse_keepalive_seconds",
            "sse_max_streams_per_address",
            "presence_interval_seconds",
            "token_ttl_seconds",
            "relay_max_connections_per_address",
            "relay_max_message_bytes",
            "relay_max_messages_per_second",
            "upstream_connect_timeout_seconds",
            "upstream_read_timeout_seconds",
            "relay_ping_interval_seconds",
            "relay_ping_timeout_seconds",
            "worker_poll_interval_seconds",
            "flush_max_bytes",
            "lease_seconds",
            "max_attempts",
            "upstream_retry_budget_seconds",
            "ds_long_poll_seconds",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{_env_name(name)} must be greater than zero")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65_535:
            raise SettingsError("TOKENFAN_METRICS_PORT must be a port number, 0 to 65535")
        for name in (
            "flush_window_ms",
            "upstream_max_retries",
            "feed_linger_seconds",
            "rate_limit_per_minute",
            "ds_max_streams_per_key",
            "ds_appends_per_minute",
        ):
            if getattr(self, name) < 0:
                raise SettingsError(f"{_env_name(name)} must not be negative")
        self._validate_redis()

    def _validate_redis(self) -> None:
        several = "," in self.redis_url.reveal()
        if self.redis_cluster and self.queue_redis_url is None:
            raise SettingsError(
                "TOKENFAN_REDIS_CLUSTER=true needs TOKENFAN_QUEUE_REDIS_URL: the job queue lives on a plain Redis"
            )
        if several and not self.redis_cluster:
            raise SettingsError(
                "REDIS_URL names several nodes: set TOKENFAN_REDIS_CLUSTER=true for a cluster"
            )
        if self.queue_redis_url is not None and "," in self.queue_redis_url.reveal():
            raise SettingsError("TOKENFAN_QUEUE_REDIS_URL names one plain Redis, not several nodes")


def _is_secret(hint: Any) -> bool:
    return hint is Secret or Secret in get_args(hint)


def _read_secret_file(name: str, path: str | None) -> str | None:
    """A secret may come from a file named by ``<VARIABLE>_FILE`` (Docker and Kubernetes mount secrets as
    files): its content, without the trailing newline, unless the variable itself is set."""
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(f"{name}_FILE={path}: {exc.strerror or exc}") from None


def _env_name(field_name: str) -> str:
    return str(next(f for f in dataclasses.fields(Settings) if f.name == field_name).metadata["env"])


def _parse(name: str, raw: str, hint: Any) -> Any:  # noqa: C901 - one branch per supported type
    args = get_args(hint)
    if type(None) in args:  # Optional[X]
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(name, raw, inner)
    if hint is Secret:
        return Secret(raw)
    if hint is str:
        return raw
    if hint is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {raw[:40]!r}") from None
    if hint is float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw[:40]!r}") from None
        if not math.isfinite(value):
            raise SettingsError(f"{name} must be a finite number")
        return value
    if hint is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name} must be true or false, got {raw[:40]!r}")
    if args and all(isinstance(a, str) for a in args):  # Literal[...]
        lowered = raw.strip().lower()
        if lowered not in args:
            raise SettingsError(f"{name} must be one of {', '.join(args)}; got {raw[:40]!r}")
        return lowered
    raise TypeError(f"no parser for {hint!r}")  # pragma: no cover - a programming error


_TABLE_START = "<!-- settings table: generated by ./dev docs; do not edit by hand -->"
_TABLE_END = "<!-- end of settings table -->"


def with_settings_table(document: str) -> str:
    """`document` (docs/OPERATIONS.md) with the text between its table markers replaced by the table."""
    start = document.index(_TABLE_START) + len(_TABLE_START)
    end = document.index(_TABLE_END)
    return document[:start] + "\n" + settings_table() + "\n" + document[end:]


def settings_table() -> str:
    """The Markdown table of every environment variable, its default and meaning."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for spec in dataclasses.fields(Settings):
        default = spec.default
        shown = "unset" if default is None else ("(see meaning)" if isinstance(default, Secret) else default)
        if isinstance(default, Secret) and spec.metadata["env"] == "REDIS_URL":
            shown = f"`{default.reveal()}`"
        elif shown not in ("unset", "(see meaning)"):
            shown = f"`{shown}`"
        rows.append(f"| `{spec.metadata['env']}` | {shown} | {spec.metadata['doc']} |")
    return "\n".join(rows)
