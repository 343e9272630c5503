"""pipeline.llm.transport: how an answer's status becomes an error, and which ones a retry can help."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pipeline.llm import transport
from pipeline.llm.openai_backend import error_reason


def test_statuses_map_to_the_errors_the_callers_act_on():
    slow = transport.status_error(429, {"retry-after": "2"}, b'{"error": {"message": "slow down"}}')
    assert isinstance(slow, transport.RateLimitError) and transport.retry_delay(slow, 0) == 2.0
    sick = transport.status_error(503, {}, b"upstream gone")
    assert isinstance(sick, transport.InternalServerError) and str(sick) == "Error code: 503 - upstream gone"
    assert 0 < transport.retry_delay(sick, 0) <= 0.25
    wrong = transport.status_error(400, {}, b'{"error": {"message": "bad field"}}')
    assert type(wrong) is transport.APIStatusError and transport.retry_delay(wrong, 0) is None
    assert error_reason(wrong).startswith("APIStatusError (HTTP 400): Error code: 400")
    assert isinstance(transport.APITimeoutError(), transport.APIConnectionError)  # the fleet moves both on
    assert transport.retry_delay(ValueError("not JSON"), 0) is None


def test_a_server_that_is_not_there_is_a_connection_error():
    with socket.socket() as probe:  # a port nobody listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def ask():
        async with transport.ChatClient(f"http://127.0.0.1:{port}/v1", "EMPTY", 5) as client:
            await client.chat(b"{}", "k")

    with pytest.raises(transport.APIConnectionError, match="Connection error"):
        asyncio.run(ask())


def test_bodies_are_encoded_compactly_in_utf8():
    body = transport.chat_body("m", [{"role": "user", "content": "größer"}], {"max_new_tokens": 5, "seed": 1})
    assert body == {"model": "m", "messages": [{"role": "user", "content": "größer"}], "max_tokens": 5, "seed": 1}
    assert transport.encode(body) == '{"model":"m","messages":[{"role":"user","content":"größer"}],"max_tokens":5,"seed":1}'.encode()
