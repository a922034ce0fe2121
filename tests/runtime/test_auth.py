"""Who may do what: API keys are recognised (plain or as a digest) and nothing else is; session tokens open
one session until they expire, survive a rotation of the signing secret, and cannot be forged; an API key
is refused in a URL; and a server refuses to start with a configuration that would leave it open.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import warnings

import jwt
import pytest

from tokenfan.contract.errors import Forbidden, Unauthorized
from tokenfan.runtime.auth import (
    ApiKeys,
    Authenticator,
    Principal,
    TokenSigner,
    bearer_token,
    new_api_key,
    new_token_secret,
)
from tokenfan.runtime.settings import Secret, Settings, SettingsError

KEY = "alpha-key-0123456789"
OTHER_KEY = "beta-key-0123456789abc"
SECRET = "s" * 32 + "-signing"
OLD_SECRET = "o" * 32 + "-retired"
TTL = 900
NOW = 1_732_406_400.0


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def keys(config: str | None) -> ApiKeys:
    return ApiKeys.parse(Secret(config) if config is not None else None)


def signer(secrets: str = SECRET) -> TokenSigner:
    return TokenSigner(Secret(secrets), TTL)


def authenticator(*, insecure_dev_mode: bool = False) -> Authenticator:
    return Authenticator(keys(f"alpha:{KEY}"), signer(), insecure_dev_mode=insecure_dev_mode)


def forge(claims: dict[str, object], secret: str = SECRET, algorithm: str = "HS256") -> str:
    with warnings.catch_warnings():  # HS512 wants a longer key; a forger does not care
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.encode(claims, secret, algorithm=algorithm)


def segment(value: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def tampered(**changes: object) -> str:
    """A genuine token whose claims were edited after signing."""
    header, _, signature = forge(claims()).split(".")
    return f"{header}.{segment(claims(**changes))}.{signature}"


def claims(**changes: object) -> dict[str, object]:
    """The claims a minted token carries (issued at NOW), changed or (with None) removed as asked."""
    values: dict[str, object] = {
        "iss": "tokenfan",
        "sub": "s1",
        "scope": "subscribe",
        "iat": int(NOW),
        "exp": int(NOW) + TTL,
        "by": "alpha",
    }
    values.update(changes)
    return {name: value for name, value in values.items() if value is not None}


# --- API keys


@pytest.mark.parametrize("config", [None, "", "   ", " \n"])
def test_no_configured_keys_recognise_nothing(config: str | None) -> None:
    configured = keys(config)
    assert not configured
    assert configured.identify(KEY) is None
    assert configured.identify("") is None


def test_each_configured_key_is_recognised_by_its_name() -> None:
    configured = keys(f" alpha:{KEY} , beta:sha256:{sha256_hex(OTHER_KEY)} ")
    assert configured
    assert configured.identify(KEY) == "alpha"
    assert configured.identify(OTHER_KEY) == "beta"


@pytest.mark.parametrize(
    "presented",
    [
        pytest.param("", id="empty"),
        pytest.param(KEY[:-1], id="key-minus-its-last-character"),
        pytest.param(KEY + "x", id="key-plus-a-character"),
        pytest.param(KEY.upper(), id="key-in-another-case"),
        pytest.param(f" {KEY}", id="key-with-a-space"),
        pytest.param(f"alpha:{KEY}", id="the-configured-entry"),
        pytest.param(sha256_hex(OTHER_KEY), id="the-configured-digest-itself"),
        pytest.param(f"sha256:{sha256_hex(OTHER_KEY)}", id="the-configured-digest-entry"),
        pytest.param("alpha", id="a-key-name"),
    ],
)
def test_anything_but_a_configured_key_is_unknown(presented: str) -> None:
    assert keys(f"alpha:{KEY},beta:sha256:{sha256_hex(OTHER_KEY)}").identify(presented) is None


def test_a_key_of_16_characters_is_long_enough() -> None:
    assert keys("alpha:" + "k" * 16).identify("k" * 16) == "alpha"


def test_a_digest_may_be_written_in_either_case() -> None:
    assert keys(f"beta:sha256:{sha256_hex(OTHER_KEY).upper()}").identify(OTHER_KEY) == "beta"


def test_a_key_may_contain_colons() -> None:
    """Only the first colon separates the name: the rest, colons included, is the key."""
    key = "k:e:y-0123456789abcdef"
    assert keys(f"gamma:{key}").identify(key) == "gamma"
    assert keys(f"gamma:{key}").identify("k") is None


def test_the_same_key_under_two_names_is_known_by_the_first() -> None:
    assert keys(f"first:{KEY},second:sha256:{sha256_hex(KEY)}").identify(KEY) == "first"


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ("alpha", "entry 1 must look like 'name:key'"),
        (f":{KEY}", "entry 1 must look like 'name:key'"),
        ("alpha:", "entry 1 must look like 'name:key'"),
        (f"alpha:{KEY},,beta:{OTHER_KEY}", "entry 2 must look like 'name:key'"),
        (f"alpha:{KEY},beta:short-key", "entry 2: keys need at least 16 characters"),
        ("alpha:" + "k" * 15, "entry 1: keys need at least 16 characters"),
        ("alpha:sha256:not-hex-at-all", "entry 1 has a malformed sha256 digest"),
        (f"alpha:sha256:{sha256_hex(KEY)[:62]}", "entry 1: a sha256 digest has 64 hex digits"),
        (f"alpha:sha256:{sha256_hex(KEY)}00", "entry 1: a sha256 digest has 64 hex digits"),
    ],
)
def test_a_malformed_entry_is_named_by_position_and_never_echoed(config: str, problem: str) -> None:
    with pytest.raises(SettingsError) as caught:
        keys(config)
    assert str(caught.value) == f"TOKENFAN_API_KEYS {problem}"
    assert KEY not in str(caught.value)


def test_a_new_api_key_is_long_recognisable_and_fresh() -> None:
    fresh = [new_api_key() for _ in range(20)]
    assert len(set(fresh)) == len(fresh)
    for key in fresh:
        assert key.startswith("tfk_")
        assert len(key) == 36
        assert keys(f"generated:{key}").identify(key) == "generated"


# --- session tokens


def test_a_minted_token_opens_its_session_until_it_expires() -> None:
    token, expires = signer().mint("s1", subject="alpha", now=NOW)
    assert expires == int(NOW) + TTL
    principal = signer().verify(token, now=NOW + 1)
    assert principal == Principal(name="alpha", session_id="s1", expires_at=float(expires))
    assert not principal.is_service
    assert signer().verify(token, now=expires - 1).session_id == "s1"
    for later in (expires, expires + 1, expires + 86_400):
        with pytest.raises(Unauthorized, match="expired"):
            signer().verify(token, now=later)


def test_the_clock_decides_when_no_time_is_given() -> None:
    fresh, _ = signer().mint("s1", subject="alpha")
    assert signer().verify(fresh).session_id == "s1"
    stale, _ = signer().mint("s1", subject="alpha", now=time.time() - 2 * TTL)
    with pytest.raises(Unauthorized, match="expired"):
        signer().verify(stale)


def test_a_token_signed_with_a_retired_secret_still_opens_after_a_rotation() -> None:
    old_token, _ = signer(OLD_SECRET).mint("s1", subject="alpha", now=NOW)
    rotated = signer(f"{SECRET},{OLD_SECRET}")
    assert rotated.verify(old_token, now=NOW).session_id == "s1"
    # The first secret signs: what the rotated signer mints needs no retired secret to verify.
    new_token, _ = rotated.mint("s2", subject="alpha", now=NOW)
    assert signer(SECRET).verify(new_token, now=NOW).session_id == "s2"
    with pytest.raises(Unauthorized, match="invalid token"):
        signer(OLD_SECRET).verify(new_token, now=NOW)
    # Once the retired secret is dropped, its tokens open nothing.
    with pytest.raises(Unauthorized, match="invalid token"):
        signer(SECRET).verify(old_token, now=NOW)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        pytest.param(forge(claims(), secret="f" * 32), "invalid token", id="foreign-secret"),
        pytest.param(forge(claims(scope="admin")), "does not allow subscribing", id="wrong-scope"),
        pytest.param(forge(claims(scope=None)), "does not allow subscribing", id="no-scope"),
        pytest.param(forge(claims(iss="someone-else")), "malformed", id="wrong-issuer"),
        pytest.param(forge(claims(iss=None)), "malformed", id="no-issuer"),
        pytest.param(forge(claims(exp=None)), "malformed", id="no-expiry"),
        pytest.param(forge(claims(sub=None)), "malformed", id="no-session"),
        pytest.param(forge(claims(sub=42)), "malformed", id="session-not-a-string"),
        pytest.param(forge(claims(), algorithm="HS512"), "malformed", id="hs512"),
        pytest.param(
            f"{segment({'alg': 'none', 'typ': 'JWT'})}.{segment(claims())}.", "malformed", id="alg-none"
        ),
        pytest.param(tampered(sub="s2"), "invalid token", id="tampered-session"),
        pytest.param(tampered(exp=int(NOW) + 10 * TTL), "invalid token", id="tampered-expiry"),
        pytest.param(forge(claims())[:-6], "malformed", id="truncated-signature"),
        pytest.param("a.b.c", "malformed", id="not-base64"),
        pytest.param("", "malformed", id="empty"),
    ],
)
def test_tokens_we_did_not_mint_for_subscribing_open_nothing(token: str, message: str) -> None:
    with pytest.raises(Unauthorized, match=message):
        signer().verify(token, now=NOW)


def test_a_token_without_its_minter_is_still_a_token() -> None:
    principal = signer().verify(forge(claims(by=None)), now=NOW)
    assert principal.name == "token"
    assert principal.session_id == "s1"


@pytest.mark.parametrize("secrets", [None, "", " , "])
def test_no_token_secrets_sign_nothing(secrets: str | None) -> None:
    empty = TokenSigner(Secret(secrets) if secrets is not None else None, TTL)
    assert not empty
    token, _ = signer().mint("s1", subject="alpha", now=NOW)
    with pytest.raises(Unauthorized):
        empty.verify(token, now=NOW)


def test_token_secrets_need_32_characters_each() -> None:
    with pytest.raises(SettingsError, match="TOKENFAN_TOKEN_SECRETS") as caught:
        TokenSigner(Secret(f"{SECRET},{'x' * 31}"), TTL)
    assert SECRET not in str(caught.value)
    assert TokenSigner(Secret(f" {SECRET} , {'x' * 32} ,"), TTL)
    assert TokenSigner(Secret(new_token_secret()), TTL)


# --- bearer_token


@pytest.mark.parametrize(
    ("header", "credential"),
    [
        ("Bearer abc.def", "abc.def"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("  Bearer   abc  ", "abc"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer    ", None),
        ("Bearerabc", None),
        ("Basic YWxwaGE6a2V5", None),
        ("Token abc", None),
        ("abc", None),
    ],
)
def test_bearer_token_takes_the_credential_of_a_bearer_header_only(
    header: str | None, credential: str | None
) -> None:
    assert bearer_token(header) == credential


# --- authenticate


def test_an_api_key_is_a_service_principal() -> None:
    principal = authenticator().authenticate(KEY)
    assert principal == Principal("alpha")
    assert principal.is_service
    assert principal.expires_at is None


@pytest.mark.parametrize("credential", ["\ud800", "a.b.\udfff", KEY + "\udc00"])
def test_a_credential_that_is_not_valid_unicode_is_unauthorized(credential: str) -> None:
    """A JSON message may carry one (an escaped lone surrogate); it opens nothing, and crashes nothing."""
    for insecure in (False, True):
        with pytest.raises(Unauthorized, match="malformed"):
            authenticator(insecure_dev_mode=insecure).authenticate(credential)


def test_an_api_key_in_a_url_is_refused_and_must_be_rotated() -> None:
    with pytest.raises(Unauthorized, match="never in a URL; rotate this one"):
        authenticator().authenticate(KEY, in_url=True)
    with pytest.raises(Unauthorized, match="never in a URL"):
        authenticator(insecure_dev_mode=True).authenticate(KEY, in_url=True)


def test_a_token_is_accepted_in_a_header_or_a_url() -> None:
    token, expires = signer().mint("s1", subject="alpha")
    for in_url in (False, True):
        principal = authenticator().authenticate(token, in_url=in_url)
        assert principal == Principal("alpha", session_id="s1", expires_at=float(expires))


@pytest.mark.parametrize("insecure_dev_mode", [False, True])
@pytest.mark.parametrize("credential", ["", OTHER_KEY, KEY + " ", "a.b.c", "x" * 40])
def test_an_unknown_credential_is_refused_even_in_development_mode(
    credential: str, insecure_dev_mode: bool
) -> None:
    with pytest.raises(Unauthorized):
        authenticator(insecure_dev_mode=insecure_dev_mode).authenticate(credential)


def test_an_expired_token_is_refused() -> None:
    token, _ = signer().mint("s1", subject="alpha", now=time.time() - 2 * TTL)
    with pytest.raises(Unauthorized, match="expired"):
        authenticator().authenticate(token)


def test_a_missing_credential_is_refused_unless_in_development_mode() -> None:
    with pytest.raises(Unauthorized, match="send an API key or a session token"):
        authenticator().authenticate(None)
    anyone = authenticator(insecure_dev_mode=True).authenticate(None)
    assert anyone.is_service


def test_without_token_secrets_a_token_shaped_credential_is_unknown() -> None:
    token, _ = signer().mint("s1", subject="alpha")
    keys_only = Authenticator(keys(f"alpha:{KEY}"), TokenSigner(None, TTL))
    with pytest.raises(Unauthorized, match="unknown API key or token"):
        keys_only.authenticate(token)


# --- principals


def test_a_token_principal_watches_its_own_session_only() -> None:
    principal = Principal("alpha", session_id="s1", expires_at=NOW)
    principal.require_session("s1")
    with pytest.raises(Forbidden, match="another session"):
        principal.require_session("s2")
    with pytest.raises(Forbidden, match="needs an API key"):
        principal.require_service()


def test_a_service_principal_may_do_everything() -> None:
    principal = Principal("alpha")
    principal.require_session("s1")
    principal.require_session("s2")
    principal.require_service()


# --- configuration


def settings(**env: str) -> Settings:
    return Settings.from_env(env)


def test_a_server_without_api_keys_refuses_to_start_and_names_the_way_out() -> None:
    with pytest.raises(SettingsError) as caught:
        Authenticator.from_settings(settings(TOKENFAN_TOKEN_SECRETS=SECRET))
    assert "TOKENFAN_API_KEYS" in str(caught.value)
    assert "TOKENFAN_INSECURE_DEV_MODE" in str(caught.value)


def test_a_server_without_token_secrets_refuses_to_start() -> None:
    with pytest.raises(SettingsError, match="TOKENFAN_TOKEN_SECRETS") as caught:
        Authenticator.from_settings(settings(TOKENFAN_API_KEYS=f"alpha:{KEY}"))
    assert KEY not in str(caught.value)


def test_a_configured_server_authenticates_keys_and_tokens() -> None:
    configured = Authenticator.from_settings(
        settings(
            TOKENFAN_API_KEYS=f"alpha:{KEY}",
            TOKENFAN_TOKEN_SECRETS=f"{SECRET},{OLD_SECRET}",
            TOKENFAN_TOKEN_TTL_SECONDS="60",
        )
    )
    assert not configured.insecure_dev_mode
    assert configured.authenticate(KEY) == Principal("alpha")
    token, _ = configured.signer.mint("s1", subject="alpha")
    assert configured.authenticate(token).session_id == "s1"
    assert configured.signer.mint("s1", subject="alpha", now=NOW)[1] == int(NOW) + 60
    old, _ = signer(OLD_SECRET).mint("s1", subject="alpha")
    assert configured.authenticate(old).session_id == "s1"
    with pytest.raises(Unauthorized):
        configured.authenticate(None)


def test_development_mode_starts_without_keys_or_secrets() -> None:
    open_to_all = Authenticator.from_settings(settings(TOKENFAN_INSECURE_DEV_MODE="true"))
    assert open_to_all.insecure_dev_mode
    assert open_to_all.authenticate(None).is_service
    with pytest.raises(Unauthorized):
        open_to_all.authenticate(KEY)
