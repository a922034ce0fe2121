"""Who may do what: API keys for services, short-lived session tokens for subscribers.

**API keys** (``TOKENFAN_API_KEYS``) authorize everything: enqueueing, reading, cancelling, minting tokens,
and subscribing to any session. They are configured as ``name:key`` or ``name:sha256:<hex digest of key>``
pairs separated by commas, so the plain key need not even be in the environment. Only digests are kept in
memory, and a presented key is checked against every configured digest with `hmac.compare_digest`: the
time taken does not reveal which key, or how much of one, matched.

**Session tokens** authorize one thing: subscribing to (and reading the snapshot of) one session, until
they expire. They are JWTs (HS256), signed with the first of the ``TOKENFAN_TOKEN_SECRETS`` and accepted
when any of them verifies, so a secret can be rotated without cutting off live clients. Browsers cannot
set headers on WebSocket or EventSource connections, so tokens are also accepted as a ``token`` query
parameter. A token is short-lived for that reason: URLs end up in logs and histories.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import jwt

from tokenfan.contract.errors import Forbidden, Unauthorized
from tokenfan.runtime.settings import Secret, Settings, SettingsError

__all__ = [
    "ApiKeys",
    "Authenticator",
    "Principal",
    "TokenSigner",
    "bearer_token",
    "new_api_key",
    "new_token_secret",
]

_ISSUER = "tokenfan"
_SCOPE = "subscribe"


def new_api_key() -> str:
    """A fresh API key: ``tfk_`` + 32 URL-safe characters (about 190 bits)."""
    return "tfk_" + secrets.token_urlsafe(24)


def new_token_secret() -> str:
    return secrets.token_urlsafe(32)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an API key (any session) or a token holder (one session)."""

    name: str
    session_id: str | None = None  # None: an API key, allowed everywhere
    #: When its credential expires (unix seconds); None: never (an API key). An open stream authorized by
    #: a token ends when the token does, unless the client refreshes it (docs/PROTOCOL.md).
    expires_at: float | None = None

    @property
    def is_service(self) -> bool:
        return self.session_id is None

    def require_session(self, session_id: str) -> None:
        """Raise `Forbidden` unless this principal may watch `session_id`."""
        if self.session_id is not None and self.session_id != session_id:
            raise Forbidden("this token is for another session")

    def require_service(self) -> None:
        if not self.is_service:
            raise Forbidden("this needs an API key; a session token only allows watching its session")


