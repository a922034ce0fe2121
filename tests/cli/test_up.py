"""`tokenfan up`, the README's first command: from nothing to a working system, and back to nothing."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys

import httpx
from websockets.asyncio.client import connect
from websockets.typing import Origin

from tests.support.requests import accept, bearer, expected_text, user_message
from tests.support.scraping import scrape
from tests.support.watchers import Watcher, finished
from tokenfan.contract.events import GenerationStatus


async def assert_the_relay_admits_the_page(relay_url: str, page_origin: str, key: str) -> None:
    """The page's origin (the API's) is allowed on the relay, as http://localhost:PORT too."""
    port = page_origin.rsplit(":", 1)[1]
    for origin in (page_origin, f"http://localhost:{port}"):
        async with connect(f"{relay_url}/v1/stream", origin=Origin(origin), additional_headers=bearer(key)):
            pass


async def assert_every_process_serves_its_metrics(banner: str) -> None:
    """The banner names each process's metrics (API, relay, worker), and the `top` command that reads them."""
    found = re.search(r"metrics\s+((?:http://\S+/metrics\s+)+)\(", banner)
    assert found, banner
    urls = found.group(1).split()
    assert [(await scrape(url)).component for url in urls] == ["api", "relay", "worker"]
    assert f"top --metrics {','.join(urls)}" in banner


def port_open(url: str) -> bool:
    host, port = re.sub(r"^\w+://", "", url).split("/")[0].rsplit(":", 1)
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, int(port))) == 0


async def test_up_serves_a_generation_end_to_end_and_ctrl_c_stops_everything() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_URL", "OPENAI_", "TOKENFAN_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenfan", "up", "--api-port", "0", "--relay-port", "0", "--metrics-port", "0",
        env={**env, "TOKENFAN_LOG_LEVEL": "warning"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    banner: list[str] = []
    async with asyncio.timeout(60):
        while not any("Ctrl-C stops everything" in line for line in banner):
            banner.append((await process.stdout.readline()).decode())
    text = "".join(banner)
    api_url = re.search(r"request API\s+(http://\S+)", text)
    relay_url = re.search(r"relay\s+(ws://\S+)", text)
    redis_url = re.search(r"Redis\s+(redis://\S+)", text)
    assert api_url, text
    assert relay_url, text
    assert redis_url, text
    key = re.search(r"API key\s+(tfk_\S+)", text)
    assert key, text
    assert "embedded Valkey" in text
    assert "built-in simulator" in text
    assert "curl -s -X POST" in text

    body = user_message("hello from the README")
    async with httpx.AsyncClient(base_url=api_url.group(1)) as anonymous:
        refused = await anonymous.post("/v1/sessions/readme/generations", json=body)
        page = await anonymous.get("/")
    assert refused.status_code == 401  # secure by default, even for the demo
    assert re.search(rf"live page\s+{re.escape(api_url.group(1))}/\s", text), text
    assert page.status_code == 200  # the page needs no key to load, only to enqueue
    await assert_the_relay_admits_the_page(relay_url.group(1), api_url.group(1), key.group(1))
    watcher = await Watcher(relay_url.group(1), "readme").connect(credential=key.group(1))
    headers = {"Authorization": f"Bearer {key.group(1)}"}
    async with httpx.AsyncClient(base_url=api_url.group(1), headers=headers) as api:
        generation_id = await accept(api, "readme", body)
    await watcher.receive_until(finished(generation_id), timeout=30)
    generation = watcher.transcript().generations[generation_id]
    assert generation.status is GenerationStatus.COMPLETED
    # `up` runs its simulator at 30 tokens/s with the same default reply as the test stack's.
    assert generation.text == expected_text(body)
    await watcher.close()
    await assert_every_process_serves_its_metrics(text)

    process.send_signal(signal.SIGINT)
    async with asyncio.timeout(30):
        assert await process.wait() == 0
    for url in (api_url.group(1), relay_url.group(1), redis_url.group(1)):
        assert not port_open(url), f"{url} still answers after Ctrl-C"
