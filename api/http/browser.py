"""The browser side, served without a credential: the JavaScript client (``/v1/client/tokenfan.js`` and its
types ``tokenfan.d.ts``), the settings a page needs to find the relay (``/v1/client/config.json``), and the
live demo page at ``/``.

None of these hold data: the client is code, and the page asks for a credential before it reads or
enqueues anything, through the same authenticated endpoints as every other client. Serving them openly is
what lets an app load the client from here; CORS (the allowed origins only) comes from the app's
middleware, as for every route. Files are read once per process (restart the API to serve an edit) and
answered with an ETag, so a revalidation costs a 304.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from tokenfan.runtime.settings import Settings

__all__ = ["PROTOCOL_VERSION", "browser_router", "content_security_policy"]

#: The wire protocol the served client speaks: its path carries it (``/v1/client/``).
PROTOCOL_VERSION = 1

_STATIC = Path(__file__).with_name("static")

#: The client may be cached a few minutes: fixes within v1 reach browsers soon. The page is revalidated
#: on every load (a 304 when unchanged), so a deployment shows at once.
_CLIENT_CACHE = "public, max-age=300"
_PAGE_CACHE = "no-cache"


@dataclass(frozen=True)
class _Asset:
    body: bytes
    media_type: str
    etag: str
    cache_control: str


@functools.cache
def _asset(name: str, media_type: str, cache_control: str) -> _Asset:
    body = (_STATIC / name).read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return _Asset(body, media_type, etag, cache_control)


def _answer(request: Request, asset: _Asset, extra: dict[str, str] | None = None) -> Response:
    headers = {
        "ETag": asset.etag,
        "Cache-Control": asset.cache_control,
        "X-Content-Type-Options": "nosniff",
        **(extra or {}),
    }
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.services.settings
    return settings


def content_security_policy(settings: Settings) -> str:
    """The page's policy: its own scripts and styles only (LLM output is shown as text, and even an
    injected tag could run nothing), connections to this API and the relay, no framing."""
    relay = settings.public_relay_url
    if relay:
        parts = urlsplit(relay)
        connect = f"'self' {parts.scheme}://{parts.netloc}"
    else:
        connect = "'self' ws: wss:"  # the relay is not configured: the page asks for its address
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {connect}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


browser_router = APIRouter(include_in_schema=False)


@browser_router.get("/v1/client/tokenfan.js")
async def client_module(request: Request) -> Response:
    return _answer(request, _asset("tokenfan.js", "text/javascript; charset=utf-8", _CLIENT_CACHE))


@browser_router.get("/v1/client/tokenfan.d.ts")
async def client_types(request: Request) -> Response:
    return _answer(request, _asset("tokenfan.d.ts", "application/typescript; charset=utf-8", _CLIENT_CACHE))


@browser_router.get("/v1/client/config.json")
async def client_config(request: Request) -> JSONResponse:
    """Where the relay is (``TOKENFAN_PUBLIC_RELAY_URL``, null when not configured): public by nature."""
    settings = _settings(request)
    return JSONResponse(
        {"protocol": PROTOCOL_VERSION, "relay": settings.public_relay_url},
        headers={"Cache-Control": _PAGE_CACHE, "X-Content-Type-Options": "nosniff"},
    )


@browser_router.get("/")
async def page(request: Request) -> Response:
    policy = content_security_policy(_settings(request))
    headers = {"Content-Security-Policy": policy, "Referrer-Policy": "no-referrer"}
    return _answer(request, _asset("index.html", "text/html; charset=utf-8", _PAGE_CACHE), headers)


@browser_router.get("/page.js")
async def page_script(request: Request) -> Response:
    return _answer(request, _asset("page.js", "text/javascript; charset=utf-8", _PAGE_CACHE))


@browser_router.get("/page.css")
async def page_style(request: Request) -> Response:
    return _answer(request, _asset("page.css", "text/css; charset=utf-8", _PAGE_CACHE))
