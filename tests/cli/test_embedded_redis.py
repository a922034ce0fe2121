"""The embedded server starts where it says, even when the port it picked is taken before it binds it."""

from __future__ import annotations

import pytest
import redis

from tokenfan.cli.embedded_redis import EmbeddedRedis, PortTaken


def test_a_server_whose_picked_port_was_taken_starts_on_another_and_answers_there(
    redis_server: EmbeddedRedis,
) -> None:
    # What happens when another process binds the port between `free_port` and the server's own bind.
    server = EmbeddedRedis()
    server.port = redis_server.port
    with server:
        assert server.port != redis_server.port
        with redis.Redis.from_url(server.url) as client:
            assert client.info("server")["process_id"] == server.process.pid  # type: ignore[union-attr]


def test_a_server_asked_for_a_taken_port_fails_clearly_rather_than_answer_as_the_other(
    redis_server: EmbeddedRedis,
) -> None:
    server = EmbeddedRedis(port=redis_server.port)
    with pytest.raises(PortTaken, match="Address already in use"):
        server.start()
    server.close()


def test_a_restart_after_a_kill_comes_back_on_the_same_port_with_its_data() -> None:
    with EmbeddedRedis(persistent=True) as server:
        port = server.port
        with redis.Redis.from_url(server.url) as client:
            client.set("kept", "yes")
        server.kill()
        server.start()
        assert server.port == port
        with redis.Redis.from_url(server.url) as client:
            assert client.get("kept") == b"yes"
