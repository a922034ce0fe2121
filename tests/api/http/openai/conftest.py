"""The front door's system tests run against an API and a relay of their own, with an API key as production
runs them (the SDK always sends one), beside the shared `stack`, whose Redis, workers and simulator they use."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import openai
import pytest

from tests.support.openai_sdk import async_client, sync_client
from tests.support.stack import RunningStack, start_frontends
from tokenfan.runtime.auth import new_api_key, new_token_secret

KEY = new_api_key()


@pytest.fixture(scope="package")
def front(single_stack: RunningStack) -> Iterator[RunningStack]:
    front = start_frontends(
        single_stack,
        {
            "TOKENFAN_INSECURE_DEV_MODE": "false",
            "TOKENFAN_API_KEYS": f"app:{KEY}",
            "TOKENFAN_TOKEN_SECRETS": new_token_secret(),
            "TOKENFAN_RATE_LIMIT_PER_MINUTE": "0",  # the tests send bursts on purpose
        },
    )
    yield front
    front.stop()


@pytest.fixture
def client(front: RunningStack) -> Iterator[openai.OpenAI]:
    with sync_client(front.api_url, KEY) as sdk:
        yield sdk


@pytest.fixture
async def aclient(front: RunningStack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with async_client(front.api_url, KEY) as sdk:
        yield sdk