class ApiKeys:
    """The configured API keys, as digests."""

    def __init__(self, entries: Sequence[tuple[str, bytes]]) -> None:
        self._entries = list(entries)

    @classmethod
    def parse(cls, config: Secret | None) -> ApiKeys:
        """Parse ``name:key`` / ``name:sha256:<hex>`` entries; raises SettingsError naming the problem."""
        if config is None or not config.reveal().strip():
            return cls([])
        entries: list[tuple[str, bytes]] = []
        for position, raw in enumerate(config.reveal().split(","), start=1):
            name, separator, value = raw.strip().partition(":")
            if not separator or not name or not value:
                raise SettingsError(f"TOKENFAN_API_KEYS entry {position} must look like 'name:key'")
            if value.startswith("sha256:"):
                try:
                    digest = bytes.fromhex(value.removeprefix("sha256:"))
                except ValueError:
                    raise SettingsError(
                        f"TOKENFAN_API_KEYS entry {position} has a malformed sha256 digest"
                    ) from None
                if len(digest) != 32:
                    raise SettingsError(
                        f"TOKENFAN_API_KEYS entry {position}: a sha256 digest has 64 hex digits"
                    )
            else:
                if len(value) < 16:
                    raise SettingsError(
                        f"TOKENFAN_API_KEYS entry {position}: keys need at least 16 characters"
                    )
                digest = _digest(value)
            entries.append((name, digest))
        return cls(entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def identify(self, presented: str) -> str | None:
        """The name of the key presented, or None. Compares against every key, whatever matches."""
        candidate = _digest(presented)
        found: str | None = None
        for name, digest in self._entries:
            if hmac.compare_digest(candidate, digest) and found is None:
                found = name
        return found


class TokenSigner:
    """Mints and checks session tokens."""

    def __init__(self, secrets_config: Secret | None, ttl_seconds: int) -> None:
        values = [s.strip() for s in secrets_config.reveal().split(",")] if secrets_config else []
        self._secrets = [s for s in values if s]
        if any(len(s) < 32 for s in self._secrets):
            raise SettingsError("each TOKENFAN_TOKEN_SECRETS entry needs at least 32 characters")
        self.ttl_seconds = ttl_seconds

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def mint(self, session_id: str, *, subject: str, now: float | None = None) -> tuple[str, int]:
        """A token for `session_id`, and when it expires (unix seconds)."""
        issued = int(time.time() if now is None else now)
        expires = issued + self.ttl_seconds
        claims = {
            "iss": _ISSUER,
            "sub": session_id,
            "scope": _SCOPE,
            "iat": issued,
            "exp": expires,
            "by": subject,
        }
        return jwt.encode(claims, self._secrets[0], algorithm="HS256"), expires

    def verify(self, token: str, *, now: float | None = None) -> Principal:
        """The principal a token stands for; raises `Unauthorized` when it is expired, forged or malformed.

        `now` (unix seconds) replaces the clock, for tests.
        """
        for secret in self._secrets:
            try:
                claims = jwt.decode(
                    token,
                    secret,
                    algorithms=["HS256"],
                    issuer=_ISSUER,
                    options={"require": ["exp", "sub", "iss"], "verify_exp": now is None},
                )
            except jwt.ExpiredSignatureError:
                raise Unauthorized("the token has expired; ask for a new one") from None
            except jwt.InvalidSignatureError:
                continue  # perhaps signed with another of the secrets
            except jwt.PyJWTError:
                raise Unauthorized("malformed token") from None
            if now is not None and claims["exp"] <= now:
                raise Unauthorized("the token has expired; ask for a new one")
            if claims.get("scope") != _SCOPE or not isinstance(claims["sub"], str):
                raise Unauthorized("this token does not allow subscribing")
            return Principal(
                name=str(claims.get("by", "token")), session_id=claims["sub"], expires_at=float(claims["exp"])
            )
        raise Unauthorized("invalid token")


def bearer_token(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <credential>`` header, if any."""
    if authorization is None:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    return credential.strip() or None if scheme.lower() == "bearer" else None


class Authenticator:
    """Turns a presented credential into a `Principal`, or refuses it."""

    def __init__(self, keys: ApiKeys, signer: TokenSigner, *, insecure_dev_mode: bool = False) -> None:
        self.keys = keys
        self.signer = signer
        self.insecure_dev_mode = insecure_dev_mode

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        """Raises SettingsError when the configuration would leave endpoints open by accident."""
        keys = ApiKeys.parse(settings.api_keys)
        signer = TokenSigner(settings.token_secrets, settings.token_ttl_seconds)
        if not settings.insecure_dev_mode:
            if not keys:
                raise SettingsError(
                    "no TOKENFAN_API_KEYS: every endpoint would refuse everyone. Set keys (see docs/SECURITY.md), "
                    "or TOKENFAN_INSECURE_DEV_MODE=true on a development machine"
                )
            if not signer:
                raise SettingsError(
                    "set TOKENFAN_TOKEN_SECRETS (at least 32 characters) to sign subscriber tokens"
                )
        return cls(keys, signer, insecure_dev_mode=settings.insecure_dev_mode)

    def authenticate(self, credential: str | None, *, in_url: bool = False) -> Principal:
        """Raises `Unauthorized` for a missing, unknown, forged or expired credential, and for an API key
        sent in a URL (`in_url`): URLs end up in proxy logs and browser histories, a key must not."""
        if credential is None:
            if self.insecure_dev_mode:
                return Principal("insecure-dev-mode")
            raise Unauthorized("send an API key or a session token (Authorization: Bearer …, or ?token=)")
        if not _encodable(credential):  # a JSON message may escape a lone surrogate: no key or token has one
            raise Unauthorized("malformed credential: not valid Unicode")
        name = self.keys.identify(credential)
        if name is not None:
            if in_url:
                raise Unauthorized("API keys go in the Authorization header, never in a URL; rotate this one")
            return Principal(name)
        if self.signer and credential.count(".") == 2:
            return self.signer.verify(credential)
        raise Unauthorized("unknown API key or token")


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
