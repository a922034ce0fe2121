"""What `api.http.browser` serves, without a server: the page's security policy, and a client module whose
exports its type declarations describe one for one (the stack-backed checks are in tests/system/test_browser.py)."""

from __future__ import annotations

import re
from pathlib import Path

import api.http.browser as browser
from api.http.browser import content_security_policy
from tokenfan.runtime.settings import Settings

__all__: list[str] = []

STATIC = Path(browser.__file__).with_name("static")


def exported(source: str, pattern: str) -> set[str]:
    return set(re.findall(pattern, source, flags=re.MULTILINE))


def test_the_type_declarations_cover_every_export_of_the_client_and_nothing_more() -> None:
    module = (STATIC / "tokenfan.js").read_text()
    types = (STATIC / "tokenfan.d.ts").read_text()
    values = exported(module, r"^export (?:async )?(?:class|function|const) (\w+)")
    declared = exported(types, r"^export declare (?:class|function|const) (\w+)")
    assert values == declared
    assert {"SessionStream", "SseStream", "Transcript", "PROTOCOL_VERSION"} <= values


def test_the_client_speaks_the_protocol_version_of_its_path() -> None:
    module = (STATIC / "tokenfan.js").read_text()
    assert f"export const PROTOCOL_VERSION = {browser.PROTOCOL_VERSION};" in module


def test_the_page_may_run_only_its_own_scripts_and_connect_only_to_the_api_and_its_relay() -> None:
    policy = content_security_policy(Settings.from_env({"TOKENFAN_PUBLIC_RELAY_URL": "wss://relay.example/"}))
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"  # no inline script, no eval: model output can run nothing
    assert directives["connect-src"] == "'self' wss://relay.example"
    assert directives["frame-ancestors"] == "'none'"


def test_without_a_configured_relay_the_page_may_connect_to_any_websocket() -> None:
    policy = content_security_policy(Settings.from_env({}))
    assert "connect-src 'self' ws: wss:;" in policy


def test_the_page_and_its_files_hold_no_credential_and_no_inline_script() -> None:
    page = (STATIC / "index.html").read_text()
    assert re.findall(r"<script[^>]*>", page) == ['<script type="module" src="/page.js">']
    for name in ("index.html", "page.js", "page.css", "tokenfan.js"):
        assert not re.search(r"tfk_[A-Za-z0-9_-]{8,}", (STATIC / name).read_text()), name
    assert "innerHTML" not in (STATIC / "page.js").read_text()  # model output is set as text only
